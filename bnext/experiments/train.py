"""One training run, start to finish: `run_one(cfg, spec, run_dir, task, device)`.

Read it top to bottom: set up (or resume) -> for each step t: [measure the landscape on batch t at the
current weights] -> forward/backward on batch t (activation statistics recorded) -> SGD update ->
[evaluate after t+1 updates] -> [checkpoint] -> summary.json.

What an experiment supplies is its `task` (vgg.VGGTask, dln.DLNTask, or data_parallel.DataParallelTask
around a VGGTask): the data, the model, the loss. Everything a run does with them is here.

Measurement and evaluation run with the RNG state saved and restored, and the landscape toolkit leaves
parameters, gradients and buffers as they were, so the trajectory is the same with or without them.
A non-finite training loss ends the run as diverged at that step. A checkpoint holds everything needed
to continue bit for bit (weights, optimizer, RNG, activation monitor, the run's counters, the metrics
file's length).
"""
import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol

import torch

from . import measure
from .common import (ActivationMonitor, MetricsLog, RunSpec, atomic_torch_save, atomic_write_json, read_jsonl,
                     rng_preserved, rng_state, set_rng_state)


class Task(Protocol):
    """What an experiment supplies to `run_one` (see vgg.VGGTask and dln.DLNTask)."""

    def build_model(self, spec: RunSpec) -> torch.nn.Module: ...
    def batch(self, spec: RunSpec, step: int) -> Any: ...                 # the batch of a step: resumable
    def loss_and_metrics(self, model, batch) -> Any: ...                  # (training loss, logged numbers)
    def loss_fn(self, model, batch) -> torch.Tensor: ...                  # the loss the landscape is probed on
    def evaluate(self, model) -> Dict[str, float]: ...                    # held-out numbers ({} if none)
    def monitor_points(self, model) -> Dict[str, torch.nn.Module]: ...    # outputs whose statistics are logged
    def hist_points(self, model) -> Dict[str, int]: ...                   # monitored name -> layer number
    def ics_layers(self, model) -> List[str]: ...                         # weights Definition 2.1 is taken on


@dataclasses.dataclass
class RunState:
    """A run's counters: saved in its checkpoint, returned in its summary ("state")."""
    step: int = 0                       # training steps done
    train_s: float = 0.0                # seconds in forward/backward/update
    measure_s: float = 0.0              # seconds in landscape measurements
    eval_s: float = 0.0                 # seconds in evaluations
    cpu_s: float = 0.0                  # process CPU seconds of the run
    train_steps: int = 0                # steps done by this run's invocations (as train_s counts them)
    measures: int = 0
    diverged_step: Optional[int] = None
    resumed_from: List[int] = dataclasses.field(default_factory=list)  # steps at which it was resumed


def due(step: int, every: int, last: int) -> bool:
    """Whether a thing done every `every` steps (and at the last step) happens at `step`."""
    return every > 0 and (step % every == 0 or step == last)


def measure_landscape(cfg, task, model, batch, spec: RunSpec) -> Dict[str, Any]:
    """The landscape at the current weights on this step's batch: ICS of every layer (Definition 2.1),
    the line probe along -g at cfg.eta_multipliers() x LR, and with --curvature the top Hessian
    eigenvalue. BN in train mode, as the training step sees it."""
    model.train()
    rec: Dict[str, Any] = {"ics": measure.ics(model, task.loss_fn, batch, spec.lr, task.ics_layers(model))}
    rec["probe"] = measure.line_probe(model, task.loss_fn, batch, [m * spec.lr for m in cfg.eta_multipliers()])
    if cfg.curvature:
        rec["hessian_top"] = measure.hessian_top(model, task.loss_fn, batch, cfg.curvature_iters)
    probe = getattr(task, "probe_batch", None)
    if probe is not None:
        rec["probe_stats"] = probe_stats(task, model, probe())
    return rec


def _channel_moments(x: torch.Tensor) -> tuple:
    """Per-channel (dim 1) mean and std (population) over every other dimension, in float64."""
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x.double(), dim=dims, unbiased=False)
    return mean, var.sqrt()


def _shift(mean_a, std_a, mean_b, std_b) -> Optional[float]:
    """Mean over channels with std_a > 0 of |mean_b - mean_a|/std_a + |std_b - std_a|/std_a: scale-free, so
    a channel's drift reads the same whatever its scale."""
    keep = std_a > 0
    if not bool(keep.any()):
        return None
    v = ((mean_b - mean_a).abs() / std_a + (std_b - std_a).abs() / std_a)[keep].mean()
    return float(v) if math.isfinite(float(v)) else None


def probe_stats(task, model, batch) -> Dict[str, Dict[str, Any]]:
    """Per-channel mean and std, on a fixed probe batch, of the input each weight layer after the first sees
    (for the VGG: the pooled ReLU of the previous conv's normalized output; for the DLN: the previous norm's
    output), keyed by that layer's name; and the sampling floor, the same drift statistic between the two
    halves of the probe batch (analysis._probe_drift turns these into the drift claims 2 and 5 compare).

    Train mode, as training sees the network; noisy BN draws its noise (the caller keeps the training RNG);
    buffers (BN running statistics) are restored, so the trajectory does not change."""
    modules = dict(model.named_modules())
    names = task.ics_layers(model)[1:]
    seen: Dict[str, torch.Tensor] = {}

    def hook(name):
        def f(_module, inputs):
            seen[name] = inputs[0].detach()
        return f
    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        model.train()
        with torch.no_grad():
            task.loss_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)
    out = {}
    for name in names:
        x = seen.get(name)
        if x is None or x.shape[0] < 4:
            continue
        mean, std = _channel_moments(x)
        half = x.shape[0] // 2
        ma, sa = _channel_moments(x[:half])
        mb, sb = _channel_moments(x[half:2 * half])
        out[name] = {"mean": mean.tolist(), "std": std.tolist(), "floor": _shift(ma, sa, mb, sb)}
    return out


def run_one(cfg, spec: RunSpec, run_dir: Path, task, device: torch.device, progress=None) -> Dict[str, Any]:
    """Trains one run (or continues it from its checkpoint) and returns its summary. `cfg` supplies
    momentum, weight_decay, measure_every, eval_every, checkpoint_every, save_weights, data_parallel and
    the measurement settings; `progress` (runner.Progress) is told of each step."""
    from . import analysis
    run_dir = Path(run_dir)
    summary_path, ckpt_path, metrics_path = run_dir / "summary.json", run_dir / "checkpoint.pt", run_dir / "metrics.jsonl"
    if summary_path.exists():
        if progress is not None:
            progress.skip_run(spec)
        with open(summary_path) as f:
            return json.load(f)
    run_dir.mkdir(parents=True, exist_ok=True)

    # ---- model, optimizer, activation monitor; the checkpoint's state if there is one
    torch.manual_seed(spec.seed)
    model = task.build_model(spec).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    monitor = ActivationMonitor(task.monitor_points(model), task.hist_points(model),
                                reduce=getattr(task, "activation_reduce", None))
    state, truncate = RunState(), None
    if ckpt_path.exists() and metrics_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        monitor.load_state_dict(ck["monitor"])
        state = RunState(**ck["state"])
        state.resumed_from.append(state.step)
        set_rng_state({k: v.cpu() for k, v in ck["rng"].items()}, device)
        truncate = ck["metrics_offset"]
    log = MetricsLog(metrics_path, truncate_to=truncate)
    last = spec.steps - 1
    # --data-parallel: rank 0 measures on the global batch and takes Theorem 4.1 there (data_parallel.py)
    data_parallel = cfg.data_parallel
    cpu0 = time.process_time()
    if progress is not None:
        progress.start_run(spec, state.step)
    try:
        if state.step == 0 and cfg.eval_every > 0:
            with rng_preserved(device):
                log.write({"type": "eval", "step": 0, **task.evaluate(model)})
        for step in range(state.step, spec.steps):
            batch = task.batch(spec, step)

            # ---- 1. measure (the weights the step starts from, this step's batch)
            measuring = spec.measure and due(step, cfg.measure_every, last)
            if measuring:
                t0 = time.perf_counter()
                with rng_preserved(device):
                    rec = (task.measure(model, batch, spec, step) if data_parallel
                           else measure_landscape(cfg, task, model, batch, spec))
                state.measure_s += time.perf_counter() - t0
                state.measures += 1

            # ---- 2. the training step: forward (activation statistics), backward, update
            t0 = time.perf_counter()
            model.train()
            monitor.active, monitor.capture = True, measuring
            opt.zero_grad(set_to_none=True)
            # Theorem 4.1 concerns BatchNorm itself: recorded on the BN runs' own training backward
            thm41 = (measure.start_theorem41(model)
                     if measuring and spec.norm == "bn" and not data_parallel else None)
            loss, metrics = task.loss_and_metrics(model, batch)
            monitor.active = monitor.capture = False
            finite = math.isfinite(loss.item())
            if finite:
                loss.backward()
                if thm41 is not None:
                    rec["thm41"] = measure.theorem41(model, thm41)
                opt.step()
            elif thm41 is not None:
                thm41.remove()  # no backward ran: only release the hooks
            state.train_s += time.perf_counter() - t0
            state.train_steps += 1

            # ---- 3. log the step
            acts, hists = monitor.take()
            if measuring:
                rec.setdefault("hist", hists)  # unless the measurement took them (--data-parallel: global batch)
                log.write({"type": "measure", "step": step, **rec})
            log.write({"type": "train", "step": step, **metrics, **acts})
            state.step = step + 1
            if not finite:
                state.diverged_step = step
                log.write({"type": "diverged", "step": step, "loss": loss.item()})
                break

            # ---- 4. evaluate, report progress, checkpoint
            if cfg.eval_every > 0 and (state.step % cfg.eval_every == 0 or step == last):
                t0 = time.perf_counter()
                with rng_preserved(device):
                    log.write({"type": "eval", "step": state.step, **task.evaluate(model)})
                state.eval_s += time.perf_counter() - t0
            if progress is not None:
                progress.step(state.step, metrics["loss"])
            if cfg.checkpoint_every > 0 and state.step % cfg.checkpoint_every == 0 and step != last:
                state.cpu_s += time.process_time() - cpu0
                cpu0 = time.process_time()
                offset = log.flush()
                atomic_torch_save(ckpt_path, {
                    "model": model.state_dict(), "optimizer": opt.state_dict(), "monitor": monitor.state_dict(),
                    "state": dataclasses.asdict(state), "rng": rng_state(device), "metrics_offset": offset})
        log.flush()
        state.cpu_s += time.process_time() - cpu0
    finally:
        log.close()
        monitor.remove()

    # ---- the run's summary (its presence means "finished": a rerun skips it)
    if cfg.save_weights:
        atomic_torch_save(run_dir / "final.pt", model.state_dict())
    state_dict = dataclasses.asdict(state)
    summary = analysis.summarize_run(read_jsonl(metrics_path), state_dict, spec.steps)
    summary.update({"run_id": spec.run_id, "spec": dataclasses.asdict(spec), "state": state_dict})
    atomic_write_json(summary_path, summary)
    with contextlib.suppress(FileNotFoundError):
        ckpt_path.unlink()
    if progress is not None:
        progress.end_run(summary)
    return summary
