"""python -m bnext.experiments.vgg: Santurkar et al. (2018) on a VGG, CIFAR-10 (or the synthetic fallback).

Trains the grid norms x lrs x seeds (plus the ICS learning rates for none/BN), measuring every
--measure-every steps: ICS of every conv layer, line probes along the gradient, activation histograms,
the Theorem 4.1 identity; per step: loss, accuracy and each layer's activation mean/variance change.
Then writes the paper's figures and report.md with the claims table. See PROTOCOL.md.

    python -m bnext.experiments.vgg                      # quick preset: everything, <= 15 min on 2 CPU cores
    python -m bnext.experiments.vgg --preset paper       # the paper's protocol (GPU)
    torchrun --nproc_per_node=2 -m bnext.experiments.vgg # runs spread over 2 processes
    python -m bnext.experiments.vgg --procs 2 --data-parallel   # each run on 2 processes (DDP, synced norms)
"""
import dataclasses
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from . import analysis, figures, measure
from .common import RunSpec
from .config import log_grid, option, parse_config
from .models import NORMS, PLAIN_NOISE, VGG_NORMS, build_vgg, named_points, vgg_layer_names
from .runner import Experiment, execute

ALL_NORMS = list(NORMS)


@dataclasses.dataclass
class VGGConfig:
    preset: str = option("quick", "preset name")
    # --- grid
    norms: List[str] = option(ALL_NORMS, "normalizations (bnext.nn.convert targets)", )
    lrs: List[float] = option([0.1, 0.5], "learning rates of the main grid (paper Fig 1: 0.1 and 0.5)")
    ics_lrs: List[float] = option([0.01], "extra learning rates run for --ics-norms only (paper Fig 3: 0.1 and 0.01)")
    ics_norms: List[str] = option(["none", "bn"], "normalizations run at the extra --ics-lrs")
    ref_lr: float = option(0.1, "LR whose runs the noisy-BN, landscape and l_p figures and claims use")
    seeds: List[int] = option([0], "seeds (model init, batch order, noise)")
    plain_noise: bool = option(True, "also train the unnormalized network with noisy BN's noise injected after each "
                                     "conv, at --ref-lr (claim 2: the noise alone prevents a plain network from training)")
    # --- training
    steps: int = option(320, "training steps per run (paper: 15000)")
    batch_size: int = option(128, "batch size")
    width: float = option(0.125, "VGG-16 width multiplier (1 = the 64..512 channels of VGG-16)")
    init: str = option("glorot", "weight init: glorot (Xavier uniform, zero bias) or torch", choices=["glorot", "torch"])
    momentum: float = option(0.0, "SGD momentum ([choice]: plain SGD)")
    weight_decay: float = option(0.0, "SGD weight decay ([choice]: none)")
    # --- data
    dataset: str = option("auto", "auto (CIFAR-10, else synthetic), cifar10 or synthetic",
                          choices=["auto", "cifar10", "synthetic"])
    data_dir: Optional[str] = option(None, "CIFAR-10 directory (default $BNEXT_DATA or ~/.cache/bnext)")
    download: bool = option(True, "download CIFAR-10 if absent")
    train_size: int = option(10000, "training images used (0: all 50000)")
    test_size: int = option(2000, "test images used (0: all 10000)")
    # --- measurement
    eval_every: int = option(40, "steps between test-set evaluations (0: never)")
    measure_every: int = option(40, "steps between landscape measurements (0: never) [choice: K]")
    probe_etas: List[float] = option([0.5, 4.0], "line-probe step sizes as multiples of the LR: two values = a "
                                                 "log grid of --probe-points between them, more = the list itself")
    probe_points: int = option(8, "points of the line-probe log grid [choice: 8]")
    hist_layers: List[int] = option([2, 3, 9, 11, 13], "conv layers (1-based) whose activation histograms are recorded")
    ics_layers: List[int] = option([5, 10], "layers shown in the ICS figure (all layers are measured)")
    curvature: bool = option(False, "also record the top Hessian eigenvalue at each measurement")
    curvature_iters: int = option(20, "power iterations for the Hessian eigenvalue")
    lr_sweep: bool = option(False, "also train each normalization over --sweep-lrs for --sweep-steps (no measurement)")
    sweep_lrs: List[float] = option([0.01, 0.03, 0.1, 0.3, 1.0, 3.0], "learning rates of the LR sweep")
    sweep_steps: int = option(200, "steps per LR-sweep run")
    # --- machine and files
    device: str = option("auto", "auto (CUDA if present), cpu, cuda, cuda:N")
    threads: Optional[int] = option(None, "CPU threads per process (default: torch's, or cores / local ranks)")
    procs: int = option(2, "local processes sharing the grid (relaunches under torchrun; 1: this process). "
                           "On CPU, 2 single-threaded processes beat 1 process x 2 threads, and degrade "
                           "gracefully when other jobs load the cores")
    data_parallel: bool = option(False, "train each run on all --procs processes together (DDP, normalization "
                                        "synchronized across them; see bnext/experiments/data_parallel.py) "
                                        "instead of sharing the grid's runs out among them")
    tune_allocator: bool = option(True, "call bnext.tune_cpu_allocator() on CPU (see README)")
    checkpoint_every: int = option(80, "steps between checkpoints (0: none)")
    out: Optional[str] = option(None, "output directory (default runs/vgg-<preset>)")
    progress: bool = option(True, "tqdm progress bars")
    save_weights: bool = option(False, "keep each run's final weights as runs/<run>/final.pt")

    def validate(self):
        bad = [n for n in self.norms + self.ics_norms if n not in VGG_NORMS]
        if bad:
            raise ValueError(f"unknown normalization(s) {bad}; choose from {list(VGG_NORMS)}")
        if any(lr <= 0 for lr in self.lrs + self.ics_lrs + self.sweep_lrs):
            raise ValueError("learning rates must be positive")
        if self.steps < 1 or self.batch_size < 2 or self.width <= 0:
            raise ValueError("--steps >= 1, --batch-size >= 2 and --width > 0 are required")
        if any(not 1 <= k <= 13 for k in self.hist_layers + self.ics_layers):
            raise ValueError("--hist-layers and --ics-layers are conv layer numbers 1..13")
        if len(self.probe_etas) < 2 or any(e <= 0 for e in self.probe_etas):
            raise ValueError("--probe-etas needs at least two positive multipliers")
        if self.data_parallel and self.procs < 2:
            raise ValueError("--data-parallel needs --procs >= 2 (or a torchrun launch with --procs matching it)")
        if self.out is None:
            self.out = f"runs/vgg-{self.preset}"

    def eta_multipliers(self) -> List[float]:
        if len(self.probe_etas) == 2:
            return log_grid(self.probe_etas[0], self.probe_etas[1], self.probe_points)
        return list(self.probe_etas)


PRESETS: Dict[str, Dict[str, Any]] = {
    "quick": {},
    "paper": {"procs": 1, "steps": 15000, "width": 1.0, "train_size": 0, "test_size": 0, "eval_every": 500,
              "measure_every": 250, "checkpoint_every": 500, "sweep_steps": 2000, "curvature_iters": 50},
}


def _xent(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


class VGGTask(measure.MeasuredTask):
    def __init__(self, cfg: VGGConfig, device: torch.device, say=print):
        from bnext import data as bdata
        self.cfg, self.device, self._bdata = cfg, device, bdata
        ds = bdata.load_dataset(cfg.dataset, data_dir=cfg.data_dir, device=device, download=cfg.download,
                                train_size=cfg.train_size or None, test_size=cfg.test_size or None,
                                progress=cfg.progress)
        self.data = ds
        self.data_source = ds.source
        self.num_classes = ds.num_classes
        self.landscape_ok, self.landscape_why = measure.landscape_available()
        self.loss_fn = _xent

    def build_model(self, spec: RunSpec):
        return build_vgg(spec.norm, self.cfg.width, self.cfg.init, self.num_classes)

    def monitor_points(self, model):
        return named_points(model, ".norm")

    def hist_points(self, model):
        names = vgg_layer_names(model)["norm"]
        return {names[k - 1]: k for k in self.cfg.hist_layers}

    def batch(self, spec: RunSpec, step: int):
        return self._bdata.batch_at(self.data.train_x, self.data.train_y, self.cfg.batch_size, step, seed=spec.seed)

    def loss_and_metrics(self, model, batch):
        x, y = batch
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.detach().argmax(1) == y).float().mean()
        return loss, {"loss": loss.item(), "acc": acc.item()}

    @torch.no_grad()
    def evaluate(self, model) -> Dict[str, float]:
        model.eval()
        total, correct, n = 0.0, 0, 0
        x, y = self.data.test_x, self.data.test_y
        for i in range(0, x.shape[0], 1000):
            logits = model(x[i:i + 1000])
            total += F.cross_entropy(logits, y[i:i + 1000], reduction="sum").item()
            correct += (logits.argmax(1) == y[i:i + 1000]).sum().item()
            n += logits.shape[0]
        model.train()
        return {"test_loss": total / n, "test_acc": correct / n}

    def ics_layers(self, model):
        return vgg_layer_names(model)["conv"]


def specs(cfg: VGGConfig) -> List[RunSpec]:
    out = [RunSpec(n, lr, s, cfg.steps) for n in cfg.norms for lr in cfg.lrs for s in cfg.seeds]
    out += [RunSpec(n, lr, s, cfg.steps) for n in cfg.ics_norms for lr in cfg.ics_lrs if lr not in cfg.lrs
            for s in cfg.seeds]
    if cfg.plain_noise and PLAIN_NOISE not in cfg.norms:
        out += [RunSpec(PLAIN_NOISE, cfg.ref_lr, s, cfg.steps) for s in cfg.seeds]
    if cfg.lr_sweep:
        out += [RunSpec(n, lr, s, cfg.sweep_steps, group="sweep", measure=False)
                for n in cfg.norms for lr in cfg.sweep_lrs for s in cfg.seeds]
    return out


def _ref_lr(cfg: VGGConfig, grid: analysis.Grid) -> float:
    lrs = grid.lrs("main")
    return cfg.ref_lr if cfg.ref_lr in lrs or not lrs else (cfg.lrs[0] if cfg.lrs[0] in lrs else lrs[0])


def make_report(ctx) -> tuple:
    from .report import write_report
    cfg, out, grid, runs = ctx["cfg"], ctx["out"], ctx["grid"], ctx["records"]
    ref = _ref_lr(cfg, grid)
    ics_lrs = sorted({lr for lr in [ref] + list(cfg.ics_lrs) if grid.get("bn", lr) or grid.get("none", lr)}, reverse=True)
    claims = [analysis.claim1(grid, sorted(cfg.lrs)), analysis.claim2(grid, ref), analysis.claim2_plain_noise(grid, ref),
              analysis.claim3_vgg(grid, ics_lrs),
              analysis.claim4(grid, ref), analysis.claim5(grid, ref), analysis.claim6(ctx["summaries"])]
    if cfg.lr_sweep:
        claims.append(analysis.claim_lr_sweep(grid, cfg.norms))
    if cfg.curvature:
        claims.append(analysis.claim_curvature(grid, ref))
    main = [n for n in cfg.norms if n != PLAIN_NOISE]
    figs = []

    def add(path, caption):
        if path is not None:
            figs.append((path, caption))
    add(figures.curves(runs, ["none", "bn"], sorted(cfg.lrs), out / "fig1_accuracy.png",
                       "Fig 1: VGG with and without BatchNorm"), "Fig 1 (a, b): training and test curves, BN vs standard")
    add(figures.histograms(runs, ["none", "bn"], [k for k in (3, 11) if k in cfg.hist_layers], ref,
                           out / "fig1_histograms.png", f"Fig 1 (c): activation distributions (LR {ref:g})"),
        "Fig 1 (c): activation histograms, layers #3 and #11")
    add(figures.curves(runs, ["none", "bn", "noisy_bn", PLAIN_NOISE], sorted(cfg.lrs), out / "fig2_noisy_bn.png",
                       "Fig 2: noisy BatchNorm (Algorithm 1)"), "Fig 2: noisy BN training and test curves")
    add(figures.histograms(runs, ["none", "bn", "noisy_bn"], [k for k in (2, 9, 13) if k in cfg.hist_layers], ref,
                           out / "fig2_histograms.png", f"Fig 2: activation distributions (LR {ref:g})"),
        "Fig 2: activation histograms, layers #2, #9, #13")
    add(figures.ics(runs, ["none", "bn"], cfg.ics_layers, ics_lrs, out / "fig3_ics.png",
                    "Fig 3: internal covariate shift (Definition 2.1), VGG"), "Fig 3: ICS, VGG")
    add(figures.landscape(runs, main, ref, out / "fig4_landscape.png", "Fig 4: landscape along the gradient, VGG"),
        "Fig 4: loss landscape, gradient predictiveness, beta-smoothness")
    add(figures.curves(runs, ["none", "bn", "l1", "l2", "linf"], sorted(cfg.lrs), out / "fig_lp_curves.png",
                       "l_p normalization: training and test curves"), "l_p normalizations: curves")
    add(figures.histograms(runs, ["bn", "l1", "l2", "linf"], [k for k in (3, 11) if k in cfg.hist_layers], ref,
                           out / "fig_lp_histograms.png", f"l_p normalization: activation distributions (LR {ref:g})"),
        "l_p normalizations: activation histograms")
    add(figures.drift(runs, main, ref, out / "fig_drift.png", "Activation mean/variance change per step"),
        "Per-step change of each layer's activation mean and variance")
    if cfg.lr_sweep:
        stable = {n: analysis.largest_stable_lr(grid, n) for n in cfg.norms}
        add(figures.lr_sweep(ctx["summaries"], cfg.norms, stable, out / "fig_lr_sweep.png",
                             f"LR sweep ({cfg.sweep_steps} steps)"), "LR sweep: final loss vs LR")
    if cfg.curvature:
        add(figures.curvature(runs, main, ref, out / "fig_curvature.png", "Top Hessian eigenvalue over training"),
            "Curvature: top Hessian eigenvalue")
    text = write_report(out / "report.md", title="How does BatchNorm help optimization? VGG reproduction",
                        command=ctx["command"], env=ctx["env"], data_source=ctx["data_source"],
                        settings={k: getattr(cfg, k) for k in ("preset", "width", "steps", "batch_size", "train_size",
                                                              "test_size", "measure_every", "eval_every", "seeds")},
                        claims=claims, summaries=ctx["summaries"], missing=ctx["missing"], failed=ctx["failed"],
                        figures=figs, timing=ctx["timing"],
                        notes=analysis.untrained_notes(ctx["summaries"]) + [f"Reference LR for claims 2, 4, 5: {ref:g}; ICS LRs: {', '.join(f'{v:g}' for v in ics_lrs)}.",
                               "Line probes use step sizes " + ", ".join(f"{m:.3g}" for m in cfg.eta_multipliers())
                               + " x LR, BN in train mode; activation statistics are the normalization layers' outputs."])
    return claims, figs, text


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(VGGConfig, PRESETS, argv, "python -m bnext.experiments.vgg", __doc__.split("\n\n")[0])
    return execute(Experiment("vgg", cfg, VGGTask, specs, make_report, list(argv)))


if __name__ == "__main__":
    sys.exit(main())
