"""What the VGG and DLN experiments share: files written atomically, the process group for torchrun,
RNG save/restore, the activation monitor and a run's spec. One run's training loop is train.run_one.

Layout of an output directory:
    config.json                 the full config (a rerun with a different trajectory config refuses to mix)
    runs/<run_id>/metrics.jsonl one JSON record per line: "train" (every step), "eval", "measure", "diverged"
    runs/<run_id>/checkpoint.pt everything needed to continue (weights, optimizer, RNG, monitor, log offset)
    runs/<run_id>/summary.json  written when the run is finished; its presence means "skip on rerun"
    summary.json, report.md, *.png  written by rank 0 after all runs
"""
import contextlib
import dataclasses
import json
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

import bnext

# -------------------------------------------------------------------------------------------------
# Files
# -------------------------------------------------------------------------------------------------


def clean_json(obj):
    """Replace non-finite floats by None (JSON has no NaN/inf) and tensors by Python numbers."""
    if isinstance(obj, torch.Tensor):
        obj = obj.tolist()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    return obj


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(clean_json(obj), indent=1, allow_nan=False) + "\n")


def atomic_torch_save(path: Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_jsonl(path: Path) -> List[dict]:
    """Records of a metrics file; a torn last line (an interrupted write) is ignored."""
    out = []
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break
            out.append(json.loads(line))
    return out


class MetricsLog:
    """Append-only JSON-lines log. `offset()` after `flush()` is a position a checkpoint can record;
    reopening with `truncate_to` drops what was written after that checkpoint."""

    def __init__(self, path: Path, truncate_to: Optional[int] = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_to is None:
            self.f = open(self.path, "w")
        else:
            self.f = open(self.path, "r+")
            self.f.truncate(truncate_to)
            self.f.seek(truncate_to)

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(clean_json(record), allow_nan=False) + "\n")

    def flush(self) -> int:
        self.f.flush()
        os.fsync(self.f.fileno())
        return self.f.tell()

    def close(self) -> None:
        self.f.flush()
        self.f.close()


# -------------------------------------------------------------------------------------------------
# Process group (torchrun) and device
# -------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_arg: str) -> Dist:
    """Joins the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import datetime
    import torch.distributed as td
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_arg.startswith("cuda") or (device_arg == "auto" and torch.cuda.is_available())
    if not td.is_initialized():
        # The ranks meet only at the end (before the report): allow for runs that take days.
        td.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(days=7))
    return Dist(rank, world, local)


def barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as td
        td.barrier()


def finish_distributed(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as td
        if td.is_initialized():
            td.destroy_process_group()


def pick_device(device_arg: str, d: Dist) -> torch.device:
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device_arg)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda was asked for but torch sees no CUDA device")
        if dev.index is None:
            dev = torch.device("cuda", d.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    return dev


def setup_cpu(threads: Optional[int], tune_allocator: bool, d: Dist) -> Dict[str, Any]:
    """Threads (default: the cores shared out among the local ranks) and the glibc allocator tuning."""
    import bnext
    if threads is None and d.world > 1:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", d.world))
        threads = max(1, (os.cpu_count() or 1) // local_world)
    if threads:
        torch.set_num_threads(threads)
    tuned = bnext.tune_cpu_allocator() if tune_allocator else False
    return {"threads": torch.get_num_threads(), "allocator_tuned": bool(tuned)}


def environment(device: torch.device, cpu_info: Dict[str, Any]) -> Dict[str, Any]:
    """Device, library versions and which bnext kernels ran: stated in the report."""
    import bnext
    info = bnext.build_info()
    env = {"device": str(device), "torch": torch.__version__, "bnext": info.get("bnext_version"),
           "bnext_cuda_kernels_built": bool(info.get("cuda")) if "cuda" in info else info,
           "python": platform.python_version(), "platform": platform.platform(), **cpu_info}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["bnext_kernels_ran"] = "CUDA"
    else:
        env["device_name"] = platform.processor() or platform.machine()
        env["bnext_kernels_ran"] = "CPU"
    env["build_info"] = info
    return env


# -------------------------------------------------------------------------------------------------
# RNG state (measurement must not consume training randomness)
# -------------------------------------------------------------------------------------------------


def rng_state(device: torch.device) -> Dict[str, torch.Tensor]:
    s = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(device)
    return s


def set_rng_state(state: Dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@contextlib.contextmanager
def rng_preserved(device: torch.device):
    """Whatever runs inside (probes through noisy BN draw noise) leaves the training RNG stream as it was."""
    saved = rng_state(device)
    try:
        yield
    finally:
        set_rng_state(saved, device)


# -------------------------------------------------------------------------------------------------
# Activation statistics at the normalization layers' outputs
# -------------------------------------------------------------------------------------------------


def excess_kurtosis(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    x = x.double()
    d = x - x.mean(dim, keepdim=True)
    m2 = d.pow(2).mean(dim)
    m4 = d.pow(4).mean(dim)
    return m4 / m2.clamp_min(1e-300).pow(2) - 3.0


class ActivationMonitor:
    """Per-step statistics of the activations each normalization layer emits (its output, i.e. the
    pre-activation the next nonlinearity sees; for the unnormalized network, the layer before it).

    Every training forward: per-channel mean and variance over (N, *), reduced to the layer's mean
    absolute change from the previous step (the paper's "activation drift") and the layer-wide
    mean/variance. When `capture` is set, also a density histogram and the per-channel excess
    kurtosis of chosen layers. Hooks never modify the activations.

    `reduce` (--data-parallel): a function that sums a tensor over all ranks; the per-channel mean and
    variance are then those of the global batch (from all-reduced fp64 sums: one collective per layer
    and step, so every rank's hooks must fire alike) and no histogram is taken here.
    """

    def __init__(self, points: Dict[str, torch.nn.Module], hist_layers: Dict[str, int], bins: int = 80,
                 reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self.reduce = reduce
        self.names = list(points)
        self.hist_layers = hist_layers  # name -> 1-based layer number
        self.bins = bins
        self.active = False
        self.capture = False
        self.prev: Dict[str, Optional[torch.Tensor]] = {n: None for n in self.names}
        self.current: Dict[str, torch.Tensor] = {}
        self.hists: Dict[str, dict] = {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in points.items()]

    def _hook(self, name):
        def hook(_module, _inputs, out):
            if not self.active:
                return
            with torch.no_grad():
                x = out.detach()
                if self.reduce is None:
                    # one statistics pass of bnext's kernel, no (C, N*spatial) copy: torch.var_mean on
                    # that copy cost ~35% of a quick-preset training step on one CPU thread
                    mean, var = (t.float() for t in bnext.channel_stats(x))
                    # every channel has the same count: the layer's mean and variance from the channels'
                    layer_mean = mean.mean()
                    layer_var = (var + (mean - layer_mean).pow(2)).mean()
                else:
                    flat = x.transpose(0, 1).reshape(x.shape[1], -1).float()  # (C, N*spatial)
                    f64 = flat.double()
                    n = torch.full((1,), float(flat.shape[1]), dtype=torch.float64, device=flat.device)
                    sums = self.reduce(torch.cat([f64.sum(1), f64.pow(2).sum(1), n]))
                    C, n = flat.shape[0], sums[-1].clamp_min(1.0)
                    s1, s2 = sums[:C], sums[C:2 * C]
                    mean, var = s1 / n, (s2 / n - (s1 / n).pow(2)).clamp_min(0.0)
                    layer_mean = s1.sum() / (n * C)
                    layer_var = (s2.sum() / (n * C) - layer_mean.pow(2)).clamp_min(0.0)
                    mean, var, layer_mean, layer_var = (t.float() for t in (mean, var, layer_mean, layer_var))
                stats = torch.stack([mean, var])
                prev = self.prev[name]
                if prev is not None and prev.shape == stats.shape:
                    delta = (stats - prev).abs().mean(dim=1)
                    rel = self._relative_drift(stats, prev)
                else:
                    delta = torch.full((2,), float("nan"), device=x.device)
                    rel = delta[0]
                self.prev[name] = stats
                # kept on the device; take() converts all layers at once (one sync per step on CUDA)
                self.current[name] = torch.stack([layer_mean, layer_var, delta[0], delta[1], rel])
                if self.capture and name in self.hist_layers and self.reduce is None:
                    self.hists[name] = self._histogram(x.transpose(0, 1).reshape(x.shape[1], -1).float())
        return hook

    @staticmethod
    def _relative_drift(stats: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Mean over channels of |mu_t - mu_{t-1}| / sigma_{t-1} + |var_t - var_{t-1}| / var_{t-1}: the drift in
        units of each channel's own scale, so a layer whose activations have std 1e-3 is not called stable
        only because its changes are small in absolute terms. Channels with zero variance at t-1 (dead or
        constant) have no scale and are left out; NaN if every channel is."""
        mean, var = stats[0], stats[1]
        pmean, pvar = prev[0], prev[1]
        # no boolean indexing: on CUDA that would synchronize once per layer and step
        pv = torch.where(pvar > 0, pvar, torch.nan)
        r = (mean - pmean).abs() / pv.sqrt() + (var - pvar).abs() / pv
        return torch.nanmean(r)

    def _histogram(self, flat: torch.Tensor) -> dict:
        v = flat.reshape(-1)
        if not torch.isfinite(v).all():
            return {"layer": None, "finite": False}
        sample = v if v.numel() <= 1 << 20 else v[torch.randperm(v.numel(), device=v.device)[:1 << 20]]
        lo, hi = torch.quantile(sample.double(), torch.tensor([0.001, 0.999], dtype=torch.float64,
                                                                device=v.device)).tolist()
        if not hi > lo:
            lo, hi = lo - 1.0, hi + 1.0
        counts = torch.histc(v.double(), bins=self.bins, min=lo, max=hi)
        width = (hi - lo) / self.bins
        density = counts / (v.numel() * width)
        kurt_c = excess_kurtosis(flat, dim=1)
        return {"lo": lo, "hi": hi, "density": density.tolist(), "mean": float(v.mean()),
                "std": float(v.std()), "kurtosis_layer": float(excess_kurtosis(v)),
                "kurtosis_channel": float(kurt_c[torch.isfinite(kurt_c)].mean()) if torch.isfinite(kurt_c).any()
                else None}

    def take(self) -> Dict[str, Any]:
        """Per-layer stats of the last forward (lists in layer order) and, if captured, histograms.

        act_mean / act_var: the layer's mean and variance over all its values; drift_mean / drift_var:
        mean over channels of |mu_t - mu_{t-1}| and |var_t - var_{t-1}| (absolute units); drift_rel: the
        same change relative to each channel's previous std and variance (see _relative_drift)."""
        cols = {"act_mean": [], "act_var": [], "drift_mean": [], "drift_var": [], "drift_rel": []}
        present = [n for n in self.names if n in self.current]
        values = torch.stack([self.current[n] for n in present]).tolist() if present else []
        by_name = dict(zip(present, values))
        for n in self.names:
            row = by_name.get(n, [None] * len(cols))
            for key, v in zip(cols, row):
                cols[key].append(v if v is None or math.isfinite(v) else None)
        out = cols
        hists = {str(self.hist_layers[n]): h for n, h in self.hists.items()}
        self.current, self.hists = {}, {}
        return out, hists

    def state_dict(self) -> Dict[str, Any]:
        return {n: p for n, p in self.prev.items() if p is not None}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        for n in self.names:
            self.prev[n] = state.get(n)

    def remove(self):
        for h in self.handles:
            h.remove()


# -------------------------------------------------------------------------------------------------
# One run: the resumable training loop
# -------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunSpec:
    """One training run of a grid. `group` separates the main grid from the LR sweep."""
    norm: str
    lr: float
    seed: int
    steps: int
    group: str = "main"
    measure: bool = True

    @property
    def run_id(self) -> str:
        return f"{self.group}-{self.norm}-lr{self.lr:g}-s{self.seed}"


def describe_data(source) -> str:
    """One line for a task's data_source: its description and, where measured, the pixel statistics."""
    if not isinstance(source, dict):
        return str(source)
    text = str(source.get("description", source))
    st = source.get("statistics")
    if st:
        text += (f"; pixels: neighbour correlation {st['neighbour_correlation']:.3f}, difference excess kurtosis "
                 f"{st['difference_kurtosis']:.3g}, channel mean {', '.join(f'{v:.3g}' for v in st['channel_mean'])}, "
                 f"channel std {', '.join(f'{v:.3g}' for v in st['channel_std'])}")
    return text


def format_table(headers: List[str], rows: List[List[Any]]) -> str:
    """A plain text table for the terminal."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}"
    return str(v)
