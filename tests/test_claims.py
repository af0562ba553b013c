"""The claim rules (bnext.experiments.analysis) on hand-made summaries and records, and the measurements
they rest on (activation monitor, line-probe companions, Theorem 4.1 per-layer figures) against naive
float64 references written here. Each rule is shown to come out both ways."""
import math
import statistics

import pytest
import torch

from bnext.experiments import analysis, common, measure
from bnext.experiments.analysis import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, Grid


def _summary(norm, lr, seed=0, **kw):
    s = {"spec": {"norm": norm, "lr": lr, "seed": seed, "group": "main", "steps": 100, "measure": True},
         "run_id": f"main-{norm}-lr{lr:g}-s{seed}", "diverged": False, "diverged_step": None,
         "final_loss": 1.0, "initial_loss": 2.3, "final_acc": 0.5, "acc_q3": 0.5, "acc_q4": 0.5,
         "drift_rel": 0.1, "ics_cosine": 0.5, "ics_l2": 1.0, "kurtosis": 0.1, "kurtosis_pooled": 0.1,
         "loss_range": 1.0, "grad_pred": 1.0, "grad_pred_top": 1.0, "beta": 1.0,
         "thm41_max_rel_err": 1e-6, "thm41_measurements": 3}
    s.update(kw)
    return s


STUCK = dict(final_loss=2.25, initial_loss=2.3)  # 0.978 x the first loss: never left the plateau


# ------------------------------------------------------------------------------------------------
# The trained gate
# ------------------------------------------------------------------------------------------------

def test_trained_gate_threshold_is_mean_of_last_tenth_against_first_loss():
    assert analysis._trained(_summary("none", 0.1, final_loss=0.9 * 2.3, initial_loss=2.3))
    assert not analysis._trained(_summary("none", 0.1, final_loss=0.901 * 2.3, initial_loss=2.3))
    assert not analysis._trained(_summary("none", 0.1, diverged=True, final_loss=None))
    # summarize_run: the mean of the last 10% of the planned steps, against the loss of step 0
    steps = 50
    losses = [2.0] * 45 + [1.7, 1.8, 1.9, 1.8, 1.8]  # last 5 steps: mean 1.8 = 0.9 x 2.0
    recs = [{"type": "train", "step": t, "loss": v, "acc": 0.1} for t, v in enumerate(losses)]
    s = analysis.summarize_run(recs, {}, steps)
    assert s["final_loss"] == pytest.approx(statistics.mean(losses[45:]))
    assert s["initial_loss"] == 2.0 and s["trained"]
    recs[-1]["loss"] = 1.9
    assert not analysis.summarize_run(recs, {}, steps)["trained"]


def test_stuck_baseline_makes_claims_1_3_4_5_inconclusive_and_a_trained_one_decides_them():
    def grid(none_kw):
        runs = [_summary("bn", 0.1, final_loss=0.5, ics_cosine=0.3, loss_range=0.1, grad_pred_top=0.1, beta=0.1,
                         kurtosis_pooled=0.1),
                _summary("none", 0.1, ics_cosine=0.9, loss_range=1.0, grad_pred_top=1.0, beta=1.0, drift_rel=0.01,
                         **none_kw)]
        runs += [_summary(p, 0.1, final_loss=0.55, kurtosis_pooled=1.0, drift_rel=1.0) for p in ("l1", "l2", "linf")]
        return Grid(runs, {})
    trained, stuck = grid(dict(final_loss=1.5)), grid(STUCK)
    for claim in (lambda g: analysis.claim1(g, [0.1]), lambda g: analysis.claim3_vgg(g, [0.1]),
                  lambda g: analysis.claim4(g, 0.1), lambda g: analysis.claim5(g, 0.1)):
        assert claim(trained).verdict == REPRODUCED
        c = claim(stuck)
        assert c.verdict == INCONCLUSIVE and "baseline did not train" in c.measured, c.measured
    # DLN claim 3 too
    g = Grid([_summary("bn", 1e-6, ics_cosine=0.1), _summary("none", 1e-6, ics_cosine=0.99, **STUCK)], {})
    assert analysis.claim3_dln(g, [1e-6]).verdict == INCONCLUSIVE
    # a stuck seed among trained ones is enough: the comparison is with a network that partly did not train
    g = Grid([_summary("bn", 0.1, s, final_loss=0.5) for s in (0, 1)]
             + [_summary("none", 0.1, 0, final_loss=1.5), _summary("none", 0.1, 1, **STUCK)], {})
    assert "1/2 seeds" in analysis.claim1(g, [0.1]).measured


def test_claim1_largest_lr_counts_a_stuck_plain_net_only_if_it_trained_below():
    runs = [_summary("bn", 0.1, final_loss=0.5), _summary("bn", 0.5, final_loss=0.7),
            _summary("none", 0.5, **STUCK)]
    assert analysis.claim1(Grid(runs + [_summary("none", 0.1, final_loss=1.5)], {}), [0.1, 0.5]).verdict == REPRODUCED
    c = analysis.claim1(Grid(runs + [_summary("none", 0.1, **STUCK)], {}), [0.1, 0.5])
    assert c.verdict == INCONCLUSIVE
    # BN worse than a plain net that trained is decided against the claim
    bad = [_summary("bn", 0.1, final_loss=1.8), _summary("none", 0.1, final_loss=1.0)]
    assert analysis.claim1(Grid(bad, {}), [0.1]).verdict == NOT_REPRODUCED


# ------------------------------------------------------------------------------------------------
# Claim 4: points at which both networks train
# ------------------------------------------------------------------------------------------------

def _records(losses, meas):
    """train records with the given losses, and measure records {step: probe dict}."""
    recs = []
    for t, v in enumerate(losses):
        if t in meas:
            recs.append({"type": "measure", "step": t, "probe": meas[t]})
        recs.append({"type": "train", "step": t, "loss": v, "acc": 0.5})
    return recs


def _probe(v, g=1.0):
    return {"loss_range": v, "grad_pred": v / 2, "grad_pred_top": v, "beta": v, "grad_pred_rel": v / g,
            "loss_range_rel": v / g ** 2, "grad_norm": g}


def test_summarize_run_flags_training_points_like_a_naive_window():
    steps = 40
    losses = [2.0] * 20 + [1.0] * 20
    meas = {t: _probe(1.0) for t in (0, 10, 20, 22, 30, 39)}
    s = analysis.summarize_run(_records(losses, meas), {}, steps)
    tail = 4
    for p in s["probe_points"]:
        w = statistics.mean(losses[max(0, p["step"] - tail + 1):p["step"] + 1])
        assert p["training"] == (w <= 0.9 * losses[0]), p
    assert [p["training"] for p in s["probe_points"]] == [False, False, True, True, True, True]


def test_claim4_uses_only_points_where_both_networks_train():
    steps = 40
    bn_losses = [2.0] + [1.0] * 39                     # training from step 1
    none_losses = [2.0] * 20 + [1.0] * 20              # training from step 23 (window of 4)
    # early: the plain net is stuck, tiny gradients, tiny ranges; once it trains its landscape is rougher
    bn_meas = {t: _probe(1.0, g=5.0) for t in (0, 10, 30, 39)}
    none_meas = {0: _probe(0.01, 0.05), 10: _probe(0.01, 0.05), 30: _probe(8.0, 2.0), 39: _probe(6.0, 2.0)}
    bn = analysis.summarize_run(_records(bn_losses, bn_meas), {}, steps)
    none = analysis.summarize_run(_records(none_losses, none_meas), {}, steps)
    for s, n in ((bn, "bn"), (none, "none")):
        s.update(spec={"norm": n, "lr": 0.1, "seed": 0, "group": "main", "steps": steps, "measure": True})
    c = analysis.claim4(Grid([bn, none], {}), 0.1)
    assert c.verdict == REPRODUCED, c.measured
    assert "2 points with both training" in c.measured
    # over all points the plain net's medians would be (0.01 + 8) / 2 etc.: check the rule did not use them
    assert "loss range BN/none = 0.143" in c.measured  # 1.0 / median(8, 6) = 1/7
    # the same points with the roles reversed decide against the claim
    bn2 = analysis.summarize_run(_records(bn_losses, {t: _probe(20.0, 5.0) for t in bn_meas}), {}, steps)
    bn2.update(spec=bn["spec"])
    assert analysis.claim4(Grid([bn2, none], {}), 0.1).verdict == NOT_REPRODUCED
    # no point at which both train -> inconclusive, even though the plain net trained by the end
    none3 = analysis.summarize_run(_records(none_losses, {0: _probe(0.01), 10: _probe(0.01)}), {}, steps)
    none3.update(spec=none["spec"])
    c3 = analysis.claim4(Grid([bn, none3], {}), 0.1)
    assert c3.verdict == INCONCLUSIVE and "no measurement point" in c3.measured


def test_line_probe_records_the_band_top_and_scale_free_companions():
    pytest.importorskip("bnext.landscape")
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


# ------------------------------------------------------------------------------------------------
# Claim 3: layer #1 excluded
# ------------------------------------------------------------------------------------------------

def test_claim3_pools_layers_from_2_and_leaves_layer_1_out():
    cos = {0: [1.0, 0.30, 0.40], 5: [1.0, 0.35, 0.20]}  # layer #1 has G' = G: cosine 1
    recs = []
    for t in range(10):
        if t in cos:
            recs.append({"type": "measure", "step": t, "ics": [{"cosine": c, "l2": 1 - c} for c in cos[t]]})
        recs.append({"type": "train", "step": t, "loss": 2.0 - 0.1 * t})
    s = analysis.summarize_run(recs, {}, 10)
    assert s["ics_cosine"] == pytest.approx(statistics.median([0.30, 0.40, 0.35, 0.20]))
    assert s["ics_cosine"] != pytest.approx(statistics.median(cos[0] + cos[5]))
    assert s["ics_layers"]["1"]["cosine"] == 1.0  # still shown per layer
    # the verdict follows the layers that can move: BN 0.33 vs a plain net at 0.9 (its layer #1 excluded too)
    none = _summary("none", 0.1, final_loss=1.0, ics_cosine=0.9)
    bn = dict(s, spec={"norm": "bn", "lr": 0.1, "seed": 0, "group": "main", "steps": 10, "measure": True})
    assert analysis.claim3_vgg(Grid([bn, none], {}), [0.1]).verdict == REPRODUCED
    none["ics_cosine"] = 0.1
    assert analysis.claim3_vgg(Grid([bn, none], {}), [0.1]).verdict == NOT_REPRODUCED


# ------------------------------------------------------------------------------------------------
# Claim 5: kurtosis that differs only when pooled; relative drift
# ------------------------------------------------------------------------------------------------

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


def test_kurtosis_that_differs_only_when_pooled_decides_claim5():
    torch.manual_seed(0)
    z = torch.randn(64, 16, 8, 8)
    bn_like = z                                                    # every channel N(0, 1)
    scales = torch.logspace(-0.7, 0.7, 16).reshape(1, 16, 1, 1)    # the same z, per-channel std 0.2..5
    lp_like = z * scales + torch.linspace(-1, 1, 16).reshape(1, 16, 1, 1) * 0.01
    bn, h_bn = _monitored_summary(bn_like, "bn")
    lps = []
    for p in ("l1", "l2", "linf"):
        s, h_lp = _monitored_summary(lp_like, p)
        lps.append(s)
    # pooled kurtosis agrees with a naive float64 formula; per-channel is identical under per-channel affine maps
    assert h_bn["kurtosis_layer"] == pytest.approx(_naive_excess_kurtosis(bn_like), abs=1e-6)
    assert h_lp["kurtosis_layer"] == pytest.approx(_naive_excess_kurtosis(lp_like), abs=1e-6)
    per_channel = [statistics.mean(_naive_excess_kurtosis(t[:, c]) for c in range(16)) for t in (bn_like, lp_like)]
    assert h_bn["kurtosis_channel"] == pytest.approx(per_channel[0], abs=1e-6)
    assert h_lp["kurtosis_channel"] == pytest.approx(per_channel[1], abs=1e-4)
    assert h_lp["kurtosis_channel"] == pytest.approx(h_bn["kurtosis_channel"], abs=1e-4)
    assert h_lp["kurtosis_layer"] > 1.0 and abs(h_bn["kurtosis_layer"]) < 0.2
    none = _summary("none", 0.1, final_loss=1.5, initial_loss=2.0, drift_rel=0.01)
    g = Grid([bn, none] + lps, {})
    assert analysis.claim5(g, 0.1).verdict == REPRODUCED
    # the per-channel statistic could not have told them apart
    assert analysis.compare(analysis.stat([lps[0]], "kurtosis"), analysis.stat([bn], "kurtosis")) == 0
    # and with BN-like l_p activations the same rule says no
    lps_same = [_monitored_summary(bn_like * 1.0, p)[0] for p in ("l1", "l2", "linf")]
    bn_wide = _monitored_summary(lp_like, "bn")[0]
    assert analysis.claim5(Grid([bn_wide, none] + lps_same, {}), 0.1).verdict == NOT_REPRODUCED


def test_claim5_needs_more_relative_drift_than_the_plain_network():
    runs = [_summary("bn", 0.1, final_loss=0.5, kurtosis_pooled=0.1),
            _summary("none", 0.1, final_loss=1.5, drift_rel=0.5)]
    runs += [_summary(p, 0.1, final_loss=0.55, kurtosis_pooled=1.0, drift_rel=0.05) for p in ("l1", "l2", "linf")]
    assert analysis.claim5(Grid(runs, {}), 0.1).verdict == NOT_REPRODUCED


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


# ------------------------------------------------------------------------------------------------
# Claim 2: the gap over the second half and its trend
# ------------------------------------------------------------------------------------------------

def _claim2(gap3, gap4, noisy_drift=1.0):
    bn = _summary("bn", 0.1, acc_q3=0.80, acc_q4=0.85)
    noisy = _summary("noisy_bn", 0.1, acc_q3=0.80 - gap3 / 100, acc_q4=0.85 - gap4 / 100, drift_rel=noisy_drift)
    none = _summary("none", 0.1, acc_q3=0.3, acc_q4=0.35, drift_rel=0.05)
    return analysis.claim2(Grid([bn, noisy, none], {}), 0.1)


def test_claim2_a_closing_gap_is_slower_not_worse():
    c = _claim2(15.0, 8.0)          # closing, still above 5 points at the end
    assert c.verdict == INCONCLUSIVE and "shrinking" in c.measured
    assert _claim2(6.0, 3.0).verdict == REPRODUCED      # closed to within 5 points
    assert _claim2(3.0, 3.2).verdict == REPRODUCED      # within 5, the growth inside the noise (10% of 3.2)
    assert _claim2(1.0, 4.5).verdict == NOT_REPRODUCED  # within 5 at the end but growing
    assert _claim2(8.0, 8.0).verdict == NOT_REPRODUCED  # a gap that stays
    assert _claim2(6.0, 3.0, noisy_drift=0.01).verdict == NOT_REPRODUCED  # drifts less than the plain net
    assert "eval mode" in c.rule


def test_summarize_run_second_half_quarters_follow_the_step_accuracies():
    steps = 40
    acc = [t / 40 for t in range(steps)]
    recs = [{"type": "train", "step": t, "loss": 2.0, "acc": a} for t, a in enumerate(acc)]
    s = analysis.summarize_run(recs, {}, steps)
    assert s["acc_q3"] == pytest.approx(statistics.mean(acc[20:30]))
    assert s["acc_q4"] == pytest.approx(statistics.mean(acc[30:40]))


def test_claim2_pairs_seeds_and_uses_their_spread():
    bn = [_summary("bn", 0.1, s, acc_q3=0.80, acc_q4=0.85) for s in (0, 1)]
    noisy = [_summary("noisy_bn", 0.1, 0, acc_q3=0.70, acc_q4=0.82, drift_rel=1.0),
             _summary("noisy_bn", 0.1, 1, acc_q3=0.60, acc_q4=0.81, drift_rel=1.2)]
    none = [_summary("none", 0.1, s, acc_q3=0.3, acc_q4=0.35, drift_rel=0.05) for s in (0, 1)]
    c = analysis.claim2(Grid(bn + noisy + none, {}), 0.1)
    assert c.verdict == REPRODUCED and "+-" in c.measured


# ------------------------------------------------------------------------------------------------
# Claim 6: the quantities the argument rests on
# ------------------------------------------------------------------------------------------------

def test_theorem41_reports_gamma2_over_sigma2_and_the_removed_share():
    pytest.importorskip("bnext.landscape")
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
    # and the claim row prints them per layer
    s = _summary("bn", 0.1, thm41_layers={"1": got})
    text = analysis.claim6([s]).measured
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
