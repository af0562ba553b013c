"""The claim rules (bnext.experiments.analysis) on hand-made summaries and records, and the measurements
they rest on (line-probe companions, probe-batch drift, Theorem 4.1 per-layer figures) against naive
float64 references written here.

Every rule is pinned both ways and in between: each test builds the case that reproduces, the mirror case
that does not (the same numbers with the roles swapped, so that reversing any comparison in a rule fails
here), the case inside the seed spread (inconclusive) and the exact tie (a difference equal to the margin
counts as a tie)."""
import math
import statistics

import pytest
import torch

from bnext.experiments import analysis, common, measure, train
from bnext.experiments.analysis import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, Grid, Stat

SEEDS = (0, 1, 2)


def _summary(norm, lr, seed=0, **kw):
    s = {"spec": {"norm": norm, "lr": lr, "seed": seed, "group": "main", "steps": 100, "measure": True},
         "run_id": f"main-{norm}-lr{lr:g}-s{seed}", "diverged": False, "diverged_step": None,
         "final_loss": 1.0, "initial_loss": 2.3, "final_acc": 0.5, "acc_q3": 0.5, "acc_q4": 0.5,
         "drift_rel": 0.1, "ics_cosine": 0.5, "ics_l2": 1.0, "kurtosis": 0.1, "kurtosis_pooled": 0.1,
         "loss_range": 1.0, "grad_pred": 1.0, "grad_pred_top": 1.0, "beta": 1.0,
         "thm41_max_rel_err": 1e-6, "thm41_measurements": 3}
    s.update(kw)
    return s


def _seeds(norm, lr=0.1, **kw):
    """One summary per seed of SEEDS; a list value gives each seed its own value, a scalar all the same."""
    return [_summary(norm, lr, sd, **{k: (v[i] if isinstance(v, list) else v) for k, v in kw.items()})
            for i, sd in enumerate(SEEDS)]


def _around(mean, half=0.01):
    """Three seed values mean - half, mean, mean + half: seed std exactly `half`."""
    return [mean - half, mean, mean + half]


STUCK = dict(final_loss=2.25, initial_loss=2.3)  # 0.978 x the first loss: never left the plateau


# ------------------------------------------------------------------------------------------------
# The noise rule
# ------------------------------------------------------------------------------------------------

def test_compare_counts_a_difference_only_beyond_the_larger_seed_spread():
    a, b = Stat(_around(1.0, 0.1)), Stat(_around(1.5, 0.2))   # spreads 0.1 and 0.2
    assert analysis.margin(a, b) == pytest.approx(0.2)
    assert analysis.compare(a, b) == -1 and analysis.compare(b, a) == 1
    assert analysis.compare(Stat(_around(1.0, 0.1)), Stat(_around(1.15, 0.2))) == 0   # inside
    # a difference equal to the margin is a tie (strict >): half = 0.25 -> std 0.25, diff 0.25
    assert analysis.compare(Stat([0.75, 1.0, 1.25]), Stat([1.25, 1.25, 1.25])) == 0
    assert analysis.compare(Stat([0.75, 1.0, 1.25]), Stat([1.2500001] * 3)) == -1
    # one seed each: no spread measured, nothing decided (not a fixed percentage)
    assert analysis.compare(Stat([1.0]), Stat([100.0])) is None
    assert analysis.margin(Stat([1.0]), Stat([2.0])) is None
    # one side with seeds gives the spread
    assert analysis.compare(Stat([1.0]), Stat(_around(3.0, 0.5))) == -1
    # diverged seeds (+inf): all of one side above every finite side; mixed: undecided
    inf = math.inf
    assert analysis.compare(Stat([inf] * 3), Stat(_around(1.0))) == 1
    assert analysis.compare(Stat(_around(1.0)), Stat([inf] * 3)) == -1
    assert analysis.compare(Stat([inf] * 3), Stat([inf] * 3)) == 0
    assert analysis.compare(Stat([inf, 1.0, 1.0]), Stat(_around(2.0))) is None
    assert analysis.compare(Stat([]), Stat(_around(2.0))) is None
    # against a fixed level: the side's own spread
    assert analysis.compare_to(Stat(_around(0.95, 0.01)), 0.9) == 1
    assert analysis.compare_to(Stat(_around(0.85, 0.01)), 0.9) == -1
    assert analysis.compare_to(Stat(_around(0.91, 0.01)), 0.9) == 0
    assert analysis.compare_to(Stat([0.99]), 0.9) is None


def test_verdict_text_shows_how_many_seeds_agree():
    a = Stat([1.0, 1.0, 3.0], [0, 1, 2])
    b = Stat([2.0, 2.0, 2.0], [0, 1, 2])
    assert analysis.agreeing(a, b, -1) == "2/3 seeds"
    assert analysis.agreeing(a, b, 1) == "1/3 seeds"
    assert "2/3 seeds the same way" in analysis.versus(a, b)
    assert "one seed" in analysis.versus(Stat([1.0], [0]), Stat([2.0], [0]))


def test_majority_of_votes():
    T, F, N = True, False, None
    assert analysis._majority([T, T, T, F, F]) is True
    assert analysis._majority([F, F, F, T, T]) is False
    assert analysis._majority([T, T, N, F, N]) is None   # 2 of 5 is no majority
    assert analysis._majority([T, T, F, F]) is None       # a tie
    assert analysis._combine([T, T]) == REPRODUCED and analysis._combine([T, F]) == NOT_REPRODUCED
    assert analysis._combine([T, N]) == INCONCLUSIVE and analysis._combine([]) == INCONCLUSIVE


# ------------------------------------------------------------------------------------------------
# Claim 1 and the trained gate
# ------------------------------------------------------------------------------------------------

def test_trained_gate_threshold_is_mean_of_last_tenth_against_first_loss():
    assert analysis._trained(_summary("none", 0.1, final_loss=0.9 * 2.3, initial_loss=2.3))
    assert not analysis._trained(_summary("none", 0.1, final_loss=0.901 * 2.3, initial_loss=2.3))
    assert not analysis._trained(_summary("none", 0.1, diverged=True, final_loss=None))
    steps = 50
    losses = [2.0] * 45 + [1.7, 1.8, 1.9, 1.8, 1.8]  # last 5 steps: mean 1.8 = 0.9 x 2.0
    recs = [{"type": "train", "step": t, "loss": v, "acc": 0.1} for t, v in enumerate(losses)]
    s = analysis.summarize_run(recs, {}, steps)
    assert s["final_loss"] == pytest.approx(statistics.mean(losses[45:]))
    assert s["initial_loss"] == 2.0 and s["trained"]
    recs[-1]["loss"] = 1.9
    assert not analysis.summarize_run(recs, {}, steps)["trained"]


def test_claim1_both_ways_inside_the_spread_and_tied():
    def verdict(bn, none):
        return analysis.claim1(Grid(_seeds("bn", final_loss=bn) + _seeds("none", final_loss=none), {}), [0.1]).verdict
    assert verdict(_around(0.5), _around(1.5)) == REPRODUCED
    assert verdict(_around(1.5), _around(0.5)) == NOT_REPRODUCED
    assert verdict(_around(1.0, 0.2), _around(1.1, 0.2)) == INCONCLUSIVE
    assert verdict([0.75, 1.0, 1.25], [1.25] * 3) == INCONCLUSIVE    # diff 0.25 = margin: a tie
    # one seed: no spread, inconclusive however large the gap
    one = [_summary("bn", 0.1, final_loss=0.1), _summary("none", 0.1, final_loss=1.5)]
    c = analysis.claim1(Grid(one, {}), [0.1])
    assert c.verdict == INCONCLUSIVE and "no spread" in c.measured
    # the text carries the seed agreement
    assert "3/3 seeds" in analysis.claim1(Grid(_seeds("bn", final_loss=_around(0.5))
                                               + _seeds("none", final_loss=_around(1.5)), {}), [0.1]).measured
    # a BN seed that diverged fails the row
    bad = _seeds("bn", final_loss=_around(0.5), diverged=[False, True, False]) + _seeds("none", final_loss=1.5)
    assert analysis.claim1(Grid(bad, {}), [0.1]).verdict == NOT_REPRODUCED


def test_claim1_largest_lr_counts_a_stuck_plain_net_only_if_it_trained_below():
    runs = (_seeds("bn", 0.1, final_loss=_around(0.5)) + _seeds("bn", 0.5, final_loss=_around(0.7))
            + _seeds("none", 0.5, **STUCK))
    good = runs + _seeds("none", 0.1, final_loss=_around(1.5))
    assert analysis.claim1(Grid(good, {}), [0.1, 0.5]).verdict == REPRODUCED
    stuck = runs + _seeds("none", 0.1, **STUCK)
    assert analysis.claim1(Grid(stuck, {}), [0.1, 0.5]).verdict == INCONCLUSIVE
    # at a smaller LR the gate makes a stuck baseline inconclusive, whatever BN does
    c = analysis.claim1(Grid(_seeds("bn", final_loss=_around(0.5)) + _seeds("none", **STUCK), {}), [0.1])
    assert c.verdict == INCONCLUSIVE and "baseline did not train" in c.measured
    # one stuck seed among trained ones is enough
    mixed = _seeds("bn", final_loss=_around(0.5)) + _seeds("none", final_loss=[1.5, 2.25, 1.5])
    assert "1/3 seeds" in analysis.claim1(Grid(mixed, {}), [0.1]).measured


def test_claim_lr_sweep_both_ways_and_the_tie_at_the_top():
    def grid(bn_lim, none_lim):
        runs = []
        for n, lim in (("bn", bn_lim), ("none", none_lim)):
            for lr in (0.1, 1.0, 10.0):
                runs += [dict(r, spec=dict(r["spec"], group="sweep")) for r in
                         _seeds(n, lr, final_loss=1.0, diverged=(lim is None or lr > lim))]
        return Grid(runs, {})
    assert analysis.largest_stable_lr(grid(1.0, 0.1), "bn") == 1.0
    assert analysis.claim_lr_sweep(grid(1.0, 0.1), ["bn", "none"]).verdict == REPRODUCED
    assert analysis.claim_lr_sweep(grid(0.1, 1.0), ["bn", "none"]).verdict == NOT_REPRODUCED
    assert analysis.claim_lr_sweep(grid(1.0, 1.0), ["bn", "none"]).verdict == NOT_REPRODUCED   # equal is not larger
    assert analysis.claim_lr_sweep(grid(10.0, 10.0), ["bn", "none"]).verdict == INCONCLUSIVE  # both at the top
    assert analysis.claim_lr_sweep(grid(0.1, None), ["bn", "none"]).verdict == REPRODUCED
    assert analysis.claim_lr_sweep(grid(None, 0.1), ["bn", "none"]).verdict == NOT_REPRODUCED


def test_claim_curvature_both_ways_and_tied():
    def verdict(bn, none):
        return analysis.claim_curvature(Grid(_seeds("bn", hessian_top=bn) + _seeds("none", hessian_top=none), {}),
                                        0.1).verdict
    assert verdict(_around(5.0), _around(50.0)) == REPRODUCED
    assert verdict(_around(50.0), _around(5.0)) == NOT_REPRODUCED
    assert verdict(_around(-50.0), _around(5.0)) == NOT_REPRODUCED       # magnitudes are compared
    assert verdict([4.0, 5.0, 6.0], [6.0, 6.0, 6.0]) == INCONCLUSIVE      # diff = margin
    assert verdict(_around(5.0, 10.0), _around(8.0)) == INCONCLUSIVE


# ------------------------------------------------------------------------------------------------
# Claim 2 and its second half
# ------------------------------------------------------------------------------------------------

def _claim2(bn_q4, noisy_q4, bn_q3=None, noisy_q3=None, noisy_half=None, none_half=0.3, drift=(1.0, 0.1)):
    bn = _seeds("bn", acc_q3=bn_q3 or bn_q4, acc_q4=bn_q4)
    noisy = _seeds("noisy_bn", acc_q3=noisy_q3 or noisy_q4, acc_q4=noisy_q4)
    none = _seeds("none", acc_q3=none_half, acc_q4=none_half)
    for runs, d in ((noisy, drift[0]), (none, drift[1])):
        if d is not None:
            for r, v in zip(runs, _around(d, 0.01)):
                r.update(drift_probe=v, drift_floor=0.5)
    return analysis.claim2(Grid(bn + noisy + none, {}), 0.1)


def test_claim2_as_well_as_bn_within_the_spread_and_not_beyond_it():
    assert _claim2(_around(0.90), _around(0.895)).verdict == REPRODUCED     # inside the spread
    assert _claim2(_around(0.90), _around(0.95)).verdict == REPRODUCED      # better than BN
    assert _claim2(_around(0.90), _around(0.80)).verdict == NOT_REPRODUCED  # worse, gap not closing
    # worse at the end but the gap is closing beyond the margin: slower, not shown worse
    c = _claim2(_around(0.90), _around(0.80), bn_q3=_around(0.85), noisy_q3=_around(0.60))
    assert c.verdict == INCONCLUSIVE and "shrinking" in c.measured
    # a gap that grows is worse
    assert _claim2(_around(0.90), _around(0.70), bn_q3=_around(0.85), noisy_q3=_around(0.80)).verdict == NOT_REPRODUCED
    # exactly the margin: a tie, so "as well as" holds
    assert _claim2([0.25, 0.5, 0.75], [0.25] * 3, none_half=0.1).verdict == REPRODUCED
    assert "eval mode" in c.rule


def test_claim2_noisy_must_beat_the_plain_network_and_drift_more():
    assert _claim2(_around(0.9), _around(0.9), none_half=0.95).verdict == NOT_REPRODUCED
    assert _claim2(_around(0.9), _around(0.9), drift=(0.1, 1.0)).verdict == NOT_REPRODUCED
    assert _claim2(_around(0.9), _around(0.9), drift=(0.105, 0.1)).verdict == INCONCLUSIVE   # inside the spread
    # without the probe-batch drift the drift part is not decided by the per-step output statistic
    c = _claim2(_around(0.9), _around(0.9), drift=(None, None))
    assert c.verdict == INCONCLUSIVE and "not recorded" in c.measured
    c = _claim2(_around(0.9), _around(0.9))
    assert c.verdict == REPRODUCED and "sampling floor" in c.measured


def test_claim2_plain_noise_both_ways():
    def verdict(noise, none, **kw):
        return analysis.claim2_plain_noise(Grid(_seeds("noise", final_loss=noise) + _seeds("none", final_loss=none,
                                                                                           **kw), {}), 0.1).verdict
    assert verdict(_around(2.1), _around(1.6)) == REPRODUCED
    assert verdict(_around(1.4), _around(1.9)) == NOT_REPRODUCED
    assert verdict(_around(1.6, 0.2), _around(1.7, 0.2)) == INCONCLUSIVE
    assert verdict([1.5, 1.75, 2.0], [1.5] * 3) == INCONCLUSIVE   # diff 0.25 = margin
    runs = _seeds("noise", final_loss=1.0, diverged=True) + _seeds("none", final_loss=_around(1.6))
    assert analysis.claim2_plain_noise(Grid(runs, {}), 0.1).verdict == REPRODUCED
    assert verdict(_around(2.3), 2.25, initial_loss=2.3) == INCONCLUSIVE   # the plain network did not train


# ------------------------------------------------------------------------------------------------
# Claim 3
# ------------------------------------------------------------------------------------------------

def test_claim3_vgg_both_ways_and_tied():
    def verdict(bn, none, **kw):
        return analysis.claim3_vgg(Grid(_seeds("bn", ics_cosine=bn) + _seeds("none", ics_cosine=none, **kw), {}),
                                   [0.1]).verdict
    assert verdict(_around(0.3), _around(0.8)) == REPRODUCED
    assert verdict(_around(0.9), _around(0.3)) == NOT_REPRODUCED
    assert verdict(_around(0.85), _around(0.8)) == INCONCLUSIVE          # at the edge of the 0.05 band
    assert verdict(_around(0.82), _around(0.8)) == REPRODUCED            # above, but by less than 0.05
    assert verdict([0.25, 0.5, 0.75], [0.2] * 3) == INCONCLUSIVE         # BN - (none + 0.05) = 0.25 = the margin
    assert verdict(_around(0.3), _around(0.8), **STUCK) == INCONCLUSIVE


def test_claim3_pools_layers_from_2_and_leaves_layer_1_out():
    cos = {0: [1.0, 0.30, 0.40], 5: [1.0, 0.35, 0.20]}  # layer #1 has G' = G: cosine 1
    recs = []
    for t in range(10):
        if t in cos:
            recs.append({"type": "measure", "step": t, "ics": [{"cosine": c, "l2": 1 - c} for c in cos[t]]})
        recs.append({"type": "train", "step": t, "loss": 2.0 - 0.1 * t})
    s = analysis.summarize_run(recs, {}, 10)
    assert s["ics_cosine"] == pytest.approx(statistics.median([0.30, 0.40, 0.35, 0.20]))
    assert s["ics_layers"]["1"]["cosine"] == 1.0  # still shown per layer
    bns = [dict(s, spec={"norm": "bn", "lr": 0.1, "seed": sd, "group": "main", "steps": 10, "measure": True},
                ics_cosine=s["ics_cosine"] + d) for sd, d in zip(SEEDS, (-0.01, 0, 0.01))]
    c = analysis.claim3_vgg(Grid(bns + _seeds("none", ics_cosine=_around(0.9), ics_layers={"2": {"cosine": 0.8}}),
                                 {}), [0.1])
    assert c.verdict == REPRODUCED and "#2 0.325/0.800" in c.measured   # the per-layer table
    assert analysis.claim3_vgg(Grid(bns + _seeds("none", ics_cosine=_around(0.1)), {}), [0.1]).verdict == NOT_REPRODUCED


def test_claim3_dln_both_ways_and_tied():
    def verdict(bn, none):
        return analysis.claim3_dln(Grid(_seeds("bn", 1e-7, ics_cosine=bn) + _seeds("none", 1e-7, ics_cosine=none),
                                        {}), [1e-7]).verdict
    assert verdict(_around(0.2), _around(0.99, 0.001)) == REPRODUCED
    assert verdict(_around(0.2), _around(0.5)) == NOT_REPRODUCED          # the plain network is not near 1
    assert verdict(_around(0.995, 0.001), _around(0.99, 0.001)) == NOT_REPRODUCED   # BN higher
    assert verdict(_around(0.2), _around(0.9, 0.05)) == INCONCLUSIVE      # none at the threshold within its spread
    assert verdict([0.9375] * 3, [0.9375, 0.96875, 1.0]) == INCONCLUSIVE   # BN lower by exactly the margin
    # seeds that disagree completely (0.93 and 0.04) decide nothing
    assert verdict(_around(0.2), [0.93, 0.04, 0.5]) == INCONCLUSIVE


# ------------------------------------------------------------------------------------------------
# Claim 4: by phase, points where both networks are making progress, five votes
# ------------------------------------------------------------------------------------------------

def _records(losses, meas):
    """train records with the given losses, and measure records {step: probe dict}."""
    recs = []
    for t, v in enumerate(losses):
        if t in meas:
            recs.append({"type": "measure", "step": t, "probe": meas[t]})
        recs.append({"type": "train", "step": t, "loss": v, "acc": 0.5})
    return recs


def _probe(v, g=1.0, rel=None):
    rel = v if rel is None else rel
    return {"loss_range": v, "grad_pred": v / 2, "grad_pred_top": v, "beta": v, "grad_pred_rel": rel,
            "loss_range_rel": rel, "grad_norm": g}


def test_progress_gate_is_recent_progress_not_distance_from_the_first_loss():
    steps = 100
    # falls from 2.0 to 0.5 by step 50, then parked at 0.5 (with scatter): far below its first loss, no progress
    losses = [2.0 - 0.03 * t for t in range(50)] + [0.5 + 0.01 * (-1) ** t for t in range(50)]
    meas = {t: _probe(1.0) for t in (0, 20, 40, 60, 80, 99)}
    s = analysis.summarize_run(_records(losses, meas), {}, steps)
    flags = {p["step"]: p["training"] for p in s["probe_points"]}
    assert flags == {0: False, 20: True, 40: True, 60: False, 80: False, 99: False}
    # against a naive two-window test written here
    w = 5
    for t, f in flags.items():
        cur, prev = losses[max(0, t - w + 1):t + 1], losses[max(0, t - 2 * w + 1):max(0, t - w + 1)]
        if len(cur) < 2 or len(prev) < 2:
            assert not f
            continue
        se = math.sqrt(statistics.variance(cur) / len(cur) + statistics.variance(prev) / len(prev))
        assert f == (statistics.mean(prev) - statistics.mean(cur) > 2 * se)


def _claim4_runs(bn_vals, none_vals, steps=100, bn_rel=None, none_rel=None):
    """Three seed pairs; both networks make progress at every measurement point (a loss falling by 0.01 per
    step); bn_vals/none_vals: {step: value} of the raw measures, rel: of the scale-free ones."""
    losses = [3.0 - 0.01 * t for t in range(steps)]
    runs = []
    for norm, vals, rel in (("bn", bn_vals, bn_rel), ("none", none_vals, none_rel)):
        for i, sd in enumerate(SEEDS):
            meas = {t: _probe(v * (1 + 0.01 * (i - 1)), rel=None if rel is None else rel[t] * (1 + 0.01 * (i - 1)))
                    for t, v in vals.items()}
            s = analysis.summarize_run(_records(losses, meas), {}, steps)
            s.update(spec={"norm": norm, "lr": 0.1, "seed": sd, "group": "main", "steps": steps, "measure": True},
                     final_loss=2.0, initial_loss=3.0)
            runs.append(s)
    return Grid(runs, {})


def test_claim4_decides_early_and_late_separately():
    early, late = (20, 30, 40), (60, 70, 80)
    # BN smoother early, rougher late
    bn = {**{t: 1.0 for t in early}, **{t: 10.0 for t in late}}
    none = {t: 5.0 for t in early + late}
    rows = analysis.claim4(_claim4_runs(bn, none), 0.1)
    assert [r.id for r in rows] == ["4 (early)", "4 (late)"]
    assert [r.verdict for r in rows] == [REPRODUCED, NOT_REPRODUCED]
    assert "beta*LR/2" in rows[0].measured and "3/3/3 points" in rows[0].measured
    # the mirror image
    rows = analysis.claim4(_claim4_runs(none, bn), 0.1)
    assert [r.verdict for r in rows] == [NOT_REPRODUCED, REPRODUCED]
    # equal landscapes: inside the spread
    rows = analysis.claim4(_claim4_runs(none, none), 0.1)
    assert [r.verdict for r in rows] == [INCONCLUSIVE, INCONCLUSIVE]


def test_claim4_scale_free_companions_vote():
    pts = (20, 30, 60, 70)
    # raw measures say BN smoother (3 votes), scale-free say rougher (2 votes): majority for
    bn, none = {t: 1.0 for t in pts}, {t: 5.0 for t in pts}
    rows = analysis.claim4(_claim4_runs(bn, none, bn_rel={t: 5.0 for t in pts}, none_rel={t: 1.0 for t in pts}), 0.1)
    assert rows[0].verdict == REPRODUCED and "3 for, 2 against" in rows[0].measured
    # raw equal (no vote), scale-free say rougher: 2 against of 5 is no majority -> inconclusive
    rows = analysis.claim4(_claim4_runs(none, none, bn_rel={t: 5.0 for t in pts}, none_rel={t: 1.0 for t in pts}), 0.1)
    assert rows[0].verdict == INCONCLUSIVE and "0 for, 2 against" in rows[0].measured


def test_claim4_no_point_with_both_progressing_or_a_stuck_baseline_is_inconclusive():
    steps = 100
    grid = _claim4_runs({t: 1.0 for t in (20, 70)}, {t: 5.0 for t in (20, 70)})
    for r in grid.get("none", 0.1):
        for p in r["probe_points"]:
            p["training"] = p["step"] > 50     # the plain network progresses only late
    rows = analysis.claim4(grid, 0.1)
    assert rows[0].verdict == INCONCLUSIVE and "no measurement point" in rows[0].measured
    assert rows[1].verdict == REPRODUCED
    for r in grid.get("none", 0.1):
        r.update(STUCK)
    assert all(r.verdict == INCONCLUSIVE and "baseline did not train" in r.measured
               for r in analysis.claim4(grid, 0.1))
    assert steps == grid.get("bn", 0.1)[0]["spec"]["steps"]


# ------------------------------------------------------------------------------------------------
# Claim 5
# ------------------------------------------------------------------------------------------------

def _claim5(lp_acc=None, lp_loss=None, lp_kurt=None, lp_drift=1.0, lp_smooth=1.0, none_loss=None, drift_pinned=None):
    pts = (20, 30, 60, 70)
    grid = _claim4_runs({t: 1.0 for t in pts}, {t: 5.0 for t in pts})   # supplies bn and none with probe points
    bn, none = grid.get("bn", 0.1), grid.get("none", 0.1)
    lps = []
    for p in ("l1", "l2", "linf"):
        g = _claim4_runs({t: lp_smooth for t in pts}, {t: 5.0 for t in pts})
        for r in g.get("bn", 0.1):
            r = dict(r, spec=dict(r["spec"], norm=p))
            lps.append(r)
    for runs, kw in ((bn, dict(final_acc=_around(0.9), final_loss=_around(0.3), kurtosis_pooled=_around(0.1),
                               drift_probe=_around(0.01, 0.001))),
                     (none, dict(final_acc=_around(0.5), final_loss=none_loss or _around(1.5),
                                 kurtosis_pooled=_around(0.5), drift_probe=_around(0.1, 0.001))),
                     (lps, dict(final_acc=lp_acc or _around(0.9), final_loss=lp_loss or _around(0.35),
                                kurtosis_pooled=lp_kurt or _around(1.0), drift_probe=_around(lp_drift, 0.001)))):
        for i, r in enumerate(runs):
            r.update({k: v[i % 3] for k, v in kw.items()})
            r["drift_floor"] = 0.05
    return analysis.claim5(Grid(bn + none + lps, {}), 0.1, drift_pinned=drift_pinned)


def test_claim5_each_part_both_ways():
    assert _claim5().verdict == REPRODUCED
    assert _claim5(lp_acc=_around(0.7)).verdict == NOT_REPRODUCED               # trains worse than BN
    assert _claim5(lp_acc=_around(0.895)).verdict == REPRODUCED                 # within the spread: as well as
    assert _claim5(lp_loss=_around(1.8)).verdict == NOT_REPRODUCED              # not better than the plain net
    assert _claim5(lp_loss=_around(1.5, 0.2)).verdict == INCONCLUSIVE           # inside the spread
    assert _claim5(lp_kurt=_around(0.05)).verdict == NOT_REPRODUCED             # more Gaussian than BN
    assert _claim5(lp_kurt=[0.09, 0.1, 0.11]).verdict == INCONCLUSIVE           # the same
    assert _claim5(lp_drift=0.01).verdict == NOT_REPRODUCED                     # drifts less than the plain net
    assert _claim5(lp_smooth=20.0).verdict == NOT_REPRODUCED                    # rougher landscape
    c = _claim5()
    assert "l1:" in c.measured and "sampling floor" in c.measured and "votes" in c.measured
    # where the normalization pins the next layer's input (the DLN), the drift part is not decided
    c = _claim5(drift_pinned="pinned")
    assert c.verdict == INCONCLUSIVE and "not decided: pinned" in c.measured


def test_claim5_compares_losses_where_there_is_no_accuracy():
    # the DLN records no accuracy: "as well as BN" compares final losses with their spread, not a ratio
    grid = Grid([dict(r, final_acc=None) for r in _seeds("bn", final_loss=_around(1e4, 100))]
                + [dict(r, final_acc=None) for r in _seeds("l1", final_loss=_around(1.2e4, 100))], {})
    part, text = analysis._as_well_as(grid.get("l1", 0.1), grid.get("bn", 0.1))
    assert part is False and "final loss" in text
    grid = Grid([dict(r, final_acc=None) for r in _seeds("bn", final_loss=_around(1e4, 100))]
                + [dict(r, final_acc=None) for r in _seeds("l1", final_loss=_around(1.005e4, 100))], {})
    assert analysis._as_well_as(grid.get("l1", 0.1), grid.get("bn", 0.1))[0] is True


# ------------------------------------------------------------------------------------------------
# Claim 6: the theorem's content, decided either way; the identity is a kernel test
# ------------------------------------------------------------------------------------------------

def _claim6(ratios, err=1e-6):
    """ratios: {layer: [per-seed ||dL/dy||^2/||g||^2]}."""
    runs = [_summary("bn", 0.1, sd, thm41_max_rel_err=err,
                     thm41_layers={k: {"grad_ratio": v[i], "gamma2_over_sigma2": 1.5, "removed_fraction": 0.01}
                                   for k, v in ratios.items()}) for i, sd in enumerate(SEEDS)]
    return analysis.claim6(Grid(runs, {}), 0.1)


def test_claim6_decides_whether_bn_shrinks_the_gradient_either_way():
    assert _claim6({"a": _around(0.5), "b": _around(0.6), "c": _around(2.0)}).verdict == REPRODUCED
    assert _claim6({"a": _around(2.0), "b": _around(1.6), "c": _around(0.5)}).verdict == NOT_REPRODUCED
    assert _claim6({"a": _around(1.0, 0.3), "b": _around(0.5), "c": _around(2.0)}).verdict == INCONCLUSIVE
    # one seed: no spread, undecided
    one = analysis.claim6(Grid([_summary("bn", 0.1, thm41_layers={"a": {"grad_ratio": 0.1}})], {}), 0.1)
    assert one.verdict == INCONCLUSIVE
    # an instrument that breaks the identity decides nothing
    c = _claim6({"a": _around(0.5)}, err=1e-2)
    assert c.verdict == INCONCLUSIVE and "does not satisfy the identity" in c.measured
    # older summaries: the product of gamma^2/sigma^2 and the kept share
    old = [_summary("bn", 0.1, sd, thm41_layers={"a": {"gamma2_over_sigma2": g, "removed_fraction": 0.5}})
           for sd, g in zip(SEEDS, _around(3.0, 0.1))]   # 1.5 > 1
    assert analysis.claim6(Grid(old, {}), 0.1).verdict == NOT_REPRODUCED


def test_bnext_batch_norm_backward_satisfies_the_theorem41_identity():
    """The identity ||dL/dy||^2 = (gamma^2/sigma^2)(||g||^2 - <1,g>^2/m - <g,yhat>^2/m) holds for any correct
    BatchNorm backward: a test of bnext's kernels (float64), not a claim about training."""
    import bnext
    from bnext import landscape
    torch.manual_seed(3)
    model = bnext.nn.convert(torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6),
                                                 torch.nn.Tanh()), to="bn").double()
    with torch.no_grad():
        model[1].weight.copy_(torch.linspace(0.3, 2.5, 6))
    x = torch.randn(5, 3, 7, 7, dtype=torch.float64)
    tracker = landscape.track_bn_gradients(model)
    (model(x) ** 3).sum().backward()
    res = landscape.bn_gradient_identity(model)
    tracker.remove()
    assert res, "no BN layer was tracked"
    for r in res.values():
        assert float(r.rel_error.max()) < 1e-10
        # and the identity is not vacuous: a gradient off by a factor of 1.01 breaks it
        assert float(((1.0201 * r.lhs - r.rhs).abs() / r.rhs.abs()).min()) > 1e-3


# ------------------------------------------------------------------------------------------------
# Drift on the fixed probe batch
# ------------------------------------------------------------------------------------------------

def test_probe_drift_matches_a_naive_per_channel_formula_and_reports_the_floor():
    m0, s0 = [0.0, 1.0, 5.0], [1.0, 2.0, 0.0]      # channel 2 has no scale: left out
    m1, s1 = [0.5, 1.0, 7.0], [1.0, 3.0, 1.0]
    m2, s2 = [0.5, 2.0, 7.0], [2.0, 3.0, 1.0]
    meas = [{"type": "measure", "step": t, "probe_stats": {"L": {"mean": m, "std": s, "floor": f}}}
            for t, m, s, f in ((0, m0, s0, 0.1), (10, m1, s1, 0.2), (20, m2, s2, 0.3))]
    got = analysis._probe_drift(meas)
    d01 = (0.5 / 1 + 0) / 2 + (0 + 1.0 / 2) / 2
    d12 = ((0 + 1.0 / 1) + (1.0 / 3 + 0)) / 3     # every channel has scale at step 10
    assert got["drift_probe"] == pytest.approx((d01 + d12) / 2)
    assert got["drift_floor"] == pytest.approx(0.2)
    # scale-free: the same relative moves at 1000x the scale read the same
    big = [{"type": "measure", "step": r["step"], "probe_stats": {"L": {
        "mean": [1000 * v for v in r["probe_stats"]["L"]["mean"]], "std": [1000 * v for v in r["probe_stats"]["L"]["std"]],
        "floor": 0.2}}} for r in meas]
    assert analysis._probe_drift(big)["drift_probe"] == pytest.approx(got["drift_probe"])


def test_probe_stats_read_the_next_layers_input_and_leave_the_model_as_it_was():
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(),
                                torch.nn.Linear(4, 2)).double()
    x = torch.randn(16, 3, dtype=torch.float64)

    class Task:
        def ics_layers(self, m):
            return ["0", "3"]

        def loss_fn(self, m, b):
            return m(b).sum()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = train.probe_stats(Task(), model, x)
    assert set(got) == {"3"}                        # the first weight layer's input is the data: not a drift point
    h = torch.relu(torch.nn.functional.batch_norm(model[0](x), None, None, model[1].weight, model[1].bias,
                                                  training=True, eps=model[1].eps)).detach()
    assert got["3"]["mean"] == pytest.approx(h.mean(0).tolist(), abs=1e-12)
    assert got["3"]["std"] == pytest.approx(h.std(0, unbiased=False).tolist(), abs=1e-12)
    a, b = h[:8], h[8:]
    sa = a.std(0, unbiased=False)
    keep = sa > 0
    floor = ((b.mean(0) - a.mean(0)).abs() / sa + (b.std(0, unbiased=False) - sa).abs() / sa)[keep].mean()
    assert got["3"]["floor"] == pytest.approx(float(floor), rel=1e-12)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k       # running statistics restored


# ------------------------------------------------------------------------------------------------
# Measurements the rules rest on
# ------------------------------------------------------------------------------------------------

def test_line_probe_records_the_band_top_and_scale_free_companions():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)

    def loss_fn(m, b):
        return ((m(b[0]) - b[1]) ** 2).mean()
    etas = [0.05, 0.2, 0.8]
    rec = measure.line_probe(model, loss_fn, (x, y), etas)
    # naive reference: autograd at x and at each x - eta g
    params = list(model.parameters())
    g = torch.autograd.grad(loss_fn(model, (x, y)), params)
    gn = math.sqrt(sum(float((t ** 2).sum()) for t in g))
    diffs, losses = [], []
    for e in etas:
        with torch.no_grad():
            for p, t in zip(params, g):
                p.sub_(e * t)
        L = loss_fn(model, (x, y))
        g2 = torch.autograd.grad(L, params)
        losses.append(float(L.detach()))
        diffs.append(math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(g2, g))))
        with torch.no_grad():
            for p, t in zip(params, g):
                p.add_(e * t)
    assert rec["grad_norm"] == pytest.approx(gn, rel=1e-9)
    assert rec["grad_pred_top"] == pytest.approx(max(diffs), rel=1e-9)
    assert rec["grad_pred"] == pytest.approx(max(diffs) - min(diffs), rel=1e-7)
    assert rec["grad_pred_rel"] == pytest.approx(max(diffs) / gn, rel=1e-9)
    assert rec["loss_range_rel"] == pytest.approx((max(losses) - min(losses)) / (max(etas) * gn ** 2), rel=1e-7)


def _naive_excess_kurtosis(v: torch.Tensor) -> float:
    v = v.double().reshape(-1)
    d = v - v.mean()
    return float((d ** 4).mean() / (d ** 2).mean() ** 2 - 3)


def _monitored_summary(x: torch.Tensor, norm: str):
    """One measured step of an identity 'layer' that emits x, through ActivationMonitor -> summarize_run."""
    layer = torch.nn.Identity()
    mon = common.ActivationMonitor({"layer": layer}, {"layer": 3})
    mon.active = mon.capture = True
    layer(x)
    acts, hists = mon.take()
    mon.remove()
    recs = [{"type": "measure", "step": 0, "hist": hists}, {"type": "train", "step": 0, "loss": 2.0, **acts}]
    s = analysis.summarize_run(recs, {}, 1)
    s.update(spec={"norm": norm, "lr": 0.1, "seed": 0, "group": "main", "steps": 1, "measure": True},
             final_loss=0.5, initial_loss=2.0, drift_rel=1.0)
    return s, hists["3"]


def test_pooled_kurtosis_differs_where_per_channel_kurtosis_cannot():
    torch.manual_seed(0)
    z = torch.randn(64, 16, 8, 8)
    bn_like = z                                                    # every channel N(0, 1)
    scales = torch.logspace(-0.7, 0.7, 16).reshape(1, 16, 1, 1)    # the same z, per-channel std 0.2..5
    lp_like = z * scales + torch.linspace(-1, 1, 16).reshape(1, 16, 1, 1) * 0.01
    bn, h_bn = _monitored_summary(bn_like, "bn")
    lp, h_lp = _monitored_summary(lp_like, "l1")
    assert h_bn["kurtosis_layer"] == pytest.approx(_naive_excess_kurtosis(bn_like), abs=1e-6)
    assert h_lp["kurtosis_layer"] == pytest.approx(_naive_excess_kurtosis(lp_like), abs=1e-6)
    per_channel = [statistics.mean(_naive_excess_kurtosis(t[:, c]) for c in range(16)) for t in (bn_like, lp_like)]
    assert h_bn["kurtosis_channel"] == pytest.approx(per_channel[0], abs=1e-6)
    assert h_lp["kurtosis_channel"] == pytest.approx(per_channel[1], abs=1e-4)
    assert h_lp["kurtosis_channel"] == pytest.approx(h_bn["kurtosis_channel"], abs=1e-4)
    assert h_lp["kurtosis_layer"] > 1.0 and abs(h_bn["kurtosis_layer"]) < 0.2
    assert lp["kurtosis_pooled"] == pytest.approx(abs(h_lp["kurtosis_layer"]))


def test_monitor_relative_drift_matches_a_naive_per_channel_formula():
    torch.manual_seed(1)
    layer = torch.nn.Identity()
    mon = common.ActivationMonitor({"a": layer}, {})
    mon.active = True
    x0 = torch.randn(32, 6, 5, 5) * torch.tensor([1e-3, 1e-2, 0.1, 1, 10, 100]).reshape(1, 6, 1, 1)
    x1 = x0 * 1.1 + 0.05 * x0.std((0, 2, 3), keepdim=True)
    layer(x0)
    mon.take()
    layer(x1)
    acts, _ = mon.take()
    mon.remove()
    a, b = x0.double(), x1.double()
    m0, v0 = a.mean((0, 2, 3)), a.var((0, 2, 3), unbiased=False)
    m1, v1 = b.mean((0, 2, 3)), b.var((0, 2, 3), unbiased=False)
    want = float(((m1 - m0).abs() / v0.sqrt() + (v1 - v0).abs() / v0).mean())
    assert acts["drift_rel"][0] == pytest.approx(want, rel=1e-4)
    # scale-free: every channel moved by the same relative amount, whatever its scale (0.05 + 0.21)
    assert want == pytest.approx(0.05 + 0.21, rel=0.05)
    # the absolute drift is dominated by the largest channel
    assert acts["drift_var"][0] == pytest.approx(float((v1 - v0).abs().mean()), rel=1e-4)


def test_summarize_run_second_half_quarters_follow_the_step_accuracies():
    steps = 40
    acc = [t / 40 for t in range(steps)]
    recs = [{"type": "train", "step": t, "loss": 2.0, "acc": a} for t, a in enumerate(acc)]
    s = analysis.summarize_run(recs, {}, steps)
    assert s["acc_q3"] == pytest.approx(statistics.mean(acc[20:30]))
    assert s["acc_q4"] == pytest.approx(statistics.mean(acc[30:40]))


def test_theorem41_reports_gamma2_over_sigma2_and_the_removed_share():
    torch.manual_seed(2)
    bn = torch.nn.BatchNorm2d(5).double()
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2.0, 5))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, bias=False).double(), bn, torch.nn.Tanh())
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    tracker = measure.start_theorem41(model)
    y = model[0](x)
    y.retain_grad()
    z = model[1](y)
    z.retain_grad()
    loss = (model[2](z) ** 3).sum()
    loss.backward()
    rec = measure.theorem41(model, tracker)
    got = rec["per_layer"]["1"]
    dims = (0, 2, 3)
    var = y.detach().var(dims, unbiased=False)
    scale = bn.weight.detach() ** 2 / (var + bn.eps)
    yhat = (y.detach() - y.detach().mean(dims, keepdim=True)) / (var + bn.eps).sqrt().reshape(1, -1, 1, 1)
    g = z.grad
    m = g.numel() // g.shape[1]
    proj = g - g.mean(dims, keepdim=True) - yhat * (g * yhat).sum(dims, keepdim=True) / m
    removed = 1 - (proj ** 2).sum(dims) / (g ** 2).sum(dims)
    assert got["gamma2_over_sigma2"] == pytest.approx(float(scale.median()), rel=1e-9)
    assert got["removed_fraction"] == pytest.approx(float(removed.median()), rel=1e-6, abs=1e-9)
    lhs = (y.grad ** 2).sum(dims) if y.grad is not None else None
    assert got["grad_ratio"] == pytest.approx(float((lhs / (g ** 2).sum(dims)).median()), rel=1e-9)
    # the measured ratio is the product of the two factors, channel by channel (the identity)
    assert float((lhs / (g ** 2).sum(dims) - scale * (1 - removed)).abs().max()) < 1e-9
    # and the claim row prints them per layer
    runs = [_summary("bn", 0.1, sd, thm41_layers={"1": got}) for sd in (0, 1, 2)]
    text = analysis.claim6(Grid(runs, {}), 0.1).measured
    assert "gamma^2/sigma^2" in text and f"{got['gamma2_over_sigma2']:.4g}" in text


# ------------------------------------------------------------------------------------------------
# The report: data statistics, seeds, the rules used
# ------------------------------------------------------------------------------------------------

def _write(tmp_path, data_source, summaries, **kw):
    from bnext.experiments.report import parse_claims, write_report
    claims = [analysis.claim1(Grid(summaries, {}), [0.1])]
    text = write_report(tmp_path / "report.md", title="t", command="c", env={}, data_source=data_source,
                        settings={}, claims=claims, summaries=summaries, missing={}, failed={}, figures=[],
                        timing={}, **kw)
    assert [r["verdict"] for r in parse_claims(text)] == [claims[0].verdict]
    return text


def test_report_prints_data_statistics_when_present_and_survives_their_absence(tmp_path):
    runs = [_summary("bn", 0.1, final_loss=0.5), _summary("none", 0.1, final_loss=1.5)]
    stats = {"neighbour_correlation": 0.912, "difference_kurtosis": 7.25, "channel_mean": [0.49, 0.48, 0.45],
             "channel_std": [0.25, 0.24, 0.26]}
    text = _write(tmp_path, {"description": "CIFAR-10 from /data", "statistics": stats}, runs)
    assert "CIFAR-10 from /data" in text
    line = next(ln for ln in text.splitlines() if "Data statistics" in ln)
    for v in ("0.912", "7.25", "0.49", "0.26"):
        assert v in line
    text = _write(tmp_path, "synthetic task", runs)
    assert "Data statistics" not in text and "synthetic task" in text
    assert "one seed" in text
    # the rules that go beyond the protocol's defaults are listed with their reasons
    assert "Rules beyond the protocol's defaults" in text and "closes measures speed" in text
    assert "inconclusive" in next(ln for ln in text.splitlines() if "one seed" in ln)
    # run-table headers holding '|' are escaped, so the table keeps its columns
    header = next(ln for ln in text.splitlines() if ln.startswith("| run |"))
    from bnext.experiments.report import RUN_COLUMNS, _split_row
    assert len(_split_row(header)) == len(RUN_COLUMNS)


def test_report_states_seed_count_and_context_accepts_the_old_dict(tmp_path):
    from bnext.experiments.report import ReportContext
    runs = [_summary("bn", 0.1, s, final_loss=0.5) for s in (0, 1)] + [_summary("none", 0.1, s) for s in (0, 1)]
    assert "2 seeds (0, 1)" in _write(tmp_path, "d", runs)
    fields = dict(cfg=None, out=tmp_path, grid=Grid(runs, {}), records={}, summaries=runs, env={},
                  data_source={"description": "d", "statistics": {"neighbour_correlation": 0.5}}, timing={},
                  command="c", missing={}, failed={})
    ctx = ReportContext.coerce(fields)
    assert ctx["summaries"] is runs and ctx.grid is fields["grid"]
    assert ctx.data_text == "d" and ctx.data_statistics == {"neighbour_correlation": 0.5}
    with pytest.raises(TypeError, match="unknown field"):
        ReportContext.coerce(dict(fields, colour="red"))


def test_relative_drift_leaves_out_channels_without_scale():
    prev = torch.tensor([[0.0, 1.0], [0.0, 4.0]])   # rows: mean, var; channel 0 is constant
    now = torch.tensor([[5.0, 2.0], [3.0, 2.0]])
    want = abs(2.0 - 1.0) / 2.0 + abs(2.0 - 4.0) / 4.0
    assert float(common.ActivationMonitor._relative_drift(now, prev)) == pytest.approx(want)
    assert math.isnan(float(common.ActivationMonitor._relative_drift(now, torch.zeros(2, 2))))
