"""--data-parallel: every run of the grid trained by ALL ranks together (instead of runs shared out among
the ranks): torch's DistributedDataParallel over the process group that torchrun set up, with every bnext
normalization layer synchronized across ranks (bnext.distributed).

At step t the global batch (the one a single process would use, --batch-size images) is split across
the ranks in rank order (torch.tensor_split: uneven when the batch size is not a multiple of the world
size, even empty on some ranks when it is smaller). Each rank back-propagates
sum-of-losses * world / global_batch, so that DDP's gradient average is the gradient of the mean loss
over the global batch, exactly as one process on that batch would compute it.

What is measured on what:
  * training loss and accuracy, test loss and accuracy: the global batch / the whole test set
    (sums all-reduced over ranks; the test set is split across ranks);
  * landscape measurements (ICS, line probes, curvature), Theorem 4.1 and the activation histograms
    of a measured step: the GLOBAL batch, on rank 0. Every rank builds the same global batch
    (VGGTask.batch is a function of the seed and the step), so nothing needs to be gathered: rank 0
    runs the single-process measurement (train.measure_landscape) on the unwrapped model (DDP.module:
    no DDP hook fires) with synchronization switched off (bnext.distributed.sync_disabled: a synced
    layer on the global batch split across ranks equals the unsynced layer on the whole batch), then
    one extra forward/backward of a deep copy of the model on the global batch gives Theorem 4.1
    (BN runs; the same loss, the mean cross-entropy over the global batch, as the training step's
    backward that the single-process run records it on) and the histograms. The landscape tools
    restore parameters, gradients and buffers, the deep copy is discarded and the runner restores the
    RNG on every rank, so measuring leaves the trajectory unchanged. The other ranks wait (an
    all-reduce of rank 0's success flag, which also makes every rank fail together if measuring
    failed) and record only where the measurement is; the same numbers as a single process would
    record on the same weights and batch, in rank 0's metrics.jsonl (tests/test_distributed.py: bit
    for bit at step 0 with --threads 1; the extra pass runs first, with the RNG put back after it, so
    noisy BN's histogram sees the noise of the single-process training forward). Cost: a measured
    step is one process's measurement on the whole batch, during which the other ranks idle.
  * per-step activation statistics (each layer's per-channel mean and variance, their change per step):
    the global batch, in the training forward itself (common.ActivationMonitor with `reduce`: the
    per-channel sums of x and x^2 all-reduced in fp64, one small collective per layer and step).
Rank 0 writes the run directory as usual; the other ranks keep their own copy of the run's state under
runs/<run>/rank<r>/ (so that an interrupted grid resumes on every rank from the same step).
"""
import copy
import inspect
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

MEASURED = ("landscape measurements, Theorem 4.1 and histograms on the global batch (rank 0), "
            "per-step activation statistics on the global batch (all-reduced)")
ON_RANK0 = "--data-parallel: measured on the global batch by rank 0 (runs/<run>/metrics.jsonl)"


class Shard(NamedTuple):
    """This rank's share of the global batch at a step, and the global batch itself (for measuring)."""
    x: torch.Tensor
    y: torch.Tensor
    global_n: int
    global_batch: tuple


def run_dir(out: Path, run_id: str, rank: int) -> Path:
    """Where a rank keeps a run's files: rank 0 the run directory itself, others a private subdirectory."""
    base = Path(out) / "runs" / run_id
    return base if rank == 0 else base / f"rank{rank}"


class DataParallelTask:
    """Wraps an experiment task (vgg.VGGTask) for one run shared by all ranks; see the module docstring."""

    def __init__(self, task, device: torch.device):
        import torch.distributed as dist
        if not dist.is_initialized():
            raise RuntimeError("--data-parallel needs the process group of torchrun (use --procs N > 1 or torchrun)")
        self.task, self.device, self.dist = task, device, dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.data_source = task.data_source

    # --- model
    def build_model(self, spec):
        from torch.nn.parallel import DistributedDataParallel
        model = self.task.build_model(spec).to(self.device)
        group = self.dist.group.WORLD
        for m in model.modules():  # every bnext normalization layer: statistics of the global batch
            if hasattr(type(m), "process_group"):
                m.process_group = group
        ids = [self.device.index] if self.device.type == "cuda" else None
        # Running statistics are identical on every rank already (synchronized layers): no buffer
        # broadcast before each forward (newer torch names the switch forward_sync_buffers).
        no_sync = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})
        return DistributedDataParallel(model, device_ids=ids, **no_sync)

    def monitor_points(self, model):
        return self.task.monitor_points(model.module)

    def hist_points(self, model):
        return self.task.hist_points(model.module)

    def activation_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sums over ranks, for the per-step activation statistics (common.ActivationMonitor)."""
        self.dist.all_reduce(t)
        return t

    # --- data
    def batch(self, spec, step):
        x, y = self.task.batch(spec, step)  # the global batch, identical on every rank
        return Shard(torch.tensor_split(x, self.world)[self.rank], torch.tensor_split(y, self.world)[self.rank],
                     x.shape[0], (x, y))

    def _all_sum(self, *values):
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t)
        return t.tolist()

    def loss_and_metrics(self, model, batch):
        x, y, global_n = batch.x, batch.y, batch.global_n
        logits = model(x)
        ce_sum = F.cross_entropy(logits, y, reduction="sum")
        correct = (logits.detach().argmax(1) == y).sum().item() if y.numel() else 0
        total_ce, total_correct, n = self._all_sum(ce_sum.item(), correct, y.numel())
        local = ce_sum * (self.world / global_n)  # DDP averages over ranks -> gradient of the global mean
        global_loss = total_ce / n
        # Value: the global mean loss (the same on every rank, so all ranks agree on divergence);
        # gradient: this rank's share.
        loss = local + (global_loss - local.detach())
        return loss, {"loss": global_loss, "acc": total_correct / n}

    @torch.no_grad()
    def evaluate(self, model):
        net = model.module
        net.eval()
        x, y = self.task.data.test_x, self.task.data.test_y
        xs, ys = torch.tensor_split(x, self.world)[self.rank], torch.tensor_split(y, self.world)[self.rank]
        total, correct = 0.0, 0
        for i in range(0, xs.shape[0], 1000):
            logits = net(xs[i:i + 1000])
            total += F.cross_entropy(logits, ys[i:i + 1000], reduction="sum").item()
            correct += (logits.argmax(1) == ys[i:i + 1000]).sum().item()
        net.train()
        total, correct, n = self._all_sum(total, correct, ys.shape[0])
        return {"test_loss": total / n, "test_acc": correct / n}

    # --- measurements (see the module docstring)
    def measure(self, model, batch, spec, step):
        from bnext.distributed import sync_disabled
        from .common import rng_preserved
        from .train import measure_landscape
        rec, error = {"missing": [ON_RANK0]}, None
        if self.rank == 0:
            try:
                net = model.module
                with sync_disabled(net):
                    with rng_preserved(self.device):  # its noise: that of the training forward of one process
                        extra = self._global_pass(net, batch.global_batch, spec)
                    rec = measure_landscape(self.task.cfg, self.task, net, batch.global_batch, spec)
                    rec.update(extra)
            except Exception as e:  # the other ranks must learn of it, or they would wait in a collective
                error = e
        (failed,) = self._all_sum(error is not None)
        if error is not None:
            raise error
        if failed:
            raise RuntimeError("--data-parallel: the measurement failed on rank 0")
        return rec

    def _global_pass(self, net, batch, spec):
        """A forward (and for BN runs backward) of a deep copy of `net` (synchronization off) on the
        global batch: the activation histograms and Theorem 4.1 of this step."""
        from . import measure
        from .common import ActivationMonitor
        twin = copy.deepcopy(net)
        twin.train()
        twin.zero_grad(set_to_none=True)
        monitor = ActivationMonitor(self.task.monitor_points(twin), self.task.hist_points(twin))
        try:
            monitor.active = monitor.capture = True
            # Theorem 4.1 on BN runs, as the single-process run records it on its training backward
            tracker = measure.start_theorem41(twin) if spec.norm == "bn" else None
            loss = self.task.loss_fn(twin, batch)
            monitor.active = monitor.capture = False
            _, hists = monitor.take()
        finally:
            monitor.remove()
        out = {"hist": hists}
        if tracker is not None:
            if torch.isfinite(loss).item():
                loss.backward()
                out["thm41"] = measure.theorem41(twin, tracker)
            else:  # the single-process run records nothing either when the loss is not finite
                tracker.remove()
        return out
