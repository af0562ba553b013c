"""A data set held on the training device as whole tensors (:class:`Dataset`, :func:`load_dataset`), its
per-channel scaling and image statistics, and the seeded, resumable batch order."""
from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

import torch

from .cifar import CIFAR10_MD5, CIFAR10_URL, download_cifar10, find_cifar10, read_cifar10
from .errors import DataError, DownloadError
from .synthetic import _SYN_CLASSES, _seeded, make_synthetic

# ------------------------------------------------------------------------- dataset on the device
@dataclasses.dataclass
class Dataset:
    """A whole data set on one device. ``train_x``/``test_x``: float32 (N, 3, 32, 32), scaled per
    channel with the training set's statistics; ``train_y``/``test_y``: int64 (N,).

    ``name`` is "cifar10" or "synthetic"; ``source`` a sentence saying exactly which data was used
    (and, for a fallback, why); ``fallback_reason`` is set when "auto" fell back to the synthetic task.
    ``mean``/``std`` are the per-channel training statistics that were removed (CIFAR-10: in [0, 1]
    pixel units; synthetic: in its raw units); ``statistics`` is :func:`image_statistics` of the
    training images before that scaling (how natural they look: neighbour correlation, difference
    kurtosis, channel mean/std)."""
    name: str
    source: str
    train_x: torch.Tensor = dataclasses.field(repr=False)
    train_y: torch.Tensor = dataclasses.field(repr=False)
    test_x: torch.Tensor = dataclasses.field(repr=False)
    test_y: torch.Tensor = dataclasses.field(repr=False)
    classes: Tuple[str, ...]
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    fallback_reason: Optional[str] = None
    statistics: dict = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Number of classes (10)."""
        return len(self.classes)

    @property
    def device(self) -> torch.device:
        """The device holding the tensors."""
        return self.train_x.device


def default_data_dir() -> Path:
    """``$BNEXT_DATA`` if set, else ``~/.cache/bnext``."""
    env = os.environ.get("BNEXT_DATA")
    return Path(env).expanduser() if env else Path("~/.cache/bnext").expanduser()


def channel_mean_std(x: torch.Tensor) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and population standard deviation of ``x`` (N, C, H, W) over (N, H, W),
    accumulated in float64 (two passes, chunked). For uint8 input the statistics are exact (from
    per-channel histograms) and in [0, 1] pixel units."""
    c = x.shape[1]
    if x.dtype == torch.uint8:
        xc = x.transpose(0, 1).reshape(c, -1).cpu()
        counts = torch.stack([torch.bincount(xc[i], minlength=256) for i in range(c)]).double()
        values = torch.arange(256, dtype=torch.float64) / 255.0
        total = counts.sum(1)
        mean = (counts * values).sum(1) / total
        var = (counts * (values[None] - mean[:, None]) ** 2).sum(1) / total
    else:
        # float32 sums over each image's H*W values (exact enough), then float64 across images
        flat = x.reshape(x.shape[0], c, -1)
        total = flat.shape[0] * flat.shape[2]
        mean = flat.sum(dim=2).double().sum(0) / total
        chunk = 8192
        var = torch.zeros(c, dtype=torch.float64, device=x.device)
        m32 = mean.to(torch.float32)[None, :, None]
        for a in range(0, flat.shape[0], chunk):
            var += (flat[a:a + chunk] - m32).pow_(2).sum(dim=2).double().sum(0)
        var = var / total
    return tuple(mean.tolist()), tuple(var.sqrt().tolist())


def _excess_kurtosis(v: torch.Tensor) -> float:
    d = v - v.mean()
    m2 = d.pow(2).mean()
    return float(d.pow(4).mean() / m2.clamp_min(1e-300).pow(2) - 3.0)


def image_statistics(x: torch.Tensor, max_images: int = 2000) -> dict:
    """How natural an image set looks, on its first ``max_images`` images (N, C, H, W), in float64:

    neighbour_correlation: Pearson correlation of horizontally and of vertically adjacent pixels, per
        channel over all images and positions, averaged over the 2C pairs (natural images: ~0.9);
    difference_kurtosis: excess kurtosis of those adjacent-pixel differences, per channel and direction,
        averaged (natural images: heavy-tailed, well above 0; i.i.d. Gaussian pixels: 0);
    channel_mean, channel_std: per-channel mean and population standard deviation over all the images
        (uint8 input in [0, 1] pixel units).
    """
    if x.dim() != 4 or x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(f"x must be (N, C, H, W) images with H, W >= 2, got shape {tuple(x.shape)}")
    mean, std = channel_mean_std(x)
    v = x[:max_images].double().cpu()
    if x.dtype == torch.uint8:
        v = v / 255.0
    corr, kurt = [], []
    for a, b in ((v[..., :, :-1], v[..., :, 1:]), (v[..., :-1, :], v[..., 1:, :])):
        for c in range(v.shape[1]):
            p, q = a[:, c].reshape(-1), b[:, c].reshape(-1)
            dp, dq = p - p.mean(), q - q.mean()
            corr.append(float((dp * dq).mean() / (dp.pow(2).mean() * dq.pow(2).mean()).sqrt().clamp_min(1e-300)))
            kurt.append(_excess_kurtosis(q - p))
    return {"neighbour_correlation": sum(corr) / len(corr), "difference_kurtosis": sum(kurt) / len(kurt),
            "channel_mean": list(mean), "channel_std": list(std)}


def _normalize(x: torch.Tensor, mean, std, scale: float, device) -> torch.Tensor:
    """(x * scale - mean) / std as float32 on ``device``, chunked to bound temporary memory (in place
    when ``x`` is already float32 on ``device``)."""
    x = x.to(device)
    in_place = x.dtype == torch.float32
    out = x if in_place else torch.empty(x.shape, dtype=torch.float32, device=device)
    m = torch.tensor(mean, dtype=torch.float32, device=device)[None, :, None, None]
    inv = torch.tensor([scale / s for s in std], dtype=torch.float32,
                       device=device)[None, :, None, None]
    m = m / scale
    chunk = 8192
    for a in range(0, x.shape[0], chunk):
        torch.mul(x[a:a + chunk].float() - m, inv, out=out[a:a + chunk])
    return out


def _subset(x, y, size, what):
    if size is None:
        return x, y
    if not 0 < size <= x.shape[0]:
        raise ValueError(f"{what} must be in [1, {x.shape[0]}], got {size}")
    return x[:size], y[:size]


def load_dataset(name: str = "auto", data_dir: Union[str, os.PathLike, None] = None,
                 device: Union[str, torch.device] = "cpu", download: bool = True, seed: int = 0,
                 train_size: Optional[int] = None, test_size: Optional[int] = None,
                 url: str = CIFAR10_URL, md5: str = CIFAR10_MD5, progress: bool = True,
                 timeout: float = 60.0) -> Dataset:
    """Load a data set onto ``device`` as whole tensors, scaled per channel with training statistics.

    name: "cifar10" (CIFAR-10 or an error), "synthetic" (the task of :func:`make_synthetic`), or
        "auto": CIFAR-10 if present in ``data_dir`` or downloadable, else the synthetic task, with the
        reason in ``source`` and ``fallback_reason``. Only a failed download (offline) falls back; a
        corrupt/partial CIFAR-10 directory, a checksum mismatch or an unsafe archive always raise.
    data_dir: where ``cifar-10-batches-py`` lives or is downloaded to (default
        :func:`default_data_dir`: ``$BNEXT_DATA`` or ``~/.cache/bnext``).
    download: allow downloading the official archive (``url``, verified against ``md5``).
    seed: seed of the synthetic task (unused for CIFAR-10).
    train_size, test_size: use only the first this-many images (CIFAR-10), or the synthetic sizes
        (default 50000 / 10000 like CIFAR-10). Normalization statistics come from the training images
        actually used.
    """
    if name not in ("auto", "cifar10", "synthetic"):
        raise ValueError(f"name must be 'auto', 'cifar10' or 'synthetic', got {name!r}")
    device = torch.device(device)
    reason = None
    if name != "synthetic":
        root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        batch_dir = find_cifar10(root)
        if batch_dir is None and download:
            try:
                batch_dir = download_cifar10(root, url=url, md5=md5, progress=progress, timeout=timeout)
            except DownloadError as e:
                reason = f"CIFAR-10 not found in {root} and download failed: {e}"
        elif batch_dir is None:
            reason = f"CIFAR-10 not found in {root} and download is disabled"
        if batch_dir is not None:
            train_x, train_y, test_x, test_y, classes = read_cifar10(batch_dir)
            train_x, train_y = _subset(train_x, train_y, train_size, "train_size")
            test_x, test_y = _subset(test_x, test_y, test_size, "test_size")
            mean, std = channel_mean_std(train_x)
            stats = image_statistics(train_x)
            return Dataset(
                name="cifar10",
                source=(f"CIFAR-10 from {batch_dir} ({train_x.shape[0]} train / {test_x.shape[0]} "
                        f"test images)"),
                train_x=_normalize(train_x, mean, std, 1 / 255.0, device),
                train_y=train_y.to(device), test_x=_normalize(test_x, mean, std, 1 / 255.0, device),
                test_y=test_y.to(device), classes=tuple(classes), mean=mean, std=std,
                statistics=stats)
        if name == "cifar10":
            raise DataError(reason)

    n_train = 50000 if train_size is None else train_size
    n_test = 10000 if test_size is None else test_size
    if n_train <= 0 or n_test <= 0:
        raise ValueError(f"train_size and test_size must be positive, got {n_train}, {n_test}")
    train_x, train_y = make_synthetic(n_train, seed, "train")
    test_x, test_y = make_synthetic(n_test, seed, "test")
    mean, std = channel_mean_std(train_x)
    stats = image_statistics(train_x)  # before _normalize, which scales train_x in place
    what = (f"synthetic 10-class 32x32x3 image task (seed {seed}, {n_train} train / {n_test} test "
            f"images)")
    return Dataset(
        name="synthetic",
        source=f"{what}: {reason}" if reason else f"{what}, as requested",
        train_x=_normalize(train_x, mean, std, 1.0, device), train_y=train_y.to(device),
        test_x=_normalize(test_x, mean, std, 1.0, device), test_y=test_y.to(device),
        classes=tuple(f"class {k}" for k in range(_SYN_CLASSES)), mean=mean, std=std,
        fallback_reason=reason, statistics=stats)


# ------------------------------------------------------------------------------ batch iteration
def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches per epoch: ``n // batch_size`` (the last partial batch is dropped so every step
    sees the same batch size, which matters for batch statistics)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} is larger than the data set ({n})")
    return n // batch_size


def epoch_permutation(n: int, epoch: int, seed: int = 0,
                      device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """The sample order of ``epoch``: ``torch.randperm(n)`` from a CPU ``torch.Generator`` seeded by a
    hash of (seed, epoch), so any epoch can be recomputed directly without replaying earlier ones."""
    perm = torch.randperm(n, generator=_seeded(seed, epoch, 0xBA7C4))
    return perm if device is None else perm.to(device)


@functools.lru_cache(maxsize=4)
def _cached_permutation(n: int, epoch: int, seed: int, device: torch.device) -> torch.Tensor:
    return epoch_permutation(n, epoch, seed, device)


def batch_at(x: torch.Tensor, y: torch.Tensor, batch_size: int, step: int,
             seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """The batch that an uninterrupted :func:`iterate_batches` run yields at global ``step``
    (0-based): ``x[idx], y[idx]`` with ``idx`` the step's slice of its epoch's permutation. The last
    few permutations are cached, so calling this once per training step costs one ``index_select``
    per step and one ``randperm`` per epoch."""
    spe = steps_per_epoch(x.shape[0], batch_size)
    epoch, i = divmod(step, spe)
    perm = _cached_permutation(x.shape[0], epoch, seed, x.device)
    idx = perm[i * batch_size:(i + 1) * batch_size]
    return x.index_select(0, idx), y.index_select(0, idx.to(y.device))


def iterate_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0,
                    start_step: int = 0,
                    num_steps: Optional[int] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(xb, yb)`` batches sliced from the on-device tensors ``x``, ``y``, step after step,
    starting at global step ``start_step`` and stopping after ``num_steps`` batches (never, if None).

    Each epoch visits the samples in the order of :func:`epoch_permutation` (seeded by (seed, epoch)),
    ``steps_per_epoch(len(x), batch_size)`` full batches per epoch. Resumable: starting at step s
    yields exactly the batches an uninterrupted run yields from step s on. One permutation is computed
    (and moved to the device) per epoch; each step is one ``index_select`` on the device.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    spe = steps_per_epoch(x.shape[0], batch_size)
    step, perm, perm_epoch = start_step, None, -1
    end = None if num_steps is None else start_step + num_steps
    while end is None or step < end:
        epoch, i = divmod(step, spe)
        if epoch != perm_epoch:
            perm, perm_epoch = epoch_permutation(x.shape[0], epoch, seed, x.device), epoch
        idx = perm[i * batch_size:(i + 1) * batch_size]
        yield x.index_select(0, idx), y.index_select(0, idx.to(y.device))
        step += 1
