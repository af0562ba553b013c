"""Figures (matplotlib, Agg) from the runs' metrics.jsonl records.

`Runs` maps (group, norm, lr) -> list of per-seed record lists. Every curve is the mean over seeds,
with a band from the seed minimum to maximum when there is more than one seed.
"""
import math
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = {"none": "black", "bn": "tab:blue", "noisy_bn": "tab:orange", "l1": "tab:green", "l2": "tab:red",
          "linf": "tab:purple", "noise": "tab:brown"}
LABELS = {"none": "standard (no norm)", "bn": "BatchNorm", "noisy_bn": "noisy BatchNorm", "l1": "l1 norm",
          "l2": "l2 norm", "linf": "l-inf norm", "noise": "standard + BN's noise"}

# l2 normalization coincides with BN wherever the layer input has zero mean (e.g. the DLN after layer 1):
# distinct dashes keep overlapping curves visible.
STYLES = {"l1": "--", "l2": "-.", "linf": ":"}

Runs = Dict[Tuple[str, str, float], List[List[dict]]]


def _series(seeds: List[List[dict]], rtype: str, key, smooth: int = 1):
    """(steps, mean, lo, hi) over seeds of record field `key` (a name or a function of the record)."""
    per_seed = []
    for recs in seeds:
        pts = {}
        for r in recs:
            if r["type"] != rtype:
                continue
            v = key(r) if callable(key) else r.get(key)
            pts[r["step"]] = np.nan if v is None else float(v)
        if pts:
            steps = np.array(sorted(pts))
            vals = np.array([pts[s] for s in steps])
            if smooth > 1 and len(vals) >= smooth:
                kernel = np.ones(smooth) / smooth
                vals = np.convolve(vals, kernel, mode="valid")
                steps = steps[smooth - 1:]
            per_seed.append(dict(zip(steps.tolist(), vals.tolist())))
    if not per_seed:
        return None
    common = sorted(set().union(*per_seed))
    mat = np.array([[d.get(s, np.nan) for s in common] for d in per_seed])
    with np.errstate(all="ignore"):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.array(common), np.nanmean(mat, 0), np.nanmin(mat, 0), np.nanmax(mat, 0)


def _plot(ax, s, norm, label=None, band=True, **kw):
    if s is None:
        return
    steps, mean, lo, hi = s
    kw.setdefault("linestyle", STYLES.get(norm, "-"))
    ax.plot(steps, mean, color=COLORS.get(norm), label=label or LABELS.get(norm, norm), **kw)
    if band and not np.allclose(lo, hi, equal_nan=True):
        ax.fill_between(steps, lo, hi, color=COLORS.get(norm), alpha=0.2, linewidth=0)


def _diverged_marks(ax, seeds: List[List[dict]], norm: str):
    for recs in seeds:
        for r in recs:
            if r["type"] == "diverged":
                ax.axvline(r["step"], color=COLORS.get(norm), ls=":", lw=1)
                ax.annotate("diverged", (r["step"], 0.5), xycoords=("data", "axes fraction"), rotation=90,
                            color=COLORS.get(norm), fontsize=7, ha="right", va="center")


def _label_short_log_axis(ax):
    """A log y axis spanning less than a decade gets few or no major labels: label 2x, 3x and 5x too."""
    lo, hi = ax.get_ylim()
    if lo > 0 and hi / lo < 10:
        from matplotlib.ticker import FormatStrFormatter, LogLocator
        ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 3.0, 5.0)))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))


def _legend(ax, **kw):
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def _save(fig, path: Path, layout: bool = True) -> Path:
    for ax in fig.axes:
        if ax.get_yscale() == "log":
            _label_short_log_axis(ax)
    if layout:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _smooth_for(seeds) -> int:
    n = max((sum(r["type"] == "train" for r in recs) for recs in seeds), default=1)
    return max(1, min(25, n // 20))


def _logy_if_span(ax, values: List[float], decades: float = 1.5):
    v = [x for x in values if x is not None and math.isfinite(x) and x > 0]
    if v and max(v) / min(v) > 10 ** decades:
        ax.set_yscale("log")


def curves(runs: Runs, norms: Sequence[str], lrs: Sequence[float], path: Path, title: str,
           group: str = "main", with_test: bool = True, acc: bool = True) -> Optional[Path]:
    """Training loss, training accuracy (moving average over steps) and test accuracy vs step, one column per LR."""
    lrs = [lr for lr in lrs if any((group, n, lr) in runs for n in norms)]
    if not lrs:
        return None
    rows = [("loss", "training loss (log)")]
    if acc:
        rows.append(("acc", "training accuracy (%)"))
    if with_test:
        rows.append(("test_acc", "test accuracy (%)"))
    # at least ~7 inches wide: a single-LR figure must still hold the legend row below it
    fig, axes = plt.subplots(len(rows), len(lrs), figsize=(max(7.0, 4.6 * len(lrs)), 3.0 * len(rows)), squeeze=False)
    for j, lr in enumerate(lrs):
        for i, (key, ylabel) in enumerate(rows):
            ax = axes[i][j]
            for n in norms:
                seeds = runs.get((group, n, lr))
                if not seeds:
                    continue
                if key == "test_acc":
                    s = _series(seeds, "eval", lambda r: None if r.get("test_acc") is None else 100 * r["test_acc"])
                    _plot(ax, s, n, marker=".", ms=4)
                elif key == "acc":
                    s = _series(seeds, "train", lambda r: None if r.get("acc") is None else 100 * r["acc"],
                                smooth=_smooth_for(seeds))
                    _plot(ax, s, n)
                else:
                    _plot(ax, _series(seeds, "train", "loss", smooth=_smooth_for(seeds)), n)
                _diverged_marks(ax, seeds, n)
            if key == "loss":
                ax.set_yscale("log")
            ax.set_ylabel(ylabel)
            ax.set_xlabel("training step")
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(f"LR = {lr:g}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.suptitle(title)
    if handles:  # one legend for the figure, below the panels, so it hides no curve
        ncol = min(len(labels), 3 if len(lrs) == 1 else 6)
        nrow = -(-len(labels) // ncol)
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=9)
        fig.tight_layout(rect=(0, (0.2 + 0.25 * nrow) / fig.get_figheight(), 1, 1))
    return _save(fig, path, layout=not handles)


def histograms(runs: Runs, norms: Sequence[str], layers: Sequence[int], lr: float, path: Path, title: str,
               group: str = "main", max_times: int = 5,
               xlabel: str = "pre-activation (output of conv -> norm)",
               paper: Optional[Dict[int, int]] = None) -> Optional[Path]:
    """Activation densities (normalization layer output) of chosen layers at several training steps (seed 0)."""
    norms = [n for n in norms if runs.get((group, n, lr))]
    if not norms:
        return None
    fig, axes = plt.subplots(len(layers), len(norms), figsize=(3.4 * len(norms), 2.5 * len(layers)), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for j, n in enumerate(norms):
        recs = runs[(group, n, lr)][0]
        meas = [r for r in recs if r["type"] == "measure" and r.get("hist")]
        if len(meas) > max_times:
            idx = np.unique(np.linspace(0, len(meas) - 1, max_times).round().astype(int))
            meas = [meas[k] for k in idx]
        last_step = max((m["step"] for m in meas), default=1) or 1
        for i, layer in enumerate(layers):
            ax = axes[i][j]
            for m in meas:
                h = m["hist"].get(str(layer))
                if not h or "density" not in h:
                    continue
                edges = np.linspace(h["lo"], h["hi"], len(h["density"]) + 1)
                centers = 0.5 * (edges[1:] + edges[:-1])
                ax.plot(centers, h["density"], color=cmap(m["step"] / last_step), lw=1.2,
                        label=f"step {m['step']}")
            if i == 0:
                ax.set_title(f"{LABELS.get(n, n)}", color=COLORS.get(n))
            ax.set_ylabel(f"layer {_layer_name(layer, paper)}: density")
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            if i == 0 and j == len(norms) - 1:
                _legend(ax, fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def _layer_name(layer: int, paper: Optional[Dict[int, int]]) -> str:
    """'#k', with the paper's number beside it where this network's layer stands for another one."""
    p = (paper or {}).get(layer)
    return f"#{layer}" + (f" (paper's #{p})" if p is not None and p != layer else "")


def ics(runs: Runs, norms: Sequence[str], layers: Sequence[int], lrs: Sequence[float], path: Path,
        title: str, group: str = "main", paper: Optional[Dict[int, int]] = None) -> Optional[Path]:
    """Definition 2.1 over training: ||G - G'|| (top) and cos(G, G') (bottom) per chosen layer and LR;
    `paper`: this network's layer -> the paper's layer it stands for (named in the titles)."""
    cols = [(layer, lr) for lr in lrs for layer in layers if any(runs.get((group, n, lr)) for n in norms)]
    if not cols:
        return None
    fig, axes = plt.subplots(2, len(cols), figsize=(3.6 * len(cols), 5.6), squeeze=False)
    for j, (layer, lr) in enumerate(cols):
        l2_vals = []
        for n in norms:
            seeds = runs.get((group, n, lr))
            if not seeds:
                continue

            def pick(field):
                def f(r):
                    ics_list = r.get("ics") or []
                    return ics_list[layer - 1].get(field) if len(ics_list) >= layer else None
                return f
            s = _series(seeds, "measure", pick("l2"))
            _plot(axes[0][j], s, n, marker=".", ms=4)
            if s is not None:
                l2_vals += [v for v in s[1].tolist() if math.isfinite(v)]
            _plot(axes[1][j], _series(seeds, "measure", pick("cosine")), n, marker=".", ms=4)
        axes[0][j].set_title(f"layer {_layer_name(layer, paper)}, LR = {lr:g}")
        axes[0][j].set_ylabel("||G - G'||  (l2 difference)")
        _logy_if_span(axes[0][j], l2_vals)
        axes[1][j].set_ylabel("cos(G, G')")
        axes[1][j].set_ylim(-1.05, 1.05)
        for ax in axes[:, j]:
            ax.set_xlabel("training step")
            ax.grid(alpha=0.3)
    _legend(axes[0][0], fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def _band_over_seeds(seeds: List[List[dict]], key: str):
    """(steps, mean over seeds of min over eta, mean over seeds of max over eta) of probe list `key`."""
    lo_s, hi_s = [], []
    for recs in seeds:
        meas = [r for r in recs if r["type"] == "measure" and r.get("probe")]
        if not meas:
            continue
        vals = np.array([[np.nan if v is None else v for v in m["probe"][key]] for m in meas], dtype=float)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            lo_s.append(dict(zip([m["step"] for m in meas], np.nanmin(vals, 1))))
            hi_s.append(dict(zip([m["step"] for m in meas], np.nanmax(vals, 1))))
    if not lo_s:
        return None
    steps = sorted(set().union(*lo_s))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lo = np.nanmean(np.array([[d.get(t, np.nan) for t in steps] for d in lo_s]), 0)
        hi = np.nanmean(np.array([[d.get(t, np.nan) for t in steps] for d in hi_s]), 0)
    return np.array(steps), lo, hi


def landscape(runs: Runs, norms: Sequence[str], lr: float, path: Path, title: str, group: str = "main") -> Optional[Path]:
    """Fig 4 and its scale-free companions, over training, mean over seeds.

    Top: loss along the gradient (shaded: range over the probe step sizes), gradient predictiveness
    (shaded: range of ||grad(x - eta g) - g|| over eta; its top is what claim 4 compares) and effective
    beta-smoothness (band: seed range). Bottom: max ||dg|| / ||g||, loss range / (eta_max ||g||^2) and ||g||
    itself, which tell a smoother landscape from a larger gradient."""
    norms = [n for n in norms if runs.get((group, n, lr))]
    if not norms:
        return None
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.0))
    any_data = False
    n_seeds = 1
    for n in norms:
        seeds = runs[(group, n, lr)]
        n_seeds = max(n_seeds, len(seeds))
        for ax, key in ((axes[0][0], "losses"), (axes[0][1], "grad_diffs")):
            band = _band_over_seeds(seeds, key)
            if band is None:
                continue
            any_data = True
            steps, lo, hi = band
            ax.fill_between(steps, lo, hi, color=COLORS.get(n), alpha=0.3, linewidth=0)
            ax.plot(steps, lo, color=COLORS.get(n), lw=0.8)
            ax.plot(steps, hi, color=COLORS.get(n), lw=0.8, label=LABELS.get(n, n))
        for ax, key in ((axes[0][2], "beta"), (axes[1][0], "grad_pred_rel"), (axes[1][1], "loss_range_rel"),
                        (axes[1][2], "grad_norm")):
            _plot(ax, _series(seeds, "measure", lambda r, k=key: (r.get("probe") or {}).get(k)), n, marker=".", ms=4)
    if not any_data:
        plt.close(fig)
        return None
    labels = ("loss L(x - eta g), range over eta (log)", "||grad L(x - eta g) - grad L(x)||, range over eta (log)",
              "effective beta-smoothness (log)", "max over eta ||dg|| / ||g|| (log)",
              "loss range / (eta_max ||g||^2) (log)", "||g|| (log)")
    titles = ("(a) loss landscape", "(b) gradient predictiveness", "(c) effective beta-smoothness",
              "(d) gradient change relative to ||g||", "(e) loss range relative to first order", "(f) gradient norm")
    for ax, ylabel, t in zip(axes.reshape(-1), labels, titles):
        ax.set_yscale("log")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_xlabel("training step")
        ax.set_title(t)
        ax.grid(alpha=0.3, which="both")
    _legend(axes[0][0], fontsize=8)
    seeds_text = f"mean over {n_seeds} seeds" if n_seeds > 1 else "one seed"
    fig.suptitle(title + f" (LR = {lr:g}, {seeds_text}; shaded: range over the probe step sizes)")
    return _save(fig, path)


def drift(runs: Runs, norms: Sequence[str], lr: float, path: Path, title: str, group: str = "main") -> Optional[Path]:
    """(a) The drift claims 2 and 5 compare: on the fixed probe batch, between consecutive measurement points,
    of the input the next layer sees, |d mu|/sigma + |d sigma|/sigma per channel (mean over channels and
    layers; mean over seeds with a min-max band), and dotted its sampling floor (the same statistic between
    the two halves of the probe batch). (b) The same per layer, mean over point pairs. (c) For reference only,
    the per-step change of the normalization layers' outputs (batch t against t-1): BN pins their mean and
    variance by construction, so it cannot decide anything."""
    from .analysis import probe_drift_steps
    norms = [n for n in norms if runs.get((group, n, lr))]
    if not norms:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for n in norms:
        seeds = runs[(group, n, lr)]
        per_seed, floors, per_layer = [], [], []
        for recs in seeds:
            meas = [r for r in recs if r["type"] == "measure"]
            pts = probe_drift_steps(meas)
            per_seed.append([{"type": "p", "step": t, "v": float(np.mean(list(d.values()))) if d else None}
                             for t, d in pts])
            floors.append([{"type": "p", "step": m["step"], "v": float(np.mean(
                [v["floor"] for v in m["probe_stats"].values() if v.get("floor") is not None] or [np.nan]))}
                for m in meas if m.get("probe_stats")])
            if pts:
                names = list(pts[-1][1])
                per_layer.append([np.nanmean([d.get(k, np.nan) for _, d in pts]) for k in names])
        _plot(axes[0], _series(per_seed, "p", "v"), n)
        _plot(axes[0], _series(floors, "p", "v"), n, label="_nolegend_", band=False, linestyle=":", linewidth=1)
        if per_layer and len({len(p) for p in per_layer}) == 1:
            m = np.nanmean(np.array(per_layer), 0)
            axes[1].plot(np.arange(2, len(m) + 2), m, marker="o", ms=4, color=COLORS.get(n), label=LABELS.get(n, n))

        def rel(r):
            vals = [v for v in (r.get("drift_rel") or []) if v is not None]
            return sum(vals) / len(vals) if vals else None
        _plot(axes[2], _series(seeds, "train", rel, smooth=_smooth_for(seeds)), n)
    axes[0].set_ylabel("|d mu|/sigma + |d sigma|/sigma, mean over layers", fontsize=8)
    axes[0].set_xlabel("training step (drift since the previous measurement)")
    axes[0].set_title("(a) probe-batch drift (dotted: sampling floor)")
    axes[1].set_ylabel("|d mu|/sigma + |d sigma|/sigma, mean over points", fontsize=8)
    axes[1].set_xlabel("layer # whose input is measured")
    axes[1].set_title("(b) probe-batch drift per layer")
    axes[2].set_ylabel("|d mu|/sigma + |d var|/var per step", fontsize=8)
    axes[2].set_xlabel("training step")
    axes[2].set_title("(c) norm outputs, batch t vs t-1 (reference)")
    for ax in axes:
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    _legend(axes[0], fontsize=8)
    fig.suptitle(title + f" (LR = {lr:g}; per channel, averaged over channels; mean over seeds)")
    return _save(fig, path)


def lr_sweep(summaries: List[dict], norms: Sequence[str], stable: Dict[str, Optional[float]], path: Path,
             title: str) -> Optional[Path]:
    """Final training loss against LR per normalization; diverged runs marked x at the top, the largest
    stable LR per normalization as a dashed line."""
    rows = [s for s in summaries if s["spec"]["group"] == "sweep"]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    finite = [s["final_loss"] for s in rows if s.get("final_loss") is not None]
    top = max(finite) * 2 if finite else 10.0
    for n in norms:
        mine = sorted((s for s in rows if s["spec"]["norm"] == n), key=lambda s: s["spec"]["lr"])
        if not mine:
            continue
        lrs = sorted({s["spec"]["lr"] for s in mine})
        means = []
        for lr in lrs:
            v = [s["final_loss"] for s in mine if s["spec"]["lr"] == lr and not s["diverged"] and s.get("final_loss") is not None]
            means.append(sum(v) / len(v) if v else np.nan)
        ax.plot(lrs, means, marker="o", color=COLORS.get(n), label=LABELS.get(n, n))
        div = [s["spec"]["lr"] for s in mine if s["diverged"]]
        if div:
            ax.scatter(div, [top] * len(div), marker="x", s=60, color=COLORS.get(n))
        if stable.get(n) is not None:
            ax.axvline(stable[n], color=COLORS.get(n), ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("learning rate (log)")
    ax.set_ylabel("final training loss (log); x = diverged")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, fontsize=8)
    ax.set_title(title + "\n(dashed: largest stable LR)")
    return _save(fig, path)


def curvature(runs: Runs, norms: Sequence[str], lr: float, path: Path, title: str, group: str = "main") -> Optional[Path]:
    norms = [n for n in norms if runs.get((group, n, lr))]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    drew = False
    for n in norms:
        s = _series(runs[(group, n, lr)], "measure", "hessian_top")
        if s is not None and np.isfinite(s[1]).any():
            _plot(ax, s, n, marker=".", ms=4)
            drew = True
    if not drew:
        plt.close(fig)
        return None
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("training step")
    ax.set_ylabel("top Hessian eigenvalue (train-mode BN; symlog)")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, fontsize=8)
    ax.set_title(title + f" (LR = {lr:g})")
    return _save(fig, path)
