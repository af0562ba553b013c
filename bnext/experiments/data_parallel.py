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
  * activation statistics (per-step mean/variance change, histograms): rank 0's share of the batch;
  * landscape measurements (ICS, line probes, curvature, Theorem 4.1): not taken in this mode (they
    would need every probe pass to be distributed too); recorded as missing with that reason.
Rank 0 writes the run directory as usual; the other ranks keep their own copy of the run's state under
runs/<run>/rank<r>/ (so that an interrupted grid resumes on every rank from the same step).
"""
import inspect
from pathlib import Path

import torch
import torch.nn.functional as F

NOT_MEASURED = "--data-parallel: landscape measurements (ICS, line probes, curvature, Theorem 4.1) are not taken"


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
        self.landscape_ok = False

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

    # --- data
    def batch(self, spec, step):
        x, y = self.task.batch(spec, step)  # the global batch, identical on every rank
        return (torch.tensor_split(x, self.world)[self.rank], torch.tensor_split(y, self.world)[self.rank],
                x.shape[0])

    def _all_sum(self, *values):
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t)
        return t.tolist()

    def loss_and_metrics(self, model, batch):
        x, y, global_n = batch
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

    # --- measurements
    def measure(self, model, batch, spec, step):
        return {"missing": [NOT_MEASURED]}

    def before_forward(self, model, spec):
        return None

    def after_backward(self, model, tracker):
        return {}

    def summarize(self, spec, records, state):
        return self.task.summarize(spec, records, state)
