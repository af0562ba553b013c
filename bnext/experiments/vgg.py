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
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import analysis, figures
from .common import RunSpec
from .config import BaseConfig, option
from .models import NORMS, PLAIN_NOISE, VGG_BLOCKS, VGG_NORMS, build_vgg, named_points, paper_layer, vgg_layer_names
from .runner import command

ALL_NORMS = list(NORMS)
PAPER_HIST_LAYERS = (2, 3, 9, 11, 13)  # the paper's VGG-16 layers in Fig 1 (c) (#3, #11) and Fig 2 (#2, #9, #13)
PAPER_ICS_LAYERS = (5, 10)            # Fig 3


@dataclasses.dataclass
class VGGConfig(BaseConfig):
    """BaseConfig plus the VGG's own options (network, data, LR sweep)."""
    NAME: ClassVar[str] = "vgg"
    NORMS: ClassVar[Tuple[str, ...]] = VGG_NORMS
    plain_noise: bool = option(True, "also train the unnormalized network with noisy BN's noise injected after each "
                                     "conv, at --ref-lr (claim 2: the noise alone prevents a plain network from training)")
    arch: str = option("vgg11", "VGG depth: vgg11/13/16/19 (8/10/13/16 conv layers; paper: vgg16). The quick "
                                "preset's vgg11: its unnormalized network leaves its initial loss within the "
                                "budget, VGG-16's does not (experiments README)",
                       choices=sorted(VGG_BLOCKS))
    width: float = option(0.125, "width multiplier (1 = the 64..512 channels of VGG)")
    channels_last: bool = option(True, "train in channels-last layout ([choice]: the same network; its whole "
                                       "training step is ~1.35x faster on CPU than NCHW, experiments README)")
    all_lr_norms: List[str] = option(["none", "bn"], "normalizations trained at every --lrs; the others run at "
                                                    "--ref-lr only, the one LR whose runs claims 2 and 5 use")
    batch_size: int = option(128, "batch size")
    dataset: str = option("auto", "auto (CIFAR-10, else synthetic), cifar10 or synthetic",
                          choices=["auto", "cifar10", "synthetic"])
    data_dir: Optional[str] = option(None, "CIFAR-10 directory (default $BNEXT_DATA or ~/.cache/bnext)")
    download: bool = option(True, "download CIFAR-10 if absent")
    train_size: int = option(10000, "training images used (0: all 50000)")
    test_size: int = option(2000, "test images used (0: all 10000)")
    lr_sweep: bool = option(False, "also train each normalization over --sweep-lrs for --sweep-steps (no measurement)")
    sweep_lrs: List[float] = option([0.01, 0.03, 0.1, 0.3, 1.0, 3.0], "learning rates of the LR sweep")
    sweep_steps: int = option(200, "steps per LR-sweep run")

    def validate(self):
        super().validate()
        if any(not lr > 0 for lr in self.sweep_lrs):
            raise ValueError("--sweep-lrs: learning rates must be positive")
        if self.batch_size < 2:
            raise ValueError("--batch-size must be >= 2 (batch statistics need two samples)")
        if not self.width > 0:
            raise ValueError("--width must be > 0")
        if self.sweep_steps < 1:
            raise ValueError("--sweep-steps must be >= 1")
        if self.train_size < 0 or self.test_size < 0:
            raise ValueError("--train-size and --test-size must be >= 0 (0: all)")
        if self.train_size and self.train_size < self.batch_size:
            raise ValueError(f"--train-size {self.train_size} is smaller than --batch-size {self.batch_size}")
        convs = sum(VGG_BLOCKS[self.arch])
        if self.hist_layers is None:
            self.hist_layers = sorted({paper_layer(k, self.arch) for k in PAPER_HIST_LAYERS})
        if self.ics_layers is None:
            self.ics_layers = [paper_layer(k, self.arch) for k in PAPER_ICS_LAYERS]
        if any(not 1 <= k <= convs for k in self.hist_layers + self.ics_layers):
            raise ValueError(f"--hist-layers and --ics-layers are conv layer numbers 1..{convs} for --arch {self.arch}")


# The quick preset (experiments README, "Quick preset"): VGG-11 at width 1/8, whose plain network at LR 0.1
# leaves its initial loss (last-10% mean / first loss 0.71 at 640 steps, 0.89 at 320); VGG-16 does not
# (1.00 at 320). Three seeds, so that every margin is a measured seed spread; to fit them in the budget, only
# the runs that can decide something: noisy BN and l_p at the reference LR only (claims 2 and 5 use no other),
# and no ICS LR 0.01 (its plain network never leaves its initial loss in 640 steps, so that comparison could
# only ever be inconclusive); channels-last training.
QUICK: Dict[str, Any] = {
    "norms": ALL_NORMS, "lrs": [0.1, 0.5], "ics_lrs": [], "ref_lr": 0.1, "seeds": [0, 1, 2], "steps": 640,
    "eval_every": 40, "measure_every": 40, "probe_etas": [0.5, 4.0], "checkpoint_every": 80,
}
PRESETS: Dict[str, Dict[str, Any]] = {
    "quick": QUICK,
    "paper": {"procs": 1, "arch": "vgg16", "all_lr_norms": ALL_NORMS, "ics_lrs": [0.01], "seeds": [0, 1, 2], "steps": 15000, "width": 1.0, "train_size": 0,
              "test_size": 0, "eval_every": 500, "measure_every": 250, "checkpoint_every": 500, "sweep_steps": 2000,
              "curvature_iters": 50},
}


def load_data(cfg: VGGConfig, device: torch.device):
    """The data set on `device`; raises bnext.data.DataError (naming the file) for missing or bad data."""
    from bnext import data as bdata
    return bdata.load_dataset(cfg.dataset, data_dir=cfg.data_dir, device=device, download=cfg.download,
                              train_size=cfg.train_size or None, test_size=cfg.test_size or None,
                              progress=cfg.progress)


def check_data(cfg: VGGConfig) -> None:
    """Before any worker process starts: find (or download) and validate the data, so that a missing,
    corrupt or unsafe file ends the command with one line instead of one traceback per rank."""
    if cfg.dataset != "synthetic":  # the synthetic task cannot fail
        load_data(cfg, torch.device("cpu"))


class VGGTask:
    """Image classification on a VGG: the data on the device, the model, the cross-entropy loss."""

    def __init__(self, cfg: VGGConfig, device: torch.device):
        from bnext import data as bdata
        self.cfg, self.device, self._bdata = cfg, device, bdata
        self.data = load_data(cfg, device)
        self.data_source = {"description": self.data.source, "name": self.data.name,
                            "statistics": self.data.statistics}
        self.num_classes = self.data.num_classes

    def build_model(self, spec: RunSpec):
        model = build_vgg(spec.norm, self.cfg.width, self.cfg.init, self.num_classes, self.cfg.arch)
        return model.to(memory_format=torch.channels_last) if self.cfg.channels_last else model

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def probe_batch(self):
        """The fixed batch the drift of claims 2 and 5 is measured on: the first --batch-size training images,
        the same for every run and measurement point (no batch-sampling noise between points)."""
        n = self.cfg.batch_size
        return self._layout(self.data.train_x[:n]), self.data.train_y[:n]

    def monitor_points(self, model):
        return named_points(model, ".norm")

    def hist_points(self, model):
        names = vgg_layer_names(model)["norm"]
        return {names[k - 1]: k for k in self.cfg.hist_layers}

    def batch(self, spec: RunSpec, step: int):
        x, y = self._bdata.batch_at(self.data.train_x, self.data.train_y, self.cfg.batch_size, step, seed=spec.seed)
        return self._layout(x), y

    def loss_fn(self, model, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

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
            logits = model(self._layout(x[i:i + 1000]))
            total += F.cross_entropy(logits, y[i:i + 1000], reduction="sum").item()
            correct += (logits.argmax(1) == y[i:i + 1000]).sum().item()
            n += logits.shape[0]
        model.train()
        return {"test_loss": total / n, "test_acc": correct / n}

    def ics_layers(self, model):
        return vgg_layer_names(model)["conv"]


def specs(cfg: VGGConfig) -> List[RunSpec]:
    out = [RunSpec(n, lr, s, cfg.steps) for n in cfg.norms for lr in cfg.lrs for s in cfg.seeds
           if n in cfg.all_lr_norms or lr == cfg.ref_lr]
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


def _own_layers(cfg: VGGConfig, paper: tuple) -> List[int]:
    """The recorded layers of this --arch that stand for the paper's VGG-16 layers `paper`."""
    return [k for k in dict.fromkeys(paper_layer(p, cfg.arch) for p in paper) if k in cfg.hist_layers]


def _layer_names(cfg: VGGConfig, paper: tuple) -> str:
    own = [paper_layer(p, cfg.arch) for p in paper]
    text = ", ".join(f"#{k}" for k in own)
    return text if own == list(paper) else text + " (standing for the paper's " + ", ".join(f"#{p}" for p in paper) + ")"


def _seeds_note(cfg: VGGConfig) -> str:
    if len(cfg.seeds) == 1:
        return (f"One seed ({cfg.seeds[0]}): the verdicts have no seed spread to use as a margin, so every "
                "comparison that needs one is inconclusive.")
    return f"{len(cfg.seeds)} seeds ({', '.join(map(str, cfg.seeds))}): values are seed means, margins the seed spread."


def _layers_note(cfg: VGGConfig) -> str:
    if cfg.arch == "vgg16":
        return "Network: VGG-16, the paper's; layer numbers are the paper's."
    pairs = ", ".join(f"#{paper_layer(k, cfg.arch)} for #{k}" for k in sorted(set(PAPER_HIST_LAYERS + PAPER_ICS_LAYERS)))
    return (f"Network: {cfg.arch} ({sum(VGG_BLOCKS[cfg.arch])} conv layers; the paper's is VGG-16 with 13). Its layers "
            f"standing for the paper's (same block, same place in it): {pairs}.")


def make_report(ctx) -> tuple:
    from .report import write_experiment_report
    cfg, out, grid, runs = ctx["cfg"], ctx["out"], ctx["grid"], ctx["records"]
    ref = _ref_lr(cfg, grid)
    ics_lrs = analysis.ics_lrs(grid, ref, cfg.ics_lrs)
    claims = [analysis.claim1(grid, sorted(cfg.lrs)), analysis.claim2(grid, ref), analysis.claim2_plain_noise(grid, ref),
              analysis.claim3_vgg(grid, ics_lrs),
              *analysis.claim4(grid, ref), analysis.claim5(grid, ref), analysis.claim6(grid, ref)]
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
    fig1_layers = _own_layers(cfg, (3, 11))
    paper = {paper_layer(p, cfg.arch): p for p in PAPER_HIST_LAYERS + PAPER_ICS_LAYERS}  # own layer -> paper's
    add(figures.histograms(runs, ["none", "bn"], fig1_layers, ref,
                           out / "fig1_histograms.png", f"Fig 1 (c): activation distributions (LR {ref:g})",
                           paper=paper),
        f"Fig 1 (c): activation histograms, layers {_layer_names(cfg, (3, 11))}")
    add(figures.curves(runs, ["none", "bn", "noisy_bn", PLAIN_NOISE], sorted(cfg.lrs), out / "fig2_noisy_bn.png",
                       "Fig 2: noisy BatchNorm (Algorithm 1)"), "Fig 2: noisy BN training and test curves")
    add(figures.histograms(runs, ["none", "bn", "noisy_bn"], _own_layers(cfg, (2, 9, 13)), ref,
                           out / "fig2_histograms.png", f"Fig 2: activation distributions (LR {ref:g})",
                           paper=paper),
        f"Fig 2: activation histograms, layers {_layer_names(cfg, (2, 9, 13))}")
    add(figures.ics(runs, ["none", "bn"], cfg.ics_layers, ics_lrs, out / "fig3_ics.png",
                    "Fig 3: internal covariate shift (Definition 2.1), VGG", paper=paper),
        f"Fig 3: ICS, VGG, layers {_layer_names(cfg, PAPER_ICS_LAYERS)}")
    add(figures.landscape(runs, main, ref, out / "fig4_landscape.png", "Fig 4: landscape along the gradient, VGG"),
        "Fig 4: loss landscape, gradient predictiveness, beta-smoothness")
    add(figures.curves(runs, ["none", "bn", "l1", "l2", "linf"], sorted(cfg.lrs), out / "fig_lp_curves.png",
                       "l_p normalization: training and test curves"), "l_p normalizations: curves")
    add(figures.histograms(runs, ["bn", "l1", "l2", "linf"], fig1_layers, ref,
                           out / "fig_lp_histograms.png", f"l_p normalization: activation distributions (LR {ref:g})"),
        "l_p normalizations: activation histograms")
    add(figures.drift(runs, main, ref, out / "fig_drift.png", "Activation drift (claims 2 and 5)"),
        "Drift on the fixed probe batch (what claims 2 and 5 compare), its sampling floor, and the per-step change of the normalization outputs for reference")
    if cfg.lr_sweep:
        stable = {n: analysis.largest_stable_lr(grid, n) for n in cfg.norms}
        add(figures.lr_sweep(ctx["summaries"], cfg.norms, stable, out / "fig_lr_sweep.png",
                             f"LR sweep ({cfg.sweep_steps} steps)"), "LR sweep: final loss vs LR")
    if cfg.curvature:
        add(figures.curvature(runs, main, ref, out / "fig_curvature.png", "Top Hessian eigenvalue over training"),
            "Curvature: top Hessian eigenvalue")
    text = write_experiment_report(
        ctx, title="How does BatchNorm help optimization? VGG reproduction",
        settings=("preset", "arch", "width", "steps", "batch_size", "train_size", "test_size", "measure_every",
                  "eval_every", "seeds"),
        claims=claims, figures=figs,
        notes=[_seeds_note(cfg), _layers_note(cfg),
               f"Reference LR for claims 2, 4, 5: {ref:g}; ICS LRs: {', '.join(f'{v:g}' for v in ics_lrs)}."],
        probes="BN in train mode; activation statistics are the normalization layers' outputs.")
    return claims, figs, text


def main(argv: Optional[List[str]] = None) -> int:
    return command("vgg", VGGConfig, PRESETS, __doc__, argv, VGGTask, specs, make_report, check=check_data)


if __name__ == "__main__":
    sys.exit(main())
