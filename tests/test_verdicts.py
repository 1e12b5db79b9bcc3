"""The claim-grading rules of book/methods.md §7 on hand-made cases."""

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from scipy import stats

from robustq import verdicts
from robustq.verdicts import (
    INCONCLUSIVE,
    NOT_GRADABLE,
    NOT_REPRODUCED,
    REPRODUCED,
    SMALLER,
    Claim,
    equivalent,
    paired,
)


def test_t_quantiles_are_students_not_two_standard_errors():
    assert verdicts.t_quantile(3) == pytest.approx(4.303, abs=1e-3)
    assert verdicts.t_quantile(5) == pytest.approx(2.776, abs=1e-3)
    assert verdicts.t_quantile(1000) == pytest.approx(1.962, abs=1e-3)
    with pytest.raises(ValueError, match=r"n \(paired seeds\) must be an int >= 2, got 1"):
        verdicts.t_quantile(1)


def _three_seeds(mean, spread):
    """Differences mean-spread, mean, mean+spread: sd = spread, se = spread/sqrt(3)."""
    return {0: mean - spread, 1: mean, 2: mean + spread}, {0: 0.0, 1: 0.0, 2: 0.0}


def test_paired_at_n3_uses_the_t_quantile():
    # mean 3, sd 1, se 0.577: t se = 2.48 < 3 (reproduced); 2 se = 1.15 would also pass, so also
    # check a case between them: mean 2, sd 1.5 -> se 0.866, 2 se = 1.73 < 2 < t se = 3.73.
    assert paired(*_three_seeds(3.0, 1.0), tau=2).grade == REPRODUCED
    assert paired(*_three_seeds(2.0, 1.5), tau=2).grade == INCONCLUSIVE


def test_paired_at_n5_boundaries():
    cand = {s: v for s, v in enumerate([1.0, 2.0, 3.0, 4.0, 5.0])}
    ref = {s: 0.0 for s in range(5)}
    v = paired(cand, ref, tau=2)
    assert v.n == 5 and v.mean == 3.0 and v.se == pytest.approx(math.sqrt(2.5) / math.sqrt(5))
    assert v.mde == pytest.approx((2.776 + 0.941) * v.se, rel=1e-3)  # 80% power: t_0.975 + t_0.80
    assert v.grade == REPRODUCED  # 3 - 1.96 > 0 and 3 >= 2
    assert paired(cand, ref, tau=3.5).grade == INCONCLUSIVE  # mean below tau, but not surely
    assert paired(cand, ref, tau=5.5).grade == SMALLER  # 3 + 1.96 < 5.5, and 3 - 1.96 > 0: a clear gain
    assert paired({s: v - 2.5 for s, v in cand.items()}, ref, tau=3).grade == INCONCLUSIVE  # [-1.46, 2.46]
    assert paired({s: v - 5.0 for s, v in cand.items()}, ref, tau=3).grade == NOT_REPRODUCED  # -2 + 1.96 <= 0


def test_a_clear_gain_surely_below_tau_is_smaller_than_claimed_not_absent():
    # C3.1 of the cold build of 35e2809: +0.78 ± 0.18 over 5 seeds, tau 2 -> interval about [0.28, 1.28]
    d = [0.78 + x for x in (-0.4, -0.2, 0.0, 0.2, 0.4)]
    v = paired(d, [0.0] * 5, tau=2)
    assert 0 < v.interval[0] and v.interval[1] < 2 and v.grade == SMALLER
    # no clear gain, but a gain not ruled out either: inconclusive (protocol v1 said "not reproduced")
    assert paired([x - 0.78 for x in d], [0.0] * 5, tau=2).grade == INCONCLUSIVE
    assert paired([x - 1.5 for x in d], [0.0] * 5, tau=2).grade == NOT_REPRODUCED  # surely a loss
    edge = [1.0, 1.0, 1.0]  # se 0: the interval is [1, 1], above 0 and below tau
    assert paired(edge, [0.0] * 3, tau=1.5).grade == SMALLER
    assert paired([0.0] * 3, [0.0] * 3, tau=1.5).grade == NOT_REPRODUCED  # [0, 0] is not above 0


def test_a_claim_with_less_room_than_tau_is_not_gradable_whatever_its_effect():
    # C3.1 of the cold build of ca56817: the baseline 0.65 points below float on the primary
    # endpoint, tau 2: no method could win 2 points by robustness alone
    claim = Claim("03", "C3.1", "SymReg beats the baseline", "variants43", "paired", 2.0)
    candidate, reference = {0: 87.0, 1: 87.5, 2: 86.8}, {0: 86.0, 1: 86.4, 2: 86.1}
    low_ceiling = {seed: value + 0.65 for seed, value in reference.items()}
    assert claim.grade(candidate, reference).grade == SMALLER
    assert claim.grade(candidate, reference, low_ceiling).grade == NOT_GRADABLE
    high_ceiling = {seed: value + 2.0 for seed, value in reference.items()}  # room exactly tau: graded
    assert claim.grade(candidate, reference, high_ceiling).grade == SMALLER
    assert set(verdicts.leave_one_out(claim, candidate, reference, low_ceiling).values()) == {NOT_GRADABLE}
    record = verdicts.seed_record(claim, candidate, reference, low_ceiling)
    assert verdicts.room(record) == pytest.approx(0.65)
    equivalence = Claim("07", "C7.2", "A matches B", "target", "equivalent", 2.0)
    assert equivalence.grade(candidate, reference, low_ceiling).grade != NOT_GRADABLE  # a margin, not a gain
    assert paired(candidate, reference, tau=2.0, room=math.nan).grade == SMALLER  # no room known: graded


def test_paired_needs_a_mean_at_least_tau_even_when_significant():
    cand, ref = _three_seeds(1.5, 0.5)
    assert paired(cand, ref, tau=2).grade == INCONCLUSIVE  # significant, but 1.5 < 2 and 1.5 + t se > 2


def test_paired_negative_effect_is_not_reproduced():
    assert paired(*_three_seeds(-4.0, 0.5), tau=0).grade == NOT_REPRODUCED
    assert paired(*_three_seeds(-4.0, 0.5), tau=1).grade == NOT_REPRODUCED


def test_fewer_than_two_seeds_are_always_inconclusive():
    v = paired({0: 90.0}, {0: 10.0}, tau=1)
    assert v.grade == INCONCLUSIVE and v.n == 1 and math.isnan(v.se) and v.mde == math.inf


def test_equivalent_rules():
    assert equivalent(*_three_seeds(0.2, 0.1), margin=1).grade == REPRODUCED
    assert equivalent(*_three_seeds(5.0, 0.1), margin=1).grade == NOT_REPRODUCED
    assert equivalent(*_three_seeds(-5.0, 0.1), margin=1).grade == NOT_REPRODUCED
    assert equivalent(*_three_seeds(0.2, 2.0), margin=1).grade == INCONCLUSIVE
    with pytest.raises(ValueError, match="margin must be >= 0"):
        equivalent([1.0, 2.0], [1.0, 2.0], margin=-1)


def test_pairing_is_by_seed_not_by_position():
    cand = pd.Series({2: 72.0, 0: 70.0, 1: 71.0})
    ref = pd.Series({0: 60.0, 1: 61.0, 2: 62.0})
    d = verdicts.differences(cand, ref)
    assert sorted(d.index) == [0, 1, 2] and (d == 10.0).all()


def test_a_seed_without_its_partner_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"unpaired seeds: \[\] only in the candidate, \[3\] only in the reference"):
        paired({0: 70.0, 1: 71.0, 2: 72.0}, {0: 60.0, 1: 61.0, 2: 62.0, 3: 99.0}, tau=1)
    with pytest.raises(ValueError, match=r"\[5\] only in the candidate"):
        equivalent({0: 70.0, 1: 71.0, 5: 72.0}, {0: 60.0, 1: 61.0}, margin=1)


def test_a_negative_tau_is_refused_since_it_would_not_test_non_inferiority():
    with pytest.raises(ValueError, match="tau must be >= 0 points.*non-inferiority"):
        paired([1.0, 2.0], [1.0, 2.0], tau=-1)
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        Claim("01", "C", "s", "e", "paired", -0.5)


def test_zero_spread_grades_on_the_mean_alone():
    assert paired([3.0, 3.0, 3.0], [1.0, 1.0, 1.0], tau=2).grade == REPRODUCED  # mean == tau, se 0
    assert paired([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], tau=0).grade == NOT_REPRODUCED  # interval [0, 0]: no gain
    assert paired([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], tau=1).grade == NOT_REPRODUCED
    assert equivalent([1.0, 1.0], [1.0, 1.0], margin=0).grade == REPRODUCED


def test_a_mean_exactly_at_tau_is_reproduced():
    d = [0.75, 1.25, 1.0, 0.75, 1.25]  # mean exactly 1.0, interval above 0
    v = paired(d, [0.0] * 5, tau=1.0)
    assert v.mean == 1.0 and v.grade == REPRODUCED
    assert paired(d, [0.0] * 5, tau=math.nextafter(1.0, 2.0)).grade == INCONCLUSIVE


def test_an_interval_exactly_at_the_margin_is_equivalent():
    d, zeros = [0.25, 0.5, 0.75], [0.0] * 3
    v = equivalent(d, zeros, margin=10.0)
    margin = abs(v.mean) + verdicts.half_width(v.se, v.n)  # the rule's own edge
    assert equivalent(d, zeros, margin=margin).grade == REPRODUCED
    assert equivalent(d, zeros, margin=math.nextafter(margin, 0.0)).grade == INCONCLUSIVE


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="pair them by seed"):
        paired([1.0, 2.0, 3.0], [1.0, 2.0], tau=1)
    with pytest.raises(ValueError, match="share no seed"):
        paired({0: 1.0}, {1: 1.0}, tau=1)
    with pytest.raises(ValueError, match="NaN"):
        paired([1.0, float("nan")], [1.0, 2.0], tau=1)
    with pytest.raises(ValueError, match="tau must be a finite number"):
        paired([1.0, 2.0], [1.0, 2.0], tau=float("inf"))


DIFFS = st.lists(st.floats(-20, 20).map(lambda x: round(x, 2)), min_size=2, max_size=8)
# a larger effect moves a paired grade only up this order: from "not reproduced" (the interval at or
# below 0) through "inconclusive" (it reaches 0) or "smaller than claimed" (above 0, below tau), which
# may follow each other either way (an interval that leaves 0 may then reach tau), to "reproduced"
RANK = {NOT_REPRODUCED: 0, SMALLER: 1, INCONCLUSIVE: 1, REPRODUCED: 2}


@given(DIFFS, st.floats(0, 5))
def test_the_interval_and_the_test_are_scipys(diffs, tau):
    v = paired(diffs, [0.0] * len(diffs), tau)
    assume(v.se > 1e-6)
    low, high = stats.t.interval(0.95, len(diffs) - 1, loc=np.mean(diffs), scale=stats.sem(diffs))
    assert v.interval == pytest.approx((low, high), rel=1e-9, abs=1e-9)
    p_value = stats.ttest_1samp(diffs, 0.0).pvalue
    assume(abs(p_value - 0.05) > 1e-6)  # away from the edge, where the two computations may round apart
    assert (low > 0 or high < 0) == (p_value < 0.05)
    if v.grade == REPRODUCED:
        assert p_value < 0.05 and np.mean(diffs) > 0 and v.mean >= tau


@given(DIFFS, st.floats(0, 5), st.floats(0, 10))
def test_a_better_candidate_never_grades_worse(diffs, tau, gain):
    zeros = [0.0] * len(diffs)
    before = paired(diffs, zeros, tau).grade
    after = paired([d + gain for d in diffs], zeros, tau).grade
    assert RANK[after] >= RANK[before]


def test_mde_before_the_run():
    assert verdicts.minimum_detectable_effect(2.0, 5) == pytest.approx((2.776 + 0.941) * 2 / math.sqrt(5), rel=1e-3)
    assert verdicts.minimum_detectable_effect(2.0, 1) == math.inf


def test_claim_grades_and_reports_power():
    claim = Claim("01", "C1.1", "SymReg beats the baseline", "primary", "paired", 2.0)
    assert claim.grade(*_three_seeds(3.0, 1.0)).grade == REPRODUCED
    assert "≤ τ/2 = 1: gradable in the book profile" in claim.power_note(sd=0.5, n=5, profile="book")
    assert "underpowered in the book profile" in claim.power_note(sd=10.0, n=3, profile="book")
    with pytest.raises(ValueError, match="rule must be"):
        Claim("01", "C", "s", "e", "better", 1.0)


def test_records_round_trip_through_the_findings_folder(tmp_path):
    claim = Claim("01", "C1.1", "SymReg beats the baseline", "primary", "paired", 2.0)
    verdict = claim.grade(*_three_seeds(3.0, 1.0))
    verdicts.record_claims("01_x", [verdicts.claim_record(claim, verdict, 2.5)], tmp_path)
    verdicts.record_claims("00_y", [verdicts.claim_record(claim, paired({0: 1.0}, {0: 0.0}, 1), 2.5)], tmp_path)
    frame = verdicts.load_findings(tmp_path)
    assert list(frame.grade) == [INCONCLUSIVE, REPRODUCED]  # chapter order
    assert list(frame.chapter_file) == ["00_y", "01_x"]
    assert frame.loc[1, "mean"] == 3.0 and frame.loc[1, "n"] == 3
    assert verdicts.load_findings(tmp_path / "empty").empty


def test_leave_one_out_shows_a_verdict_that_one_seed_decides():
    claim = verdicts.Claim("00", "C0", "A beats B", "acc", "paired", 1.0)
    seed_0_carries_the_mean = {0: 1.3, 1: 1.0, 2: 0.95, 3: 1.0, 4: 0.95}  # mean 1.04 >= tau = 1
    zeros = {seed: 0.0 for seed in seed_0_carries_the_mean}
    assert claim.grade(seed_0_carries_the_mean, zeros).grade == "reproduced"
    loo = verdicts.leave_one_out(claim, seed_0_carries_the_mean, zeros)
    assert loo == {0: "inconclusive", 1: "reproduced", 2: "reproduced", 3: "reproduced", 4: "reproduced"}
    record = {"grade": "reproduced", "leave_one_out": {str(seed): grade for seed, grade in loo.items()}}
    assert verdicts.stability(record) == (4, 5)
    assert verdicts.stability({"grade": "reproduced"}) == (0, 0)


def test_a_relative_claims_tau_is_half_its_share_of_the_room_and_a_bad_share_is_named():
    assert verdicts.relative_tau(0.324, 5.0) == pytest.approx(0.81)
    assert verdicts.relative_tau(0.275, 0.0) == 0.0
    for share in (0.0, 27.5, True):
        with pytest.raises(ValueError, match="share"):
            verdicts.relative_tau(share, 2.0)
    with pytest.raises(ValueError, match="room"):
        verdicts.relative_tau(0.275, math.nan)
    # a claim with less room on the graded seeds than its τ is not gradable
    claim = verdicts.Claim("06", "C", "s", "target", "paired", verdicts.relative_tau(0.5, 4.0))
    verdict = claim.grade([86.0, 86.5, 86.2], [85.5, 85.8, 86.0], ceiling=[86.0, 86.3, 86.5])
    assert verdict.grade == verdicts.NOT_GRADABLE


@given(st.lists(st.floats(-50, 50, allow_nan=False), min_size=2, max_size=8), st.floats(0.1, 10))
def test_a_standardised_effect_ignores_the_unit_and_tracks_the_mean(d, scale):
    assume(np.std(d) > 1e-3 and abs(np.mean(d)) > 1e-6)
    effect = verdicts.standardised_effect(d)
    assert verdicts.standardised_effect([scale * x for x in d]) == pytest.approx(effect, rel=1e-9, abs=1e-9)
    assert np.sign(effect) == np.sign(np.mean(d))
    assert verdicts.standardised_effect(d[:1]) != verdicts.standardised_effect(d[:1])  # NaN for one seed


def test_an_endpoint_is_chosen_among_those_with_room_by_its_weakest_effect():
    from robustq.endpoints import choose_by_effect

    effects = pd.DataFrame({"symreg": [4.0, 1.2, 9.0], "satnl": [0.5, 1.0, float("nan")]}, index=["w3", "w2", "w4"])
    room = pd.Series({"w3": 3.0, "w2": 70.0, "w4": 0.4})
    assert choose_by_effect(effects, room, tau=2.0) == "w2"  # w3's weakest effect is 0.5; w4 has no room
    # with room, w4's missing effect counts as none, whatever its other comparison
    assert choose_by_effect(effects, room.replace(0.4, 5.0), tau=2.0) == "w2"
    with pytest.raises(ValueError, match="no candidate endpoint has a headroom of at least tau = 80"):
        choose_by_effect(effects, room, tau=80.0)
