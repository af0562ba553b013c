"""python -m bnext.experiments.dln: the paper's deep linear network (PROTOCOL.md "DLN").

25 square 10x10 linear layers, loss ||W_25...W_1 X - A X||^2 (summed over outputs and over the 1,000
Gaussian points, the paper's formula; --loss-reduction mean averages over points instead), full-batch gradient descent, Glorot init, with and without BatchNorm after every
linear layer but the last (and the l_p normalizations). Measures ICS of every layer (paper: #9 and #17
at LR 1e-6 and 1e-7) and the landscape along the gradient over [0.01, 30] x LR; writes loss curves,
ICS and landscape figures and report.md with the DLN claims rows.

    python -m bnext.experiments.dln                  # quick: 4,000 steps, a few minutes on 2 CPU cores
    python -m bnext.experiments.dln --preset paper   # the paper's 10,000 steps
"""
import dataclasses
import sys
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch

from . import analysis, figures
from .common import RunSpec
from .config import BaseConfig, option
from .models import NORMS, build_dln, named_points
from .runner import command


@dataclasses.dataclass
class DLNConfig(BaseConfig):
    """BaseConfig plus the deep linear network's own options."""
    NAME: ClassVar[str] = "dln"
    NORMS: ClassVar[Tuple[str, ...]] = NORMS
    depth: int = option(25, "linear layers (paper: 25)")
    dim: int = option(10, "width of every layer (paper: 10)")
    points: int = option(1000, "data points x (paper: 1000)")
    data_seed: int = option(0, "seed of A and x")
    loss_reduction: str = option("sum", "how the squared error combines the points: sum (the paper's ||W X - A X||^2, "
                                        "for which its LRs 1e-6/1e-7 are sized) or mean (PROTOCOL.md's [choice]; at "
                                        "those LRs a mean loss barely moves in 10,000 steps)", choices=["sum", "mean"])

    def validate(self):
        super().validate()
        if self.depth < 2 or self.dim < 1 or self.points < 2:
            raise ValueError("--depth >= 2, --dim >= 1 and --points >= 2 are required")
        if self.eval_every:
            raise ValueError("--eval-every: the DLN task has no test set (use 0)")
        if self.data_parallel:
            raise ValueError("--data-parallel: only the VGG experiment trains a run on several processes")
        if self.hist_layers is None:
            self.hist_layers = [k for k in (9, 17) if k < self.depth]
        if self.ics_layers is None:
            self.ics_layers = [k for k in (9, 17) if k <= self.depth]
        if any(not 1 <= k <= self.depth for k in self.ics_layers):
            raise ValueError(f"--ics-layers must be in 1..{self.depth}")
        if any(not 1 <= k < self.depth for k in self.hist_layers):
            raise ValueError(f"--hist-layers must be in 1..{self.depth - 1} (the last layer has no normalization)")


# The paper's regime: its plain DLN keeps an ICS cosine ~1 for the whole run, i.e. gradient descent below its
# edge of stability (sharpness < 2/LR). With the summed loss at LR 1e-6 both networks sit at the edge
# (effective beta ~ 2/LR, cosines ~ -0.9: period-2 oscillation); at 1e-7 the plain network's beta * LR / 2 is
# ~0.005 (experiments README). The probe's step sizes stay inside the stable range (at most 1 x LR, which
# training itself takes); the paper's LRs remain options (--lrs 1e-6 --ics-lrs 1e-7).
QUICK: Dict[str, Any] = {
    "norms": ["none", "bn", "l1", "l2", "linf"], "lrs": [1e-7], "ics_lrs": [], "ref_lr": 1e-7, "seeds": [0, 1, 2],
    "steps": 4000, "measure_every": 200, "probe_etas": [0.01, 1.0], "device": "cpu", "threads": 1,
    "checkpoint_every": 1000,
}
PRESETS: Dict[str, Dict[str, Any]] = {"quick": QUICK, "paper": {"seeds": [0, 1, 2], "steps": 10000,
                                                                "measure_every": 500}}


def squared_error(reduction: str):
    """The DLN loss: squared error summed over outputs, then summed (the paper's Frobenius norm) or averaged
    over the points."""
    def loss(model, batch):
        x, y = batch
        per_point = (model(x) - y).pow(2).sum(1)
        return per_point.sum() if reduction == "sum" else per_point.mean()
    return loss


class DLNTask:
    """The deep linear network's regression task: full-batch data on the device, the model, the loss."""

    def __init__(self, cfg: DLNConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        g = torch.Generator().manual_seed(cfg.data_seed)
        A = torch.randn(cfg.dim, cfg.dim, generator=g)
        x = torch.randn(cfg.points, cfg.dim, generator=g)
        self.data = (x.to(device), (x @ A.T).to(device))
        self.data_source = {"description": f"synthetic deep-linear-network task: x ~ N(0, I) ({cfg.points} points, "
                                           f"dim {cfg.dim}), targets A x with A ~ N(0, 1) entries (data seed "
                                           f"{cfg.data_seed})", "name": "dln"}
        self.loss_fn = squared_error(cfg.loss_reduction)

    def build_model(self, spec: RunSpec):
        return build_dln(spec.norm, self.cfg.depth, self.cfg.dim, self.cfg.init)

    def monitor_points(self, model):
        # Output of each linear -> norm block but the last (for the plain network, the linear layer's output):
        # per-step drift of every layer, as in the VGG runs (costs ~1 ms per step on 24 tiny layers).
        return named_points(model, ".norm")

    def hist_points(self, model):
        names = list(named_points(model, ".norm"))
        return {names[k - 1]: k for k in self.cfg.hist_layers if k <= len(names)}

    def batch(self, spec: RunSpec, step: int):
        return self.data

    def probe_batch(self):
        """Full batch: the drift's probe batch is the training batch itself."""
        return self.data

    def loss_and_metrics(self, model, batch):
        loss = self.loss_fn(model, batch)
        return loss, {"loss": loss.item()}

    def evaluate(self, model):
        return {}

    def ics_layers(self, model):
        return [n for n, _ in model.named_modules() if n.endswith(".linear")]


def specs(cfg: DLNConfig) -> List[RunSpec]:
    out = [RunSpec(n, lr, s, cfg.steps) for n in cfg.norms for lr in cfg.lrs for s in cfg.seeds]
    out += [RunSpec(n, lr, s, cfg.steps) for n in cfg.ics_norms for lr in cfg.ics_lrs if lr not in cfg.lrs
            for s in cfg.seeds]
    return out


DLN_COLUMNS = [("run", "run_id"), ("steps", "steps_done"), ("diverged at", "diverged_step"),
               ("initial loss", "initial_loss"), ("final loss", "final_loss"), ("ICS cos", "ics_cosine"),
               ("ICS l2", "ics_l2"), ("loss range", "loss_range"), ("max ||dg||", "grad_pred_top"), ("beta", "beta"),
               ("probe drift", "drift_probe"), ("drift floor", "drift_floor"), ("pooled |kurtosis|", "kurtosis_pooled"), ("steps/s", "steps_per_s"), ("steps/s (measured)", "steps_per_s_with_measurement")]


def _loss_note(cfg: DLNConfig) -> str:
    if cfg.loss_reduction == "sum":
        return ("Loss: squared error summed over outputs and over all points (the paper's ||W X - A X||^2). "
                "Averaging over points instead (--loss-reduction mean) makes every step 1/points as large at the "
                "paper's LRs, and the networks barely move (e.g. 104.7 -> 101.1 for the plain network in 4,000 steps at "
                "LR 1e-6): rerun with --loss-reduction mean to see it.")
    return ("Loss: squared error summed over outputs, averaged over points (--loss-reduction mean; PROTOCOL.md's default is the sum); with the paper's "
            "LRs this is 1/points of the paper's step: expect little training.")


# The DLN has no nonlinearity: the input a layer sees is the previous normalization's own output, whose mean BN
# and l_p set to beta (and BN its std to |gamma|) on every batch, the probe batch included.
DLN_DRIFT_PINNED = ("in the DLN the next layer's input is the normalization's own output, whose mean BN and l_p "
                    "pin to beta and BN its std to |gamma|: the comparison would be settled by construction")


def make_report(ctx) -> tuple:
    from .report import write_experiment_report
    cfg, out, grid, runs = ctx["cfg"], ctx["out"], ctx["grid"], ctx["records"]
    lrs = grid.lrs("main")
    ref = cfg.ref_lr if cfg.ref_lr in lrs or not lrs else lrs[-1]
    ics_lrs = analysis.ics_lrs(grid, ref, cfg.ics_lrs)
    claims = [analysis.claim1(grid, sorted(cfg.lrs)), analysis.claim3_dln(grid, ics_lrs),
              *analysis.claim4(grid, ref, label="4 (DLN)"), analysis.claim5(grid, ref, label="5 (DLN)", drift_pinned=DLN_DRIFT_PINNED),
              analysis.claim6(grid, ref)]
    claims[0].id, claims[0].claim = "1 (DLN)", "DLN: BN reaches a lower loss than the plain network"
    if cfg.curvature:
        claims.append(analysis.claim_curvature(grid, ref))
    figs = []

    def add(path, caption):
        if path is not None:
            figs.append((path, caption))
    add(figures.curves(runs, cfg.norms, sorted(set(cfg.lrs) | set(cfg.ics_lrs), reverse=True), out / "dln_loss.png",
                       "Deep linear network: training loss", with_test=False, acc=False), "DLN: training loss")
    add(figures.ics(runs, ["none", "bn"], cfg.ics_layers, ics_lrs, out / "dln_ics.png",
                    "Fig 3 (DLN): internal covariate shift"), "Fig 3 (DLN): ICS")
    add(figures.landscape(runs, cfg.norms, ref, out / "dln_landscape.png", "Landscape along the gradient, DLN"),
        "DLN twin of Fig 4: loss landscape, gradient predictiveness, beta-smoothness")
    add(figures.drift(runs, cfg.norms, ref, out / "dln_drift.png", "DLN: activation drift"),
        "DLN: drift on the fixed probe batch, its sampling floor, and the per-step change of the normalization outputs for reference")
    add(figures.histograms(runs, cfg.norms, cfg.hist_layers, ref, out / "dln_histograms.png",
                           f"DLN: activation histograms, layers {', '.join('#%d' % k for k in cfg.hist_layers)}",
                           xlabel="output of linear -> norm"),
        "DLN: activation histograms over training")
    if cfg.curvature:
        add(figures.curvature(runs, cfg.norms, ref, out / "dln_curvature.png", "DLN: top Hessian eigenvalue"),
            "DLN: top Hessian eigenvalue")
    text = write_experiment_report(
        ctx, title="How does BatchNorm help optimization? Deep linear network",
        settings=("preset", "depth", "dim", "points", "loss_reduction", "steps", "measure_every", "seeds"),
        claims=claims, figures=figs, columns=DLN_COLUMNS,
        notes=[_loss_note(cfg), f"Reference LR for claim 4: {ref:g}; ICS LRs: {', '.join(f'{v:g}' for v in ics_lrs)}."],
        probes="BN in train mode (full batch).")
    return claims, figs, text


def main(argv: Optional[List[str]] = None) -> int:
    return command("dln", DLNConfig, PRESETS, __doc__, argv, DLNTask, specs, make_report, columns=DLN_COLUMNS)


if __name__ == "__main__":
    sys.exit(main())
