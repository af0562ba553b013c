"""From metrics.jsonl records to run summaries, and from run summaries to the claims table.

The claim rules are PROTOCOL.md's ("Claim rules"); each verdict carries the rule text it was computed by
and the numbers it used. Nothing here is hard-coded to an outcome: every rule can come out either way, and a
comparison that cannot (a baseline that never left its initial loss, a margin inside the noise) is
"inconclusive" with its reason.
"""
import dataclasses
import math
import statistics
from typing import Any, Dict, Iterable, List, Optional, Sequence

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"

# -------------------------------------------------------------------------------------------------
# One run
# -------------------------------------------------------------------------------------------------


def _num(v) -> Optional[float]:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def _median(vals: Iterable) -> Optional[float]:
    vals = [v for v in vals if _num(v) is not None]
    return statistics.median(vals) if vals else None


def _mean(vals: Iterable) -> Optional[float]:
    vals = [v for v in vals if _num(v) is not None]
    return sum(vals) / len(vals) if vals else None


# A run "trained" when the mean loss of its last 10% of steps is at most this fraction of its first loss.
TRAINED_FRACTION = 0.9


def _window_mean(train: List[dict], step: int, width: int) -> Optional[float]:
    """Mean training loss over the steps (step - width, step]."""
    return _mean(r["loss"] for r in train if step - width < r["step"] <= step)


PROBE_KEYS = ("loss_range", "grad_pred", "grad_pred_top", "beta", "grad_pred_rel", "loss_range_rel", "grad_norm")


def _quarter_acc(train: List[dict], steps: int, q: int) -> Optional[float]:
    """Mean training accuracy over quarter q (0-based) of the planned steps."""
    lo, hi = q * steps / 4, (q + 1) * steps / 4
    return _mean(r.get("acc") for r in train if lo <= r["step"] < hi)


def _thm41_by_layer(tables: Iterable[Optional[dict]]) -> Dict[str, Dict[str, list]]:
    """Theorem 4.1's per-layer figures (gamma^2/sigma^2, removed fraction), each gathered into a list over
    tables {layer: {figure: value}} of measurements or of runs."""
    layers: Dict[str, Dict[str, list]] = {}
    for table in tables:
        for name, v in (table or {}).items():
            d = layers.setdefault(name, {"gamma2_over_sigma2": [], "removed_fraction": []})
            for k in d:
                d[k].append(v.get(k))
    return layers


def summarize_run(records: List[dict], state: Dict[str, Any], steps: int) -> Dict[str, Any]:
    """Final figures (mean over the last 10% of the planned steps), medians of every measurement, and the
    per-measurement-point values the landscape rule needs (each point flagged "training" when the mean loss
    of the 10% of steps up to it is at most TRAINED_FRACTION x the first loss)."""
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    meas = [r for r in records if r["type"] == "measure"]
    diverged = state.get("diverged_step") is not None
    tail = max(1, int(round(0.1 * steps)))
    last = [r for r in train if r["step"] >= steps - tail]
    s: Dict[str, Any] = {"diverged": diverged, "diverged_step": state.get("diverged_step"),
                         "steps_done": len(train)}
    s["final_loss"] = None if diverged else _mean(r["loss"] for r in last)
    s["final_acc"] = None if diverged else _mean(r.get("acc") for r in last)
    s["initial_loss"] = train[0]["loss"] if train else None
    s["trained"] = _trained(s)
    # training accuracy in the third and fourth quarter: claim 2 compares the second half and its trend
    s["acc_q3"] = None if diverged else _quarter_acc(train, steps, 2)
    s["acc_q4"] = None if diverged else _quarter_acc(train, steps, 3)
    s["test_acc"] = evals[-1].get("test_acc") if evals and not diverged else None
    s["test_loss"] = evals[-1].get("test_loss") if evals and not diverged else None
    drifts, rel = [], []
    for r in train:
        dm, dv = r.get("drift_mean") or [], r.get("drift_var") or []
        per_layer = [a + b for a, b in zip(dm, dv) if _num(a) is not None and _num(b) is not None]
        if per_layer:
            drifts.append(sum(per_layer) / len(per_layer))
        layer_rel = [v for v in (r.get("drift_rel") or []) if _num(v) is not None]
        if layer_rel:
            rel.append(sum(layer_rel) / len(layer_rel))
    s["drift"] = _mean(drifts)          # absolute units: |d mean| + |d var|
    s["drift_rel"] = _mean(rel)         # in units of each channel's own scale
    # ICS: per layer medians over measurement points, and the median over all (layer, point) pairs of
    # layers #2.. (layer #1 has no layer below it to update, so G' = G and its cosine is 1 by construction).
    ics_by_layer: Dict[str, Dict[str, list]] = {}
    for m in meas:
        for i, r in enumerate(m.get("ics") or []):
            d = ics_by_layer.setdefault(str(i + 1), {"cosine": [], "l2": []})
            d["cosine"].append(r.get("cosine"))
            d["l2"].append(r.get("l2"))
    s["ics_layers"] = {k: {"cosine": _median(v["cosine"]), "l2": _median(v["l2"])} for k, v in ics_by_layer.items()}
    above1 = [v for k, v in ics_by_layer.items() if k != "1"]
    s["ics_cosine"] = _median(c for v in above1 for c in v["cosine"])
    s["ics_l2"] = _median(c for v in above1 for c in v["l2"])
    points = []
    first = s["initial_loss"]
    for m in meas:
        pr = m.get("probe") or {}
        w = _window_mean(train, m["step"], tail)
        pt = {"step": m["step"],
              "training": bool(not diverged and _num(first) is not None and w is not None
                               and w <= TRAINED_FRACTION * first)}
        pt.update({k: pr.get(k) for k in PROBE_KEYS})
        points.append(pt)
    s["probe_points"] = points
    for key in PROBE_KEYS:
        s[key] = _median(pt[key] for pt in points)
    s["hessian_top"] = _median(m.get("hessian_top") for m in meas)
    kurt: Dict[str, list] = {}
    pooled: Dict[str, list] = {}
    for m in meas:
        for layer, h in (m.get("hist") or {}).items():
            kurt.setdefault(layer, []).append(h.get("kurtosis_channel"))
            pooled.setdefault(layer, []).append(h.get("kurtosis_layer"))
    # per channel: blind to any per-channel shift and scale, hence equal for BN and l_p at the same weights
    s["kurtosis_layers"] = {k: _median(v) for k, v in kurt.items()}
    s["kurtosis"] = _mean(abs(v) for v in s["kurtosis_layers"].values() if v is not None)
    # pooled over the whole layer: how far the layer's histogram (the paper's figure) is from a Gaussian
    s["kurtosis_pooled_layers"] = {k: _median(v) for k, v in pooled.items()}
    s["kurtosis_pooled"] = _mean(abs(v) for v in s["kurtosis_pooled_layers"].values() if v is not None)
    thm = [m.get("thm41") for m in meas if m.get("thm41")]
    s["thm41_max_rel_err"] = max((t["max_rel_err"] for t in thm if _num(t.get("max_rel_err")) is not None),
                                 default=None)
    s["thm41_measurements"] = len(thm)
    layers = _thm41_by_layer(t.get("per_layer") for t in thm)
    s["thm41_layers"] = {n: {k: _median(v) for k, v in d.items()} for n, d in layers.items()}
    s["measurements"] = len(meas)
    s["missing_measurements"] = sorted({k for m in meas for k in m.get("missing", [])})
    ts, ms = state.get("train_s", 0.0), state.get("measure_s", 0.0)
    n = state.get("train_steps", 0)
    s["steps_per_s"] = n / ts if ts > 0 else None
    s["steps_per_s_with_measurement"] = n / (ts + ms) if ts + ms > 0 else None
    s["wall_s"] = ts + ms + state.get("eval_s", 0.0)
    s["cpu_s"] = state.get("cpu_s")  # process CPU time of the run (all threads): robust to other jobs' load
    return s


# -------------------------------------------------------------------------------------------------
# Across seeds
# -------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Stat:
    """A metric over seeds: mean, spread (std over seeds; 0 with one seed) and the seed values."""
    values: List[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> Optional[float]:
        return sum(self.values) / len(self.values) if self.values else None

    @property
    def spread(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def __str__(self) -> str:
        if not self.values:
            return "missing"
        return f"{self.mean:.4g}" + (f" +- {self.spread:.2g}" if self.n > 1 else "")


def stat(summaries: Sequence[dict], key: str) -> Stat:
    return Stat([s[key] for s in summaries if _num(s.get(key)) is not None])


def compare(a: Stat, b: Stat) -> Optional[int]:
    """-1 if a < b, +1 if a > b, 0 if the margin is inside the noise, None if either is missing.

    Noise (PROTOCOL.md): the seed-to-seed spread (the larger of the two std's over seeds); with one seed,
    10% of the larger absolute value."""
    if not a.values or not b.values:
        return None
    noise = _noise(a, b)
    diff = a.mean - b.mean
    if abs(diff) <= noise:
        return 0
    return -1 if diff < 0 else 1


NOISE_RULE = ("margins count only outside the seed-to-seed spread (one seed: outside 10% of the larger value)")

# -------------------------------------------------------------------------------------------------
# The claims table
# -------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Claim:
    id: str
    claim: str
    rule: str
    measured: str
    verdict: str


def _combine(parts: List[Optional[bool]]) -> str:
    """All True -> reproduced; any False -> not reproduced; otherwise (some None) inconclusive."""
    if any(p is False for p in parts):
        return NOT_REPRODUCED
    if parts and all(p is True for p in parts):
        return REPRODUCED
    return INCONCLUSIVE


class Grid:
    """Finished run summaries indexed by (group, norm, lr)."""

    def __init__(self, summaries: List[dict], missing: Dict[str, str]):
        self.runs: Dict[tuple, List[dict]] = {}
        for s in summaries:
            sp = s["spec"]
            self.runs.setdefault((sp["group"], sp["norm"], float(sp["lr"])), []).append(s)
        self.missing = missing  # norm -> reason it could not run

    def get(self, norm: str, lr: float, group: str = "main") -> List[dict]:
        return self.runs.get((group, norm, float(lr)), [])

    def lrs(self, group: str = "main") -> List[float]:
        return sorted({k[2] for k in self.runs if k[0] == group})

    def why_missing(self, *norms: str) -> str:
        reasons = [f"{n}: {self.missing[n]}" for n in norms if n in self.missing]
        return ("; runs missing (" + "; ".join(reasons) + ")") if reasons else ""


def _final_loss(runs: List[dict]) -> Stat:
    """Final training loss over seeds; a diverged seed counts as +inf (it did not train)."""
    return Stat([math.inf if r["diverged"] else r["final_loss"] for r in runs
                 if r["diverged"] or _num(r.get("final_loss")) is not None])


def _trained(summary: dict, fraction: float = TRAINED_FRACTION) -> bool:
    """A run trained if it did not diverge and the mean loss of its last 10% of steps is at most
    fraction x its first loss."""
    first, last = _num(summary.get("initial_loss")), _num(summary.get("final_loss"))
    return not summary.get("diverged") and first is not None and last is not None and last <= fraction * first


GATE_RULE = (f"a comparison with a network that did not train (mean loss of its last 10% of steps above "
             f"{TRAINED_FRACTION:g} x its first loss, or diverged, in any seed) is inconclusive")


def _untrained(runs: List[dict]) -> Optional[str]:
    """Why these runs cannot serve as a baseline (None if every seed trained)."""
    bad = [r for r in runs if not _trained(r)]
    if not bad:
        return None
    r = bad[0]
    what = (f"diverged at step {r.get('diverged_step')}" if r.get("diverged") else
            f"final loss {_fmt(r.get('final_loss'))} vs first {_fmt(r.get('initial_loss'))}")
    return f"baseline did not train: {len(bad)}/{len(runs)} seeds ({what})"


def _fmt(v) -> str:
    return f"{v:.4g}" if _num(v) is not None else "n/a"


def _noise(a: Stat, b: Stat) -> float:
    if a.n > 1 or b.n > 1:
        return max(a.spread, b.spread)
    return 0.1 * max(abs(a.mean), abs(b.mean))


def _sign(c: Optional[int], want: int) -> Optional[bool]:
    """compare()'s answer as a part of a verdict: True if it has the wanted sign, None if inside the noise."""
    return None if c in (None, 0) else c == want


def claim1(g: Grid, lrs: Sequence[float]) -> Claim:
    rule = ("at every LR, BN's final training loss (mean of the last 10% of steps, mean over seeds) is below "
            "the unnormalized network's, and at the largest LR the unnormalized network diverged or ends higher; "
            + GATE_RULE + " at every LR but the largest of a grid of several, where failing to train is the "
            "outcome the claim predicts (counted only if the unnormalized network trained at some smaller LR); "
            + NOISE_RULE)
    lrs = sorted(lrs)
    parts, notes = [], []
    trained_at = [lr for lr in lrs if g.get("none", lr) and _untrained(g.get("none", lr)) is None]
    for lr in lrs:
        bn, none = g.get("bn", lr), g.get("none", lr)
        if not bn or not none:
            parts.append(None)
            notes.append(f"LR {lr:g}: runs missing")
            continue
        lb, ln = _final_loss(bn), _final_loss(none)
        nd = sum(r["diverged"] for r in none)
        bd = sum(r["diverged"] for r in bn)
        largest = len(lrs) > 1 and lr == lrs[-1]
        why = _untrained(none)
        text = f"LR {lr:g}: BN {_loss_text(bn)} vs none {_loss_text(none)}"
        if bd:
            ok = False
        elif why is not None and not largest:
            ok, text = None, text + f" (inconclusive: {why})"
        elif why is not None and largest and not any(t < lr for t in trained_at):
            ok, text = None, text + " (inconclusive: the unnormalized network trained at no smaller LR)"
        elif nd == len(none):
            ok = True
        else:
            ok = _sign(compare(lb, Stat([v for v in ln.values if math.isfinite(v)])), -1)
        parts.append(ok)
        notes.append(text)
    if not lrs:
        parts.append(None)
    return Claim("1", "BN trains faster and tolerates larger learning rates", rule,
                 "; ".join(notes) + g.why_missing("bn", "none"), _combine(parts))


def _loss_text(runs: List[dict]) -> str:
    div = sum(r["diverged"] for r in runs)
    st = stat(runs, "final_loss")
    if div == len(runs):
        return f"diverged (step {runs[0]['diverged_step']})"
    return f"{st}" + (f" ({div}/{len(runs)} seeds diverged)" if div else "")


NOISY_EVAL_NOTE = ("noisy BN in eval mode is plain BN with its running statistics and no noise (bnext.nn's "
                   "NoisyBatchNorm): in training each channel was multiplied by s ~ N(sigma_j, r_sigma), "
                   "sigma_j ~ U(1, n_sigma) (1.125 on average with the paper's constants) and shifted by a "
                   "zero-mean m, so the layers after it were trained on activations ~1.125x larger than eval "
                   "mode gives them; its test accuracy is that of a slightly different network, hence claim 2 "
                   "compares training accuracy (measured with the noise)")


def _pairs(a: List[dict], b: List[dict]) -> List[tuple]:
    """Runs of two networks paired by seed (seeds present in both)."""
    bs = {r["spec"]["seed"]: r for r in b}
    return [(r, bs[r["spec"]["seed"]]) for r in a if r["spec"]["seed"] in bs]


def claim2(g: Grid, lr: float) -> Claim:
    rule = ("at the reference LR, over the second half of training: BN's minus noisy BN's training accuracy in "
            "the last quarter is at most 5 points and not larger than in the third quarter (a gap that is not "
            "growing); a gap above 5 points that is shrinking (last quarter below third) is inconclusive (slower, "
            "not shown worse; longer training decides); noisy BN's second-half accuracy is above the unnormalized "
            "network's; and its relative drift (mean over steps and layers of |dmu|/sigma + |dvar|/var per "
            "channel) is larger than the unnormalized network's; " + NOISE_RULE + "; " + NOISY_EVAL_NOTE)
    what = "noisy BN (unstable inputs) trains as well as BN"
    bn, noisy, none = g.get("bn", lr), g.get("noisy_bn", lr), g.get("none", lr)
    if not (bn and noisy and none):
        return Claim("2", what, rule, f"LR {lr:g}: runs missing" + g.why_missing("bn", "noisy_bn", "none"),
                     INCONCLUSIVE)

    def half(r):  # second-half training accuracy in points (a diverged run: 0)
        if r["diverged"]:
            return 0.0
        q3, q4 = _num(r.get("acc_q3")), _num(r.get("acc_q4"))
        return None if q3 is None or q4 is None else 50.0 * (q3 + q4)

    def quarter(r, k):
        return 0.0 if r["diverged"] else (None if _num(r.get(k)) is None else 100.0 * r[k])
    pairs = _pairs(bn, noisy)
    gap3 = Stat([v for v in (_diff(quarter(b, "acc_q3"), quarter(n, "acc_q3")) for b, n in pairs) if v is not None])
    gap4 = Stat([v for v in (_diff(quarter(b, "acc_q4"), quarter(n, "acc_q4")) for b, n in pairs) if v is not None])
    if not gap3.values or not gap4.values:
        within = None
        gap_text = "second-half accuracy not recorded by these runs"
    else:
        trend = compare(gap4, gap3)  # +1: growing, -1: shrinking, 0: flat within the noise
        if gap4.mean <= 5.0:
            within = trend != 1
        else:
            within = None if trend == -1 else False
        gap_text = (f"gap BN - noisy (points) third quarter {gap3}, last quarter {gap4} ("
                    + {1: "growing", -1: "shrinking", 0: "flat within the noise", None: "n/a"}[trend] + ")")
    acc_noisy = Stat([v for v in map(half, noisy) if v is not None])
    acc_none = Stat([v for v in map(half, none) if v is not None])
    acc_bn = Stat([v for v in map(half, bn) if v is not None])
    drift = {k: stat(v, "drift_rel") for k, v in (("noisy", noisy), ("none", none))}
    parts = [within, _sign(compare(acc_noisy, acc_none), 1), _sign(compare(drift["noisy"], drift["none"]), 1)]
    measured = (f"LR {lr:g}: second-half train acc noisy {acc_noisy}%, BN {acc_bn}%, none {acc_none}%; {gap_text}; "
                f"relative drift noisy {drift['noisy']} vs none {drift['none']}; test acc (eval mode, no noise) "
                f"noisy {Stat([100 * r['test_acc'] for r in noisy if _num(r.get('test_acc')) is not None])}%, "
                f"BN {Stat([100 * r['test_acc'] for r in bn if _num(r.get('test_acc')) is not None])}%")
    return Claim("2", what, rule, measured, _combine(parts))


def _diff(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else a - b


def claim2_plain_noise(g: Grid, lr: float) -> Claim:
    """Claim 2's second half (its own row): the noise alone hurts a plain network."""
    what = "the same noise prevents a plain network from training"
    rule = ("at the reference LR, the unnormalized network with noisy BN's noise injected after each conv ends with a "
            "higher final training loss than the unnormalized network (a diverged run counts as +inf); "
            + GATE_RULE + "; " + NOISE_RULE)
    noise, none = g.get("noise", lr), g.get("none", lr)
    if not (noise and none):
        return Claim("2 (noise alone)", what, rule, f"LR {lr:g}: runs missing", INCONCLUSIVE)
    a, b = _final_loss(noise), _final_loss(none)
    measured = f"LR {lr:g}: final loss noise-injected {_loss_text(noise)} vs none {_loss_text(none)}"
    why = _untrained(none)
    if why is not None:
        return Claim("2 (noise alone)", what, rule, measured + f" (inconclusive: {why})", INCONCLUSIVE)
    return Claim("2 (noise alone)", what, rule, measured, _combine([_sign(compare(a, b), 1)]))


def ics_lrs(g: Grid, ref: float, extra: Sequence[float]) -> List[float]:
    """The LRs of claim 3 and the ICS figure: the reference LR and the configured ICS LRs at which BN or the
    unnormalized network ran, largest first."""
    return sorted({lr for lr in [ref] + list(extra) if g.get("bn", lr) or g.get("none", lr)}, reverse=True)


def _ics_per_lr(g: Grid, lrs: Sequence[float], judge) -> tuple:
    """Claim 3's verdict parts and notes, one per ICS LR: judge(lr, bn, none) -> (part, text) on BN's and the
    unnormalized network's ICS cosine Stats, the same gates for VGG and DLN (runs or measurements missing: no
    part; an untrained baseline: inconclusive, its text kept)."""
    parts, notes = [], []
    for lr in lrs:
        bn, none = stat(g.get("bn", lr), "ics_cosine"), stat(g.get("none", lr), "ics_cosine")
        if not bn.values or not none.values:
            parts.append(None)
            notes.append(f"LR {lr:g}: runs or measurements missing")
            continue
        part, text = judge(lr, bn, none)
        why = _untrained(g.get("none", lr))
        if why is not None:
            parts.append(None)
            notes.append(text + f" (inconclusive: {why})")
            continue
        parts.append(part)
        notes.append(text)
    if not lrs:
        parts.append(None)
    return parts, notes


def claim3_vgg(g: Grid, lrs: Sequence[float]) -> Claim:
    rule = ("at each ICS LR, BN's median ICS cosine (over conv layers #2.. and measurement points; layer #1 has "
            "G' = G by definition) is not higher than the unnormalized network's by more than 0.05: margin = "
            "none + 0.05 - BN must be > 0; " + GATE_RULE + "; " + NOISE_RULE)

    def judge(lr, bn, none):
        margin, noise = none.mean + 0.05 - bn.mean, _noise(bn, none)
        bl2, nl2 = stat(g.get("bn", lr), "ics_l2"), stat(g.get("none", lr), "ics_l2")
        text = (f"LR {lr:g}: cosine BN {bn} vs none {none}, margin {margin:.3g} (noise {noise:.2g}); "
                f"l2 BN {bl2} vs none {nl2}")
        return (None if abs(margin) <= noise else margin > 0), text
    parts, notes = _ics_per_lr(g, lrs, judge)
    return Claim("3", "BN does not reduce internal covariate shift (VGG)", rule,
                 "; ".join(notes) + g.why_missing("bn", "none"), _combine(parts))


def claim3_dln(g: Grid, lrs: Sequence[float]) -> Claim:
    rule = ("DLN, at each ICS LR: the unnormalized network's median ICS cosine (layers #2..) is above 0.9 and "
            "BN's is lower than that; " + GATE_RULE + "; " + NOISE_RULE)

    def judge(lr, bn, none):
        text = (f"LR {lr:g}: cosine none {none}, BN {bn}; final loss none {stat(g.get('none', lr), 'final_loss')}"
                f", BN {stat(g.get('bn', lr), 'final_loss')}")
        return (False if none.mean <= 0.9 else _sign(compare(bn, none), -1)), text
    parts, notes = _ics_per_lr(g, lrs, judge)
    return Claim("3 (DLN)", "DLN: BN increases ICS yet reaches lower loss", rule,
                 "; ".join(notes) + g.why_missing("bn", "none"), _combine(parts))


CLAIM4_RAW = (("loss_range", "loss range"), ("grad_pred_top", "grad. predictiveness (max ||dg||)"),
              ("beta", "beta"))
CLAIM4_COMPANIONS = (("grad_pred_rel", "max ||dg||/||g||"), ("loss_range_rel", "loss range/(eta_max ||g||^2)"),
                     ("grad_pred", "max-min ||dg||"), ("grad_norm", "||g||"))


def _both_training(a: dict, b: dict) -> Optional[List[int]]:
    """Measurement steps at which both runs are training; None if the runs carry no per-point record."""
    pa, pb = a.get("probe_points"), b.get("probe_points")
    if pa is None or pb is None:
        return None
    ok_b = {p["step"] for p in pb if p.get("training")}
    return sorted(p["step"] for p in pa if p.get("training") and p["step"] in ok_b)


def _point_median(run: dict, steps: List[int], key: str) -> Optional[float]:
    keep = set(steps)
    return _median(p.get(key) for p in run["probe_points"] if p["step"] in keep)


def claim4(g: Grid, lr: float, label: str = "4") -> Claim:
    rule = ("at the reference LR, over the measurement points at which both networks are training (mean loss of "
            f"the 10% of steps up to the point at most {TRAINED_FRACTION:g} x the first loss), BN's median loss "
            "range, gradient predictiveness (max over eta of ||grad L(x - eta g) - g||) and effective beta are each "
            "below the unnormalized network's (ratios BN/none < 1); scale-free companions reported, not voted; "
            + GATE_RULE + "; " + NOISE_RULE)
    what = "BN makes the landscape smoother"
    bn, none = g.get("bn", lr), g.get("none", lr)
    if not bn or not none:
        return Claim(label, what, rule, f"LR {lr:g}: runs missing" + g.why_missing("bn", "none"), INCONCLUSIVE)
    why = _untrained(none)
    pairs = _pairs(bn, none)
    if not pairs:
        return Claim(label, what, rule, f"LR {lr:g}: no seed run by both networks", INCONCLUSIVE)
    per_pair = [(a, b, _both_training(a, b)) for a, b in pairs]
    recorded = all(st is not None for _, _, st in per_pair)
    n_points = [len(st) for _, _, st in per_pair if st is not None]
    vals: Dict[str, tuple] = {}
    for key, _ in CLAIM4_RAW + CLAIM4_COMPANIONS:
        if recorded:
            a = Stat([v for v in (_point_median(x, st, key) for x, _, st in per_pair if st) if _num(v) is not None])
            b = Stat([v for v in (_point_median(y, st, key) for _, y, st in per_pair if st) if _num(v) is not None])
        else:  # summaries written before points were recorded: medians over all points
            a, b = stat(bn, key), stat(none, key)
            if key == "grad_pred_top" and not a.values:
                a, b = stat(bn, "grad_pred"), stat(none, "grad_pred")
        vals[key] = (a, b)

    def ratio(a: Stat, b: Stat) -> str:
        return f"{a.mean / b.mean:.3g}" if a.values and b.values and b.mean else "n/a"
    raw = "; ".join(f"{name} BN/none = {ratio(*vals[k])} ({vals[k][0]} / {vals[k][1]})" for k, name in CLAIM4_RAW)
    comp = ", ".join(f"{name} {ratio(*vals[k])}" for k, name in CLAIM4_COMPANIONS)
    where = (f"{'/'.join(str(n) for n in n_points)} points with both training" if recorded else
             "per-point training flags not recorded by these runs: medians over all points")
    measured = f"LR {lr:g} ({where}): {raw}; companions BN/none: {comp}" + g.why_missing("bn", "none")
    if why is not None:
        return Claim(label, what, rule, measured + f" (inconclusive: {why})", INCONCLUSIVE)
    if recorded and (not n_points or min(n_points) == 0):
        return Claim(label, what, rule, measured + " (inconclusive: no measurement point at which both networks "
                     "are training)", INCONCLUSIVE)
    parts = [_sign(compare(*vals[k]), -1) for k, _ in CLAIM4_RAW]
    return Claim(label, what, rule, measured, _combine(parts))


def claim5(g: Grid, lr: float) -> Claim:
    rule = ("at the reference LR, each l_p network's final training loss is below the unnormalized network's "
            "and at most 1.25x BN's; its activations are less Gaussian than BN's: mean over histogram layers of "
            "|excess kurtosis of the layer's pooled values| (median over measurements) larger than BN's (per-"
            "channel kurtosis, shown for reference, cannot differ: every normalization here is a per-channel "
            "shift and scale); and its relative drift is larger than the unnormalized network's; "
            + GATE_RULE + "; " + NOISE_RULE)
    what = "l_p normalizations smooth and train as well as BN without Gaussian activations"
    bn, none = g.get("bn", lr), g.get("none", lr)
    why = _untrained(none) if none else None
    parts, notes = [], []
    for p in ("l1", "l2", "linf"):
        lp = g.get(p, lr)
        if not (lp and bn and none):
            parts.append(None)
            notes.append(f"{p}: runs missing")
            continue
        fl, fn, fb = _final_loss(lp), _final_loss(none), _final_loss(bn)
        c_below = _sign(compare(fl, fn), -1)
        if all(math.isinf(v) for v in fn.values) and not any(math.isinf(v) for v in fl.values):
            c_below = True
        near = (fl.mean <= 1.25 * fb.mean) if fl.values and fb.values else None
        kl, kb = stat(lp, "kurtosis_pooled"), stat(bn, "kurtosis_pooled")
        dl, dn = stat(lp, "drift_rel"), stat(none, "drift_rel")
        parts += [c_below, near, _sign(compare(kl, kb), 1), _sign(compare(dl, dn), 1)]
        notes.append(f"{p}: loss {_loss_text(lp)} (none {_loss_text(none)}, BN {_loss_text(bn)}); pooled |kurtosis| "
                     f"{kl} vs BN {kb} (per channel {stat(lp, 'kurtosis')} vs {stat(bn, 'kurtosis')}); relative "
                     f"drift {dl} vs none {dn}")
    measured = "; ".join(notes) + g.why_missing("l1", "l2", "linf", "bn", "none")
    if why is not None:
        return Claim("5", what, rule, measured + f" (inconclusive: {why})", INCONCLUSIVE)
    return Claim("5", what, rule, measured, _combine(parts))


def claim6(summaries: List[dict], tol: float = 1e-4) -> Claim:
    rule = (f"in every run with BN layers, the Theorem 4.1 identity holds per channel to relative error {tol:g} at "
            "every measurement; reported alongside, per BN layer (median over channels, then over measurements and "
            "runs): gamma^2/sigma^2 and the share of ||g||^2 the projection removes")
    runs = [s for s in summaries if s["spec"]["norm"] == "bn" and s["spec"].get("measure", True)
            and s.get("measurements", 1) > 0 and not s["diverged"]]
    errs = [s["thm41_max_rel_err"] for s in runs]
    counted = sum(s.get("thm41_measurements", 0) for s in runs)
    layers = _thm41_by_layer(s.get("thm41_layers") for s in runs)
    per_layer = "; ".join(f"{name}: gamma^2/sigma^2 {_fmt(_median(d['gamma2_over_sigma2']))}, removed "
                          f"{_fmt(_median(d['removed_fraction']))}" for name, d in layers.items())
    extra = f"; per layer: {per_layer}" if per_layer else ""
    if not runs or any(e is None for e in errs):
        return Claim("6", "Theorem 4.1 gradient identity", rule,
                     f"{counted} measurements in {len(runs)} BN runs; measurements missing" + extra, INCONCLUSIVE)
    worst = max(errs)
    return Claim("6", "Theorem 4.1 gradient identity", rule,
                 f"max relative error {worst:.2e} over {counted} measurements in {len(runs)} BN runs" + extra,
                 REPRODUCED if worst <= tol else NOT_REPRODUCED)


def largest_stable_lr(g: Grid, norm: str, group: str = "sweep") -> Optional[float]:
    """The largest swept LR at which every seed finished without diverging and below its initial loss."""
    best = None
    for lr in g.lrs(group):
        runs = g.get(norm, lr, group)
        if runs and all(not r["diverged"] and _num(r.get("final_loss")) is not None
                        and r["final_loss"] < r["initial_loss"] for r in runs):
            best = lr if best is None else max(best, lr)
    return best


def claim_lr_sweep(g: Grid, norms: Sequence[str]) -> Claim:
    rule = ("LR sweep: BN's largest stable LR (no divergence and final loss below the initial loss, every seed) "
            "is at least the unnormalized network's and strictly larger or reaches the top of the grid")
    lrs = g.lrs("sweep")
    stable = {n: largest_stable_lr(g, n) for n in norms if any(g.get(n, lr, "sweep") for lr in lrs)}
    measured = ", ".join(f"{n}: {v:g}" if v is not None else f"{n}: none stable" for n, v in stable.items())
    if "bn" not in stable or "none" not in stable:
        return Claim("1b", "BN tolerates larger learning rates (LR sweep)", rule, measured or "runs missing",
                     INCONCLUSIVE)
    b, n = stable["bn"], stable["none"]
    ok = b is not None and (n is None or b > n or (b == n == max(lrs)))
    return Claim("1b", "BN tolerates larger learning rates (LR sweep)", rule, measured,
                 REPRODUCED if ok else NOT_REPRODUCED)


def claim_curvature(g: Grid, lr: float) -> Claim:
    rule = ("at the reference LR, the magnitude of BN's median top Hessian eigenvalue (train mode, largest by "
            "magnitude) is below the unnormalized network's; " + NOISE_RULE)
    a = Stat([abs(v) for v in stat(g.get("bn", lr), "hessian_top").values])
    b = Stat([abs(v) for v in stat(g.get("none", lr), "hessian_top").values])
    c = compare(a, b)
    return Claim("4b", "BN lowers curvature (top Hessian eigenvalue)", rule,
                 f"LR {lr:g}: |lambda_max| BN {a} vs none {b}" + g.why_missing("bn", "none"),
                 INCONCLUSIVE if c in (None, 0) else (REPRODUCED if c < 0 else NOT_REPRODUCED))


def untrained_notes(summaries: List[dict], fraction: float = TRAINED_FRACTION) -> List[str]:
    """Runs of the main grid that did not leave their initial loss: the claims that compare against them say
    "inconclusive (baseline did not train)"."""
    out = []
    for s in summaries:
        if s["spec"]["group"] != "main" or s["diverged"]:
            continue
        f, i = s.get("final_loss"), s.get("initial_loss")
        if _num(f) is not None and _num(i) is not None and f > fraction * i:
            out.append(f"`{s['run_id']}` did not train within its {s['spec']['steps']} steps (final loss {f:.4g} vs "
                       f"initial {i:.4g}, above {fraction:g}x); claims comparing against it are inconclusive.")
    return out


# Where a rule goes beyond PROTOCOL.md's general defaults, and why: the report prints these.
RULE_NOTES = [
    "Claim 1 at the largest LR of a grid of several: an unnormalized network that did not train there counts as "
    "not tolerating that LR (the claim's own prediction) instead of as a vacuous baseline, provided it trained at "
    "a smaller LR; at every other LR the trained gate applies.",
    "Claim 2: a noisy-BN gap above 5 points that is shrinking is inconclusive rather than not reproduced: a gap "
    "that closes measures speed, and the claim is about what noisy BN reaches.",
    "Claim 2 (noise alone): not one of the paper's numbered rules; it gets its own row with the trained gate.",
    "Claim 4: the three raw ratios decide; max ||dg||/||g|| and loss range/(eta_max ||g||^2) are reported so a "
    "reader can tell smoothness from gradient scale, but do not vote (the paper's figures are raw).",
]
