"""The book's settings: valid methods, choices off the graded seeds, and a run plan that fits."""

from types import SimpleNamespace

import pandas as pd
import pytest

from robustq import book_settings, methods, profiles
from robustq.book_settings import METHODS, SELECTION_SEED, largest_within


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
def test_the_selection_seed_is_never_graded(profile):
    assert SELECTION_SEED not in book_settings.graded_seeds(profile)
    assert len(book_settings.graded_seeds(profile)) >= 2


def test_book_grades_at_least_five_seeds():
    assert len(book_settings.graded_seeds("book")) >= 5


def test_largest_within_rule():
    pick = largest_within(0.5)
    assert pick({0.1: 0.900, 1.0: 0.897, 10.0: 0.880}, baseline=0.900) == 1.0  # 0.3 points: allowed
    assert pick({0.1: 0.890, 1.0: 0.880}, baseline=0.900) == 0.1  # none within: the smallest
    assert pick({0.1: 0.950, 10.0: 0.960}, baseline=0.900) == 10.0  # better than baseline is within
    assert pick({0.1: 0.10, 10.0: 0.10}, baseline=0.10) == 0.1  # a collapsed reference: the smallest


def test_choose_trains_candidates_on_the_selection_seed_with_a_validation_split():
    chosen = book_settings.choose("symreg", "smoke")
    assert chosen.param == "lam" and chosen.value in METHODS["symreg"].choice.candidates
    assert set(chosen.validation) == set(METHODS["symreg"].choice.candidates) and chosen.reference == "baseline"
    assert chosen.runs == tuple(exp.key() for exp in book_settings.selection_runs("symreg", "smoke"))
    exp = book_settings.selection_experiment("symreg", "smoke", lam=chosen.value).resolved()
    assert exp.seed == SELECTION_SEED and exp.val_size > 0
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
    choice = book_settings.Choice("lam_w", (0.1, 1.0), "rule", largest_within(0.5), tied=("lam_a",))
    assert choice.assign(0.1) == {"lam_w": 0.1, "lam_a": 0.1}
    chosen = book_settings.choose("symreg", "smoke")
    inherited = book_settings.settings_for("symreg_satnl_asam", "smoke")
    assert inherited == {"scope": "channel", "lam": chosen.value}


def test_an_endpoint_of_several_sweeps_pools_their_rows(monkeypatch):
    calls = []

    def fake_evaluate(result, **sweep):
        calls.append(sweep)
        return pd.DataFrame({"w_bits": list(sweep["w_bits"]), "a_bits": list(sweep["a_bits"]),
                             "acc": [0.5 if sweep["w_bits"] == (6,) else 0.3]})

    monkeypatch.setattr(book_settings, "evaluate", fake_evaluate)
    endpoint = book_settings.ENDPOINTS["w6a6_w4a4"]
    assert endpoint.value(_Run({})) == pytest.approx(40.0)
    assert calls == [{"w_bits": (6,), "a_bits": (6,)}, {"w_bits": (4,), "a_bits": (4,)}]
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

    monkeypatch.setattr(book_settings, "evaluate", fake_evaluate)
    run = _Run(quantizers)
    assert book_settings.ENDPOINTS["target"].value(run) == pytest.approx(30.0)
    assert book_settings.ENDPOINTS["w4_w2"].value(run) == pytest.approx(30.0)
    assert calls == [{"w_bits": book_settings.GRID_BITS}] * 2
    calls.clear()
    book_settings.ENDPOINTS["variants43"].value(run)
    # a QAT model has one quantizer: its variants are the grid's rows; a float model's are not
    assert (calls == [{"w_bits": book_settings.GRID_BITS}]) == bool(quantizers)


def test_a_candidate_exactly_at_the_margin_is_within_it():
    # 25 of 5,000 validation images below the reference: 0.5 points, 0.5000000000000004 in floats
    assert 100 * (4350 / 5000 - 4325 / 5000) > 0.5
    pick = book_settings.largest_within(0.5)
    assert pick({0.1: 4350 / 5000, 1.0: 4325 / 5000}, 4350 / 5000) == 1.0
    assert pick({0.1: 4350 / 5000, 1.0: 4324 / 5000}, 4350 / 5000) == 0.1  # one image further is not


class _Recorded:
    """``experiments.run`` replaced by recorded selection runs: a validation accuracy (and, for the
    lazy rule, a gradient norm) per method and parameters, with no training."""

    def __init__(self, accuracy, norms=None):
        self.accuracy, self.norms, self.runs = accuracy, norms or {}, []

    def run(self, exp, progress=False):
        self.runs.append(exp)
        params = exp.method_params
        key = (exp.method, params.get("lam", params.get("lam_w")))
        history = pd.DataFrame({"val_acc": [0.5, self.accuracy[key]]})  # the rule reads the last epoch
        return SimpleNamespace(experiment=exp, history=history, model=params.get("lazy_every", 1))

    def install(self, monkeypatch):
        monkeypatch.setattr(book_settings.experiments, "run", self.run)
        monkeypatch.setattr(book_settings.experiments, "dataset_for", lambda exp: None)
        monkeypatch.setattr(book_settings, "validation_batch", lambda data: (None, None))
        monkeypatch.setattr(book_settings.gradients, "grad_l1_norm", lambda model, x, y: self.norms[model])


def test_choose_picks_exactly_by_the_rule_on_recorded_validation_accuracies(monkeypatch):
    n = 5000  # the book's validation split: accuracies are image counts over it
    recorded = _Recorded({("baseline", None): 4350 / n, ("symreg", 0.1): 4360 / n, ("symreg", 1.0): 4325 / n,
                          ("symreg", 10.0): 4324 / n})
    recorded.install(monkeypatch)
    chosen = book_settings.choose("symreg", "book")
    assert chosen.value == 1.0  # 25 images (0.5 points) below the reference is within 0.5 points
    assert chosen.validation == {0.1: 4360 / n, 1.0: 4325 / n, 10.0: 4324 / n} and chosen.reference_accuracy == 4350 / n
    assert chosen.margin == pytest.approx(0.0, abs=1e-9)  # 1.0 sits on the rule's boundary
    assert {exp.seed for exp in recorded.runs} == {book_settings.SELECTION_SEED}
    assert all(exp.val_size > 0 for exp in recorded.runs)


def test_choose_takes_the_smallest_candidate_when_the_reference_collapsed(monkeypatch):
    _Recorded({("baseline", None): 0.1, ("symreg", 0.1): 0.8, ("symreg", 1.0): 0.85,
               ("symreg", 10.0): 0.86}).install(monkeypatch)
    chosen = book_settings.choose("symreg", "book")
    assert chosen.value == 0.1 and chosen.outcome == "by its fallback: the smallest, as the reference collapsed"


def test_the_choices_table_says_when_the_rule_fell_back_and_shows_a_tiny_margin(monkeypatch):
    from robustq import book

    n = 5000
    _Recorded({("wrpn", None): 4350 / n, ("sinreq_wrpn", 0.1): 4300 / n, ("sinreq_wrpn", 1.0): 4200 / n,
               ("sinreq_wrpn", 10.0): 4100 / n}).install(monkeypatch)
    row = book.choices_table({"sinreq_wrpn": book_settings.choose("sinreq_wrpn", "book")}).loc["SinReQ (WRPN)"]
    assert row["reference"] == "WRPN" and row["chosen"] == 0.1 and row["margin (points)"] == "0.50"
    assert row["how"] == "by its fallback: the smallest, as no candidate stayed within 0.5 point of the reference"
    book_settings.forget_choices()
    _Recorded({("baseline", None): 0.87, ("symreg", 0.1): 0.87, ("symreg", 1.0): 0.86501,
               ("symreg", 10.0): 0.8}).install(monkeypatch)
    glued = {}
    monkeypatch.setattr(book, "glue", lambda **values: glued.update(values))
    row = book.choice_table("symreg", "book").loc["SymReg"]
    assert row["chosen"] == 1.0 and row["how"].startswith("by the rule: the largest within 0.5 point")
    assert glued == {"chosen_value": "1", "chosen_how": row["how"]}  # what the chapter's sentence says
    assert row["margin (points)"] == "0.001"  # not "0.0"


@pytest.mark.parametrize("lazy_norm, adopted", [(2.2, True), (1.8, True), (2.2000001, False), (1.79, False)])
def test_the_lazy_rule_adopts_within_ten_percent_exactly(monkeypatch, lazy_norm, adopted):
    accuracy = {("baseline", None): 0.87, ("grad_l1", 0.01): 0.869, ("grad_l1", 0.1): 0.868, ("grad_l1", 1.0): 0.8}
    _Recorded(accuracy, norms={1: 2.0, 4: lazy_norm}).install(monkeypatch)
    lazy = book_settings.choose_lazy("grad_l1", "book")
    assert lazy["adopted"] is adopted and lazy["norm_full"] == 2.0 and lazy["norm_lazy"] == lazy_norm
