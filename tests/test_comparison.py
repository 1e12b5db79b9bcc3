"""Chapter 08's table code (robustq.comparison): a method added to the registry and the book
settings reaches every table without other changes."""

import dataclasses
import re

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import seaborn as sns

from robustq import book_settings, comparison, endpoints, methods, plots


def _grid(methods_and_offsets, seeds=(0, 1, 2), bits=(8, 4, 3)):
    """A tidy primary grid: accuracy = 80 + offset + seed - (8 - bits), with fp_acc."""
    rows = [{"method": m, "seed": s, "w_bits": b, "acc": 80.0 + off + s - (8 - b), "fp_acc": 90.0}
            for m, off in methods_and_offsets.items() for s in seeds for b in bits]
    return pd.DataFrame(rows)


@pytest.fixture
def toy_method(monkeypatch):
    """A method registered as a user would: a registry entry and its book settings."""
    monkeypatch.setitem(methods.REGISTRY, "toy_kure", ((methods.KURE, {"target": 2.0}),))
    monkeypatch.setitem(book_settings.METHODS, "toy_kure",
                        book_settings.MethodSettings("toy_kure", {"lam": 0.5}, "08", 1.0, compared=True))
    return "toy_kure"


def test_a_registered_toy_method_goes_through_every_table(toy_method, monkeypatch):
    assert toy_method in comparison.compared_methods()
    exp = book_settings.experiment(toy_method, seed=0, profile="smoke").resolved()
    assert exp.method == "toy_kure" and methods.make(exp.method, **exp.method_params).parts[0].target == 2.0

    class FakeResult:
        def __init__(self, offset):
            self.offset = offset

    def evaluate(result, **sweep):  # endpoints.evaluate's frame: fractions, one row per setting
        assert sweep == {"w_bits": (8, 4)}
        return pd.DataFrame({"w_bits": [8, 4], "policy": "minmax", "acc": [0.9 + result.offset, 0.5 + result.offset],
                             "fp_acc": 0.9})

    monkeypatch.setattr(endpoints, "evaluate", evaluate)
    runs = {"baseline": {0: FakeResult(0.0), 1: FakeResult(0.01)},
            toy_method: {0: FakeResult(0.05), 1: FakeResult(0.07)}}
    frame = book_settings.accuracy_table(runs, w_bits=(8, 4))
    assert list(frame.columns) == ["method", "seed", "w_bits", "policy", "acc", "fp_acc", "quantizer"]
    assert set(frame["method"]) == {"baseline", toy_method} and set(frame["quantizer"]) == {"min-max"}
    assert frame["fp_acc"].tolist() == pytest.approx([90.0] * 8)
    assert frame.query("method == @toy_method and seed == 1 and w_bits == 4")["acc"].item() == pytest.approx(57.0)
    cells = comparison.paired_cells(frame, "baseline", tau=1.0)
    assert set(cells["method"]) == {toy_method} and cells["mean"].tolist() == pytest.approx([5.5, 5.5])
    assert comparison.mean_ranks(frame).index[0] == toy_method
    assert comparison.top_k_share(frame, k=1, resamples=20)[toy_method] == 1.0


def test_the_accuracy_table_labels_how_each_row_was_quantized(monkeypatch):
    def evaluate(result, **sweep):  # a QAT model is evaluated with its own quantizer (policy "trained")
        policies = ["trained"] if result == "qat" else ["minmax", "mse", "aciq"]
        return pd.DataFrame({"w_bits": 3, "policy": policies, "acc": 0.5, "fp_acc": 0.9})

    monkeypatch.setattr(endpoints, "evaluate", evaluate)
    frame = book_settings.accuracy_table({"qat_lsq": {0: "qat"}, "baseline": {0: "ptq"}}, w_bits=(3,))
    assert frame["quantizer"].tolist() == ["own (trained)", "min-max", "MSE", "ACIQ"]
    assert frame["acc"].tolist() == [50.0] * 4


def test_paired_cells_grade_each_bit_width_against_the_reference():
    cells = comparison.paired_cells(_grid({"baseline": 0.0, "better": 5.0, "same": 0.0}), "baseline", tau=1.0)
    grades = cells.set_index(["method", "w_bits"])["grade"]
    assert (grades.loc["better"] == "reproduced").all()
    # a constant zero difference has se 0: mean 0 < tau with no spread, so not reproduced
    assert (grades.loc["same"] == "not reproduced").all()
    with pytest.raises(ValueError, match="reference 'nope' is not among the methods"):
        comparison.paired_cells(_grid({"a": 0.0}), "nope", tau=1.0)


def test_mean_ranks_put_the_most_accurate_first_and_top_k_share_counts_resamples():
    frame = _grid({"low": 0.0, "mid": 1.0, "high": 2.0})
    assert list(comparison.mean_ranks(frame).index) == ["high", "mid", "low"]
    assert comparison.mean_ranks(frame)["high"] == 1.0
    shares = comparison.top_k_share(frame, k=2, resamples=50)
    assert shares["high"] == shares["mid"] == 1.0 and shares["low"] == 0.0
    with pytest.raises(ValueError, match=r"k must be a positive int, got 0 \(e\.g\. 3\)"):
        comparison.top_k_share(frame, k=0)


def test_the_ranking_table_puts_the_best_mean_rank_first_whatever_the_names():
    frame = _grid({"baseline": 0.0, "kure": 1.0, "symreg": 2.0})  # alphabetical order is the worst first
    table = comparison.ranking(frame, k=1, resamples=20)
    assert list(table.index) == ["symreg", "kure", "baseline"]
    assert list(table.columns) == ["mean rank", "in the top 1"]
    assert table.loc["symreg", "in the top 1"] == 1.0 and table.loc["baseline", "in the top 1"] == 0.0


def test_pareto_front_keeps_the_undominated_rows():
    frame = pd.DataFrame({"cost": [1.0, 2.0, 2.0, 3.0, 1.5], "gain": [0.0, 3.0, 1.0, 3.0, 0.0]},
                         index=list("abcde"))
    front = comparison.pareto_front(frame, "cost", "gain")
    assert front.to_dict() == {"a": True, "b": True, "c": False, "d": False, "e": False}


def test_compared_methods_are_the_book_settings_flagged_for_the_comparison():
    assert comparison.compared_methods() == [
        "baseline", "symreg", "satnl", "symreg_satnl_asam", "kure", "grad_l1", "wrpn", "sinreq_wrpn", "qat_ste",
        "qat_lsq", "oscillation",
    ]


def test_step_seconds_times_a_short_run_and_rejects_bad_counts():
    exp = dataclasses.replace(book_settings.experiment("baseline", 0, "smoke"), train_size=None)
    seconds = comparison.step_seconds(exp, steps=3, warmup=1)
    assert 0 < seconds < 5
    with pytest.raises(ValueError, match="steps must be a positive int, got 0"):
        comparison.step_seconds(exp, steps=0)


def test_write_download_writes_a_csv_beside_the_executed_notebooks(tmp_path, monkeypatch):
    from robustq import book

    monkeypatch.setattr(book, "BOOK_NOTEBOOKS", tmp_path / "notebooks")
    frame = pd.DataFrame({"method": ["a", "b"], "acc": [1.5, 2.0]})
    path = book.write_download(frame, "table.csv")
    assert path == tmp_path / "notebooks" / "table.csv"
    pd.testing.assert_frame_equal(pd.read_csv(path), frame)
    with pytest.raises(ValueError, match="a plain file name ending in .csv"):
        book.write_download(frame, "../escape.csv")


def test_a_chapter_table_shows_missing_values_as_a_dash_and_every_float_with_fixed_decimals():
    from robustq import book

    frame = pd.DataFrame({"W3": [86.5, np.nan], "float": [87.0, -0.00001], "seeds": [5, 5]},
                         index=pd.Index(["baseline", "wrpn"], name="method"))
    html = book.table(frame, decimals=2).data
    cells = re.findall(r"<td>(.*?)</td>", html)
    assert cells == ["86.50", "87.00", "5", "—", "0.00", "5"]
    assert re.findall(r"<th>(.*?)</th>", html)[-2:] == ["baseline", "WRPN"]  # the names a reader knows
    legend = book.with_labels(pd.DataFrame({"method": ["symreg_satnl_asam", "baseline + bias correction"]}))
    assert legend["method"].tolist() == ["SymReg + SatNL + ASAM", "baseline + bias correction"]
    with pytest.raises(ValueError, match="decimals must be"):
        book.table(frame, decimals=-1)


def test_method_colors_repeat_no_colour_for_more_than_ten_methods():
    names = [f"m{i}" for i in range(25)]
    for n in (3, 12, 25):
        colors = plots.method_colors(names[:n])
        assert len(set(colors.values())) == n
    assert plots.method_colors(names[:3]) == dict(zip(names[:3], sns.color_palette(plots.METHOD_PALETTE)[:3]))


def test_a_compared_method_keeps_its_colour_from_chapter_to_chapter():
    from robustq import book

    chapter_02, chapter_06 = book.method_colors(["baseline", "satnl"]), book.method_colors(["wrpn", "dorefa"])
    shown = [*comparison.compared_methods(), "baseline + bias correction"]
    chapter_08 = book.method_colors(shown)
    assert chapter_02["satnl"] == chapter_08["satnl"] and chapter_06["wrpn"] == chapter_08["wrpn"]
    assert chapter_02["baseline"] == chapter_08["baseline"] and len({chapter_08[m] for m in shown}) == len(shown)
    assert chapter_08["SymReg + SatNL + ASAM"] == chapter_08["symreg_satnl_asam"]  # a figure may show labels
    assert chapter_06["dorefa"] != chapter_06["wrpn"]  # a method outside 08 takes a hue left free


def test_gain_split_adds_up_and_leaves_out_methods_without_a_float_accuracy():
    endpoint = pd.DataFrame({"baseline": [85.0, 86.0, 84.0], "satnl": [86.5, 86.5, 85.5], "qat": [80.0, 81.0, 82.0]})
    floats = pd.DataFrame({"baseline": [87.0, 87.5, 86.5], "satnl": [88.0, 88.0, 87.5]})
    split = comparison.gain_split(endpoint, floats)
    assert list(split.index) == ["satnl"]
    row = split.loc["satnl"]
    assert row["endpoint gain"] == pytest.approx(7 / 6) and row["float gain"] == pytest.approx(5 / 6)
    assert row["float gain"] + row["robustness gain"] == pytest.approx(row["endpoint gain"])


def test_a_zoomed_seed_grid_repeats_the_high_bit_widths_on_their_own_axis():
    frame = pd.DataFrame({"w_bits": [2, 3, 4] * 2, "acc": [10.0, 85.0, 86.0, 12.0, 85.5, 86.5], "seed": 0,
                          "method": ["a"] * 3 + ["b"] * 3, "family": "post-training"})
    grid = plots.seed_grid(frame, "w_bits", "acc", hue="method", col="family", palette=plots.PALETTE,
                           zoom_from=3, zoom_label="W3 and up")
    full, zoom = grid.axes[:, 0]
    assert full.get_title() == "post-training · all" and zoom.get_title() == "post-training · W3 and up"
    assert full.get_ylim()[0] < 20 and zoom.get_ylim()[0] > 80  # the zoomed row leaves W2 out
    plt.close(grid.figure)
