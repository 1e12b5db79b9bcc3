"""The book's settings: valid methods, choices off the graded seeds, and a run plan that fits."""

from types import SimpleNamespace

import pandas as pd
import pytest

from robustq import book_settings, endpoints, methods, profiles
from robustq.book_settings import METHODS, SELECTION_SEED, SELECTION_SEEDS, best_on_endpoint


def test_every_book_method_builds_with_its_settings():
    for name, entry in METHODS.items():
        built = methods.make(entry.method, **entry.params)
        assert built.name == entry.method, name
        if entry.choice is not None:
            for value in entry.choice.candidates:
                methods.make(entry.method, **entry.params, **{entry.choice.param: value})


def test_qat_methods_share_the_books_one_qat_setting():
    for name, entry in METHODS.items():
        params = methods.make(entry.method, **entry.params).params()
        if "quantizer" in params:
            assert params["bit_width"] == book_settings.QAT_BIT_WIDTH, name
            assert params["edge_bit_width"] == book_settings.EDGE_BIT_WIDTH, name


@pytest.mark.parametrize("profile", list(profiles.PROFILES))
def test_the_selection_seeds_are_never_graded(profile):
    assert not set(SELECTION_SEEDS) & set(book_settings.graded_seeds(profile))
    assert len(SELECTION_SEEDS) >= 2 and SELECTION_SEED in SELECTION_SEEDS
    assert len(book_settings.graded_seeds(profile)) >= 2


def test_book_grades_at_least_five_seeds():
    assert len(book_settings.graded_seeds("book")) >= 5


def test_the_rule_takes_the_best_endpoint_and_gives_ties_to_the_smallest():
    assert best_on_endpoint({0.1: 80.0, 1.0: 85.0, 10.0: 84.0}, noise=0.3) == 1.0  # the best
    assert best_on_endpoint({0.1: 84.8, 1.0: 85.0, 10.0: 84.0}, noise=0.3) == 0.1  # within the noise: a tie
    assert best_on_endpoint({0.1: 84.6, 1.0: 85.0, 10.0: 85.2}, noise=0.3) == 1.0  # 0.4 below the best is not
    assert best_on_endpoint({10.0: 85.0, 0.1: 85.0}, noise=0.0) == 0.1  # an exact tie: the smallest
    assert book_settings.margin_over_runner_up({0.1: 80.0, 1.0: 85.0, 10.0: 84.0}, 1.0) == pytest.approx(1.0)
    # 10,000 validation images at 87%: the binomial standard error of an accuracy, in points
    assert book_settings.validation_noise(87.0, 10_000) == pytest.approx(100 * (0.87 * 0.13 / 10_000) ** 0.5)


def test_choose_trains_candidates_on_the_selection_seed_with_a_validation_split():
    chosen = book_settings.choose("symreg", "smoke")
    extension = book_settings.extension_runs("symreg", "smoke")
    grid = set(METHODS["symreg"].choice.candidates) | {exp.method_params["lam"] for exp in extension}
    assert chosen.param == "lam" and chosen.value in grid
    assert set(chosen.validation) == grid and chosen.reference == "baseline"
    assert len(grid) == 3 + (chosen.extended is not None) and len(extension) == 2 * (chosen.extended is not None)
    assert chosen.runs == tuple(exp.key() for exp in (*book_settings.selection_runs("symreg", "smoke"), *extension))
    assert chosen.seeds == SELECTION_SEEDS and chosen.endpoint == METHODS["symreg"].choice.endpoint
    runs = book_settings.selection_runs("symreg", "smoke")
    assert {exp.seed for exp in runs} == set(SELECTION_SEEDS) and all(exp.val_size > 0 for exp in runs)
    assert all(0 <= points <= 100 for points in (*chosen.validation.values(), chosen.reference_endpoint))
    assert book_settings.settings_for("symreg", "smoke") == {"scope": "channel", "lam": chosen.value}
    assert book_settings.experiment("symreg", 3, "smoke").method_params == {"scope": "channel", "lam": chosen.value}
    assert book_settings.choose("symreg", "smoke") is chosen  # memoised: recovered once per profile


def test_unknown_book_method_names_the_known_ones():
    with pytest.raises(ValueError, match="the book's methods are: baseline"):
        book_settings.experiment("nope", 0)


def test_primary_endpoint_is_one_of_the_candidates_and_has_a_planning_spread():
    assert book_settings.ENDPOINT in book_settings.ENDPOINTS
    assert book_settings.PLANNING_SD[book_settings.ENDPOINT] > 0
    assert book_settings.planning_mde(5) < book_settings.planning_mde(3)


def test_a_tied_choice_sets_every_tied_parameter_and_an_heir_reuses_its_sources_choice():
    choice = book_settings.Choice("lam_w", (0.1, 1.0), "w6a6_w4a4", tied=("lam_a",))
    assert choice.assign(0.1) == {"lam_w": 0.1, "lam_a": 0.1}
    with pytest.raises(ValueError, match="endpoint must be one of"):
        book_settings.Choice("lam", (0.1, 1.0), "float accuracy")
    chosen = book_settings.choose("symreg", "smoke")
    inherited = book_settings.settings_for("symreg_satnl_asam", "smoke")
    assert inherited == {"scope": "channel", "lam": chosen.value}


def test_an_endpoint_of_several_sweeps_pools_their_rows(monkeypatch):
    calls = []

    def fake_evaluate(result, **sweep):
        calls.append(sweep)
        return pd.DataFrame({"w_bits": list(sweep["w_bits"]), "a_bits": list(sweep["a_bits"]),
                             "acc": [0.5 if sweep["w_bits"] == (6,) else 0.3]})

    monkeypatch.setattr(endpoints, "evaluate", fake_evaluate)
    endpoint = book_settings.ENDPOINTS["w6a6_w4a4"]
    assert endpoint.value(_Run({})) == pytest.approx(40.0)
    assert calls == [{"split": "test", "w_bits": (6,), "a_bits": (6,)}, {"split": "test", "w_bits": (4,), "a_bits": (4,)}]
    corrected = endpoint.with_settings("bc", bias_correction=(True,))
    assert corrected.name == "w6a6_w4a4_bc" and all(s["bias_correction"] == (True,) for s in corrected.sweep)


@pytest.mark.parametrize("profile, warmup", [("smoke", 1), ("book", 2), ("paper", 20)])
def test_a_warm_start_penalises_the_last_third_of_the_epochs_and_at_least_one(profile, warmup):
    params = book_settings.METHODS["grad_l1"].params_for(profile)
    assert params == {"weighting": "step", "warmup_epochs": warmup}
    exp = book_settings.selection_experiment("grad_l1", profile).resolved()
    assert exp.method_params["warmup_epochs"] == warmup < exp.epochs
    assert book_settings.METHODS["symreg"].params_for(profile) == {"scope": "channel"}


class _Run:
    def __init__(self, quantizers):
        self.quantizers = quantizers


@pytest.mark.parametrize("quantizers", [{}, {"conv": {"quantizer": "lsq"}}], ids=["ptq", "qat"])
def test_weight_only_endpoints_read_one_shared_grid(monkeypatch, quantizers):
    calls = []

    def fake_evaluate(result, **sweep):
        calls.append(sweep)
        bits = sweep["w_bits"]
        return pd.DataFrame({"w_bits": list(bits), "acc": [b / 10 for b in bits]})

    monkeypatch.setattr(endpoints, "evaluate", fake_evaluate)
    run = _Run(quantizers)
    assert book_settings.ENDPOINTS["target"].value(run) == pytest.approx(30.0)
    assert book_settings.ENDPOINTS["w4_w2"].value(run) == pytest.approx(30.0)
    assert calls == [{"w_bits": book_settings.GRID_BITS}] * 2
    calls.clear()
    book_settings.ENDPOINTS["variants43"].value(run)
    # a QAT model has one quantizer: its variants are the grid's rows; a float model's are not
    assert (calls == [{"w_bits": book_settings.GRID_BITS}]) == bool(quantizers)
    calls.clear()
    # bias-corrected W4-W2 reads the bias-corrected grid (chapter 08's bar), activations their own sweep
    corrected = book_settings.ENDPOINTS["w432"].with_settings("corrected", bias_correction=(True,))
    assert corrected.value(run) == pytest.approx(30.0)
    book_settings.ENDPOINTS["w4a4"].value(run)
    assert calls == [{"w_bits": book_settings.GRID_BITS, "bias_correction": (True,)},
                     {"split": "test", "w_bits": (4,), "a_bits": (4,)}]


class _Recorded:
    """``experiments.run`` replaced by recorded selection runs: per method and λ, the choice's
    endpoint on the validation split (points; one value, or one per selection seed), a float
    validation accuracy and, for the lazy rule, a gradient norm, with no training."""

    def __init__(self, quantized, floating=None, norms=None):
        self.quantized, self.floating, self.norms, self.runs = quantized, floating or {}, norms or {}, []

    def run(self, exp, progress=False):
        self.runs.append(exp)
        params = exp.method_params
        key = (exp.method, params.get("lam", params.get("lam_w")))
        points = self.quantized[key]
        history = pd.DataFrame({"val_acc": [0.5, self.floating.get(key, 0.87)]})  # the last epoch's
        return SimpleNamespace(experiment=exp, history=history, model=params.get("lazy_every", 1),
                               quantized=points[exp.seed] if isinstance(points, dict) else points)

    def install(self, monkeypatch):
        monkeypatch.setattr(book_settings.experiments, "run", self.run)
        monkeypatch.setattr(book_settings.experiments, "dataset_for", lambda exp: None)
        monkeypatch.setattr(book_settings, "validation_batch", lambda data: (None, None))
        monkeypatch.setattr(book_settings.gradients, "grad_l1_norm", lambda model, x, y: self.norms[model])
        monkeypatch.setattr(book_settings.Endpoint, "value", lambda endpoint, result, split="test": result.quantized)


def test_choose_picks_by_the_mean_over_the_selection_seeds_of_the_validation_endpoint(monkeypatch):
    # seed 100 alone would take 10, seed 101 alone 0.1; their mean takes 1
    recorded = _Recorded({("baseline", None): 60.0, ("symreg", 0.1): {100: 70.0, 101: 80.0},
                          ("symreg", 1.0): {100: 78.0, 101: 78.0}, ("symreg", 10.0): {100: 82.0, 101: 70.0}},
                         floating={("baseline", None): 0.87, ("symreg", 1.0): 0.865})
    recorded.install(monkeypatch)
    chosen = book_settings.choose("symreg", "book")
    assert chosen.validation == {0.1: 75.0, 1.0: 78.0, 10.0: 76.0} and chosen.value == 1.0
    assert chosen.margin == pytest.approx(2.0) and not chosen.at_end
    assert chosen.reference_endpoint == 60.0 and chosen.trained_cost == pytest.approx(-0.5)
    assert [exp.seed for exp in recorded.runs] == [100] * 4 + [101] * 4
    assert all(exp.val_size > 0 for exp in recorded.runs)
    assert chosen.outcome == "the best mean validation w432 over 2 selection seeds, +2.00 points over the runner-up"


def test_a_tie_within_the_validation_noise_goes_to_the_smaller_strength(monkeypatch):
    # 10,000 validation images at 85%: noise 0.36 points; 0.2 below the best is a tie. The tie puts
    # the first grid's choice at its end: the grid is extended once, to 0.1, which does worse.
    recorded = _Recorded({("baseline", None): 80.0, ("oscillation", 0.1): 70.0, ("oscillation", 1.0): 84.8,
                          ("oscillation", 10.0): 85.0, ("oscillation", 100.0): 40.0})
    recorded.install(monkeypatch)
    chosen = book_settings.choose("oscillation", "book")
    assert chosen.noise == pytest.approx(book_settings.validation_noise(85.0, 10_000))
    assert chosen.value == 1.0 and chosen.margin == pytest.approx(-0.2) and not chosen.at_end
    assert chosen.extended == 0.1 and list(chosen.validation) == [0.1, 1.0, 10.0, 100.0]
    assert [exp.method_params["lam"] for exp in recorded.runs[8:]] == [0.1, 0.1]  # after the first grid
    assert chosen.runs == tuple(exp.key() for exp in recorded.runs)
    assert chosen.outcome == ("the smallest candidate within the validation noise (0.36 points) of the best mean "
                              "validation target over 2 selection seeds, -0.20 points from it; the first grid's "
                              "choice sat at its end, so the grid was extended to 0.1")


def test_a_choice_at_an_end_extends_the_grid_once_only(monkeypatch):
    _Recorded({("baseline", None): 10.0, ("symreg", 0.1): 20.0, ("symreg", 1.0): 30.0, ("symreg", 10.0): 40.0,
               ("symreg", 100.0): 50.0}).install(monkeypatch)
    assert [exp.method_params["lam"] for exp in book_settings.extension_runs("symreg", "book")] == [100.0, 100.0]
    chosen = book_settings.choose("symreg", "book")
    assert (chosen.value, chosen.extended, chosen.at_end) == (100.0, 100.0, True)
    assert chosen.outcome == ("the best mean validation w432 over 2 selection seeds, +10.00 points over the runner-up, "
                              "at an end of the extended grid (extended once only); the first grid's choice sat at "
                              "its end, so the grid was extended to 100")


def test_a_grid_is_extended_by_one_step_past_either_end():
    choice = book_settings.Choice("lam", (1.0, 10.0, 100.0), "target")
    assert (choice.beyond(1.0), choice.beyond(100.0)) == (0.1, 1000.0)
    with pytest.raises(ValueError, match="not an end of the grid"):
        choice.beyond(10.0)
    with pytest.raises(ValueError, match="increasing order"):
        book_settings.Choice("lam", (1.0, 0.1), "target")


def test_the_choices_table_shows_the_reference_and_every_candidate_and_glues_the_choice(monkeypatch):
    from robustq import book

    _Recorded({("wrpn", None): 84.0, ("sinreq_wrpn", 0.1): 84.5, ("sinreq_wrpn", 1.0): 85.5,
               ("sinreq_wrpn", 10.0): 83.0}, floating={("wrpn", None): 0.86, ("sinreq_wrpn", 1.0): 0.8612}
              ).install(monkeypatch)
    glued = {}
    monkeypatch.setattr(book, "glue", lambda **values: glued.update(values))
    table = book.choice_table("sinreq_wrpn", "book").loc["SinReQ (WRPN)"]
    assert list(table.index) == ["WRPN (reference)", "lam = 0.1", "lam = 1", "lam = 10"]
    assert table.loc["lam = 1", "rule"] == "chosen" and table["rule"].eq("chosen").sum() == 1
    assert table.loc["WRPN (reference)", "validation target (points)"] == 84.0
    assert glued == {"chosen_value": "1", "chosen_how": book_settings.choose("sinreq_wrpn", "book").outcome,
                     "chosen_trained_cost": "+0.12"}


@pytest.mark.parametrize("lazy_norm, adopted", [(2.2, True), (1.8, True), (2.2000001, False), (1.79, False)])
def test_the_lazy_rule_adopts_within_ten_percent_exactly(monkeypatch, lazy_norm, adopted):
    quantized = {("baseline", None): 80.0, ("grad_l1", 0.01): 81.0, ("grad_l1", 0.1): 84.0, ("grad_l1", 1.0): 70.0}
    _Recorded(quantized, norms={1: 2.0, 4: lazy_norm}).install(monkeypatch)
    lazy = book_settings.choose_lazy("grad_l1", "book")
    assert lazy["adopted"] is adopted and lazy["norm_full"] == 2.0 and lazy["norm_lazy"] == lazy_norm


def test_each_compared_method_is_graded_where_its_paper_claims_and_chosen_there_too():
    """Protocol v2, change 12: chapter 08 grades a compared method at its claim's endpoint, which is
    its choice's where it has one (a method is chosen on the endpoint it is graded on)."""
    compared = {name: book_settings.claim_endpoint(name) for name, entry in METHODS.items() if entry.compared}
    # the core paper's three by standardised effect (change 18), KURE at W2
    core = {compared[name] for name in ("symreg", "satnl", "symreg_satnl_asam")}
    assert core == {book_settings.CORE_PTQ_ENDPOINT} and compared["kure"] == "w2"
    assert compared["grad_l1"] == "w6a6_w4a4"
    assert {compared[name] for name in ("oscillation", "wrpn", "sinreq_wrpn", "qat_ste", "qat_lsq")} == {"target"}
    for name, endpoint in compared.items():
        assert endpoint in book_settings.ENDPOINTS
        if METHODS[name].choice is not None:
            assert METHODS[name].choice.endpoint == endpoint, name


def test_a_method_graded_on_another_endpoint_than_its_choices_is_refused():
    with pytest.raises(ValueError, match="chosen on the endpoint it is graded on"):
        book_settings.MethodSettings("symreg", {}, "01", 1.0, book_settings.SYMREG_LAM, endpoint="target")
    with pytest.raises(ValueError, match="endpoint must be one of"):
        book_settings.MethodSettings("kure", {}, "08", 1.0, endpoint="w7")
