"""From metrics.jsonl records to run summaries, and from run summaries to the claims table.

The claim rules are PAPER.md's ("Rules for the claims table"); each verdict carries the rule text it
was computed by and the numbers it used. Nothing here is hard-coded to an outcome.
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


def summarize_run(records: List[dict], state: Dict[str, Any], steps: int) -> Dict[str, Any]:
    """Final figures (mean over the last 10% of the planned steps), medians of every measurement."""
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
    s["test_acc"] = evals[-1].get("test_acc") if evals and not diverged else None
    s["test_loss"] = evals[-1].get("test_loss") if evals and not diverged else None
    drifts = []
    for r in train:
        dm, dv = r.get("drift_mean") or [], r.get("drift_var") or []
        per_layer = [a + b for a, b in zip(dm, dv) if _num(a) is not None and _num(b) is not None]
        if per_layer:
            drifts.append(sum(per_layer) / len(per_layer))
    s["drift"] = _mean(drifts)
    # ICS: per layer medians over measurement points, and the median over all (layer, point) pairs.
    ics_by_layer: Dict[str, Dict[str, list]] = {}
    for m in meas:
        for i, r in enumerate(m.get("ics") or []):
            d = ics_by_layer.setdefault(str(i + 1), {"cosine": [], "l2": []})
            d["cosine"].append(r.get("cosine"))
            d["l2"].append(r.get("l2"))
    s["ics_layers"] = {k: {"cosine": _median(v["cosine"]), "l2": _median(v["l2"])} for k, v in ics_by_layer.items()}
    s["ics_cosine"] = _median(c for v in ics_by_layer.values() for c in v["cosine"])
    s["ics_l2"] = _median(c for v in ics_by_layer.values() for c in v["l2"])
    for key in ("loss_range", "grad_pred", "beta"):
        s[key] = _median((m.get("probe") or {}).get(key) for m in meas)
    s["hessian_top"] = _median(m.get("hessian_top") for m in meas)
    kurt: Dict[str, list] = {}
    for m in meas:
        for layer, h in (m.get("hist") or {}).items():
            kurt.setdefault(layer, []).append(h.get("kurtosis_channel"))
    s["kurtosis_layers"] = {k: _median(v) for k, v in kurt.items()}
    s["kurtosis"] = _mean(abs(v) for v in s["kurtosis_layers"].values() if v is not None)
    thm = [m.get("thm41") for m in meas if m.get("thm41")]
    s["thm41_max_rel_err"] = max((t["max_rel_err"] for t in thm if _num(t.get("max_rel_err")) is not None),
                                 default=None)
    s["thm41_measurements"] = len(thm)
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

    Noise (PAPER.md): the seed-to-seed spread (the larger of the two std's over seeds); with one seed,
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


def claim1(g: Grid, lrs: Sequence[float]) -> Claim:
    rule = ("at every LR, BN's final training loss (mean of the last 10% of steps, mean over seeds) is below "
            "the unnormalized network's, and at the largest LR the unnormalized network diverged or ends higher; "
            + NOISE_RULE)
    parts, notes = [], []
    for lr in lrs:
        bn, none = g.get("bn", lr), g.get("none", lr)
        if not bn or not none:
            parts.append(None)
            notes.append(f"LR {lr:g}: runs missing")
            continue
        lb, ln = _final_loss(bn), _final_loss(none)
        nd = sum(r["diverged"] for r in none)
        bd = sum(r["diverged"] for r in bn)
        if bd:
            ok = False
        elif nd == len(none):
            ok = True
        else:
            c = compare(Stat([v for v in lb.values]), Stat([v for v in ln.values if math.isfinite(v)]))
            ok = None if c in (None, 0) else c < 0
        parts.append(ok)
        notes.append(f"LR {lr:g}: BN {_loss_text(bn)} vs none {_loss_text(none)}")
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


def claim2(g: Grid, lr: float) -> Claim:
    rule = ("at the reference LR, noisy BN's final training accuracy is within 5 points of BN's and above the "
            "unnormalized network's, and its per-step activation drift (mean over layers of |dmu| + |dvar| per "
            "channel) is larger than the unnormalized network's; " + NOISE_RULE)
    bn, noisy, none = g.get("bn", lr), g.get("noisy_bn", lr), g.get("none", lr)
    if not (bn and noisy and none):
        return Claim("2", "noisy BN (unstable inputs) trains as well as BN", rule,
                     f"LR {lr:g}: runs missing" + g.why_missing("bn", "noisy_bn", "none"), INCONCLUSIVE)
    acc = {k: Stat([100 * (r["final_acc"] or 0.0) if not r["diverged"] else 0.0 for r in v])
           for k, v in (("bn", bn), ("noisy", noisy), ("none", none))}
    drift = {k: stat(v, "drift") for k, v in (("noisy", noisy), ("none", none))}
    within = abs(acc["noisy"].mean - acc["bn"].mean) <= 5.0
    above = compare(acc["noisy"], acc["none"])
    more_drift = compare(drift["noisy"], drift["none"])
    parts = [within, None if above in (None, 0) else above > 0, None if more_drift in (None, 0) else more_drift > 0]
    measured = (f"LR {lr:g}: final train acc noisy {acc['noisy']}%, BN {acc['bn']}%, none {acc['none']}%; "
                f"drift noisy {drift['noisy']} vs none {drift['none']}")
    return Claim("2", "noisy BN (unstable inputs) trains as well as BN", rule, measured, _combine(parts))


def claim2_plain_noise(g: Grid, lr: float) -> Claim:
    """Claim 2's second half (not one of PAPER.md's rules, so its own row): the noise alone hurts a plain network."""
    what = "the same noise prevents a plain network from training"
    rule = ("at the reference LR, the unnormalized network with noisy BN's noise injected after each conv ends with a "
            "higher final training loss than the unnormalized network (a diverged run counts as +inf); inconclusive "
            "if the unnormalized network itself did not train; " + NOISE_RULE)
    noise, none = g.get("noise", lr), g.get("none", lr)
    if not (noise and none):
        return Claim("2 (noise alone)", what, rule, f"LR {lr:g}: runs missing", INCONCLUSIVE)
    a, b = _final_loss(noise), _final_loss(none)
    measured = f"LR {lr:g}: final loss noise-injected {_loss_text(noise)} vs none {_loss_text(none)}"
    if not any(_trained(r) for r in none):
        return Claim("2 (noise alone)", what, rule, measured + " (the unnormalized network did not train)", INCONCLUSIVE)
    c = compare(a, b)
    return Claim("2 (noise alone)", what, rule, measured, _combine([None if c in (None, 0) else c > 0]))


def _trained(summary: dict, tol: float = 0.95) -> bool:
    """A run trained if it did not diverge and its final loss is below tol x its initial loss."""
    first, last = _num(summary.get("initial_loss")), _num(summary.get("final_loss"))
    return not summary.get("diverged") and first is not None and last is not None and last < tol * first


def _noise(a: Stat, b: Stat) -> float:
    if a.n > 1 or b.n > 1:
        return max(a.spread, b.spread)
    return 0.1 * max(abs(a.mean), abs(b.mean))


def claim3_vgg(g: Grid, lrs: Sequence[float]) -> Claim:
    rule = ("at each ICS LR, BN's median ICS cosine (over conv layers and measurement points) is not higher "
            "than the unnormalized network's by more than 0.05: margin = none + 0.05 - BN must be > 0; "
            + NOISE_RULE)
    parts, notes = [], []
    for lr in lrs:
        bn, none = stat(g.get("bn", lr), "ics_cosine"), stat(g.get("none", lr), "ics_cosine")
        if not bn.values or not none.values:
            parts.append(None)
            notes.append(f"LR {lr:g}: runs or measurements missing")
            continue
        margin, noise = none.mean + 0.05 - bn.mean, _noise(bn, none)
        parts.append(None if abs(margin) <= noise else margin > 0)
        bl2, nl2 = stat(g.get("bn", lr), "ics_l2"), stat(g.get("none", lr), "ics_l2")
        notes.append(f"LR {lr:g}: cosine BN {bn} vs none {none}, margin {margin:.3g} (noise {noise:.2g}); "
                     f"l2 BN {bl2} vs none {nl2}")
    if not lrs:
        parts.append(None)
    return Claim("3", "BN does not reduce internal covariate shift (VGG)", rule,
                 "; ".join(notes) + g.why_missing("bn", "none"), _combine(parts))


def claim3_dln(g: Grid, lrs: Sequence[float]) -> Claim:
    rule = ("DLN, at each ICS LR: the unnormalized network's median ICS cosine is above 0.9 and BN's is lower "
            "than that; " + NOISE_RULE)
    parts, notes = [], []
    for lr in lrs:
        bn, none = stat(g.get("bn", lr), "ics_cosine"), stat(g.get("none", lr), "ics_cosine")
        if not bn.values or not none.values:
            parts.append(None)
            notes.append(f"LR {lr:g}: runs or measurements missing")
            continue
        c = compare(bn, none)
        parts.append(False if none.mean <= 0.9 else (None if c in (None, 0) else c < 0))
        notes.append(f"LR {lr:g}: cosine none {none}, BN {bn}; final loss none {stat(g.get('none', lr), 'final_loss')}"
                     f", BN {stat(g.get('bn', lr), 'final_loss')}")
    if not lrs:
        parts.append(None)
    return Claim("3 (DLN)", "DLN: BN increases ICS yet reaches lower loss", rule,
                 "; ".join(notes) + g.why_missing("bn", "none"), _combine(parts))


def claim4(g: Grid, lr: float, label: str = "4") -> Claim:
    rule = ("at the reference LR, BN's median loss range, gradient predictiveness and effective beta are each "
            "below the unnormalized network's (ratios BN/none < 1); " + NOISE_RULE)
    bn, none = g.get("bn", lr), g.get("none", lr)
    parts, notes = [], []
    for key, name in (("loss_range", "loss range"), ("grad_pred", "grad. predictiveness"), ("beta", "beta")):
        a, b = stat(bn, key), stat(none, key)
        c = compare(a, b)
        parts.append(None if c in (None, 0) else c < 0)
        ratio = f"{a.mean / b.mean:.3g}" if a.values and b.values and b.mean else "n/a"
        notes.append(f"{name} BN/none = {ratio} ({a} / {b})")
    return Claim(label, "BN makes the landscape smoother", rule,
                 f"LR {lr:g}: " + "; ".join(notes) + g.why_missing("bn", "none"), _combine(parts))


def claim5(g: Grid, lr: float) -> Claim:
    rule = ("at the reference LR, each l_p network's final training loss is below the unnormalized network's "
            "and at most 1.25x BN's, and the mean |excess kurtosis| (per channel, median over measurements, "
            "mean over histogram layers) of its activations is larger than BN's (less Gaussian); " + NOISE_RULE)
    bn, none = g.get("bn", lr), g.get("none", lr)
    parts, notes = [], []
    for p in ("l1", "l2", "linf"):
        lp = g.get(p, lr)
        if not (lp and bn and none):
            parts.append(None)
            notes.append(f"{p}: runs missing")
            continue
        fl, fn, fb = _final_loss(lp), _final_loss(none), _final_loss(bn)
        below = compare(fl, fn)
        c_below = None if below in (None, 0) else below < 0
        if all(math.isinf(v) for v in fn.values) and not any(math.isinf(v) for v in fl.values):
            c_below = True
        near = (fl.mean <= 1.25 * fb.mean) if fl.values and fb.values else None
        kl, kb = stat(lp, "kurtosis"), stat(bn, "kurtosis")
        ck = compare(kl, kb)
        parts += [c_below, near, None if ck in (None, 0) else ck > 0]
        notes.append(f"{p}: loss {_loss_text(lp)} (none {_loss_text(none)}, BN {_loss_text(bn)}); |kurtosis| {kl} vs BN {kb}")
    return Claim("5", "l_p normalizations smooth and train as well as BN without Gaussian activations", rule,
                 "; ".join(notes) + g.why_missing("l1", "l2", "linf", "bn", "none"), _combine(parts))


def claim6(summaries: List[dict], tol: float = 1e-4) -> Claim:
    rule = f"in every run with BN layers, the Theorem 4.1 identity holds per channel to relative error {tol:g} at every measurement"
    runs = [s for s in summaries if s["spec"]["norm"] == "bn" and s["spec"].get("measure", True)
            and s.get("measurements", 1) > 0 and not s["diverged"]]
    errs = [s["thm41_max_rel_err"] for s in runs]
    counted = sum(s.get("thm41_measurements", 0) for s in runs)
    if not runs or any(e is None for e in errs):
        return Claim("6", "Theorem 4.1 gradient identity", rule,
                     f"{counted} measurements in {len(runs)} BN runs; measurements missing", INCONCLUSIVE)
    worst = max(errs)
    return Claim("6", "Theorem 4.1 gradient identity", rule,
                 f"max relative error {worst:.2e} over {counted} measurements in {len(runs)} BN runs",
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


def untrained_notes(summaries: List[dict], tol: float = 0.95) -> List[str]:
    """Runs whose final training loss stayed within 5% of their initial loss: comparisons of landscape or
    ICS figures against such a run compare with a network that has not started to train."""
    out = []
    for s in summaries:
        if s["spec"]["group"] != "main" or s["diverged"]:
            continue
        f, i = s.get("final_loss"), s.get("initial_loss")
        if _num(f) is not None and _num(i) is not None and f >= tol * i:
            out.append(f"`{s['run_id']}` did not train within its {s['spec']['steps']} steps (final loss {f:.4g} vs "
                       f"initial {i:.4g}); claims comparing with it compare against an untrained network.")
    return out
