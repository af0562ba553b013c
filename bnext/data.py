"""Data for the experiments: CIFAR-10 (read safely, downloaded if absent) or a built-in synthetic
image task, held on the training device as whole tensors, and a seeded, resumable batch iterator.

    ds = load_dataset("auto", device="cuda")        # CIFAR-10 if present or downloadable, else synthetic
    print(ds.source)                                 # says exactly which data was used, and why
    for step, (xb, yb) in enumerate(iterate_batches(ds.train_x, ds.train_y, 128, seed=0), start=0): ...

CIFAR-10 is read from the official python-pickle batches (``cifar-10-batches-py/data_batch_1..5``,
``test_batch``, ``batches.meta``) with a restricted unpickler: the files can only rebuild dicts, lists,
strings, ints and plain numeric numpy arrays; any other global a pickle names (``os.system``,
``builtins.eval``, ...) is refused before it is called. Every file is validated (types, shapes, dtypes,
label range) and a missing, truncated or corrupt file raises :class:`CorruptFileError` naming it.

Inputs are scaled per channel with the training set's mean and (population) standard deviation; the
test set uses the same training statistics.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.client
import io
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

__all__ = [
    "CIFAR10_URL", "CIFAR10_MD5", "CIFAR10_CLASSES",
    "DataError", "CorruptFileError", "UnsafePickleError", "DownloadError", "ChecksumError",
    "UnsafeArchiveError",
    "Dataset", "load_dataset", "default_data_dir",
    "read_cifar_batch", "read_cifar_meta", "read_cifar10", "find_cifar10", "download_cifar10",
    "fetch_url", "extract_tar_safely", "restricted_load",
    "make_synthetic", "channel_stats",
    "steps_per_epoch", "epoch_permutation", "batch_at", "iterate_batches",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_DIRNAME = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_META_FILE = "batches.meta"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
_PIXELS = 3 * 32 * 32


# ----------------------------------------------------------------------------------------- errors
class DataError(Exception):
    """Base class of the errors raised by :mod:`bnext.data`."""


class CorruptFileError(DataError):
    """A data file is missing, truncated, or not in the expected format. ``path`` names the file."""

    def __init__(self, path: Union[str, os.PathLike], problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class UnsafePickleError(CorruptFileError):
    """A pickle asked for a global outside the allowlist (it could run code); nothing was called."""


class DownloadError(DataError):
    """The archive could not be fetched (offline, DNS, HTTP error, connection cut). The signal for
    ``load_dataset("auto")`` to fall back to the synthetic task."""


class ChecksumError(DataError):
    """A downloaded or local archive does not have the expected MD5 checksum."""


class UnsafeArchiveError(DataError):
    """A tar member would be written outside the target directory, or is a link or device."""


# ------------------------------------------------------------------------- restricted unpickling
class _Refused(pickle.UnpicklingError):
    pass


class _NDArrayType:
    """Stands in for ``numpy.ndarray`` inside a restricted pickle; it can only be passed to
    ``_reconstruct``, never instantiated."""

    def __init__(self, *args, **kwargs):
        raise pickle.UnpicklingError("numpy.ndarray may only be rebuilt through _reconstruct")


_ALLOWED_DTYPES = frozenset(["u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f4", "f8", "b1"])


def _as_str(value, what: str) -> str:
    if isinstance(value, bytes):
        return value.decode("latin1")
    if isinstance(value, str):
        return value
    raise pickle.UnpicklingError(f"{what} must be a string, got {type(value).__name__}")


class _DTypeSpec:
    """Replaces ``numpy.dtype(code, align, copy)``: only plain numeric codes, no fields/subarrays."""

    def __init__(self, code, align=False, copy=True):
        code = _as_str(code, "dtype code")
        if code not in _ALLOWED_DTYPES:
            raise _Refused(f"dtype {code!r} is not allowed (only plain numeric dtypes)")
        self.dtype = np.dtype(code)

    def __setstate__(self, state):
        # numpy's dtype state: (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not isinstance(state, tuple) or len(state) < 2:
            raise pickle.UnpicklingError("malformed dtype state")
        if any(s is not None for s in state[2:5]):
            raise _Refused("structured or subarray dtypes are not allowed")
        order = _as_str(state[1], "dtype byte order")
        if order not in ("|", "<", ">", "="):
            raise pickle.UnpicklingError(f"unknown dtype byte order {order!r}")
        if order in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(order)


class _ArraySpec:
    """Replaces the empty array made by ``numpy.core.multiarray._reconstruct``; its ``__setstate__``
    rebuilds the data with ``np.frombuffer`` after checking shape, dtype and byte count."""

    def __init__(self):
        self.array: Optional[np.ndarray] = None

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("malformed ndarray state")
        if len(state) == 5:
            if state[0] != 1:
                raise pickle.UnpicklingError(f"unknown ndarray state version {state[0]!r}")
            state = state[1:]
        shape, dtype, fortran, raw = state
        if not (isinstance(shape, tuple) and all(type(s) is int and s >= 0 for s in shape)):
            raise pickle.UnpicklingError(f"malformed ndarray shape {shape!r}")
        if not isinstance(dtype, _DTypeSpec):
            raise pickle.UnpicklingError("ndarray dtype must be a plain numpy dtype")
        if isinstance(raw, str):
            raw = raw.encode("latin1")
        if not isinstance(raw, bytes):
            raise pickle.UnpicklingError("ndarray data must be a byte string")
        count = math.prod(shape)
        if len(raw) != count * dtype.dtype.itemsize:
            raise pickle.UnpicklingError(
                f"ndarray of shape {shape} and dtype {dtype.dtype} needs "
                f"{count * dtype.dtype.itemsize} bytes, the pickle holds {len(raw)}")
        arr = np.frombuffer(raw, dtype=dtype.dtype, count=count)
        self.array = arr.reshape(shape, order="F" if fortran else "C").copy()


def _reconstruct(subtype, shape, typecode):
    if subtype is not _NDArrayType:
        raise pickle.UnpicklingError("_reconstruct may only rebuild a plain numpy.ndarray")
    return _ArraySpec()


def _latin1_encode(text, encoding="latin1"):
    # Python 3 pickles bytes at protocol <= 2 as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed as (str, 'latin1')")
    return text.encode("latin1")


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,   # numpy < 2 (the official files)
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # numpy >= 2
    ("numpy", "ndarray"): _NDArrayType,
    ("numpy", "dtype"): _DTypeSpec,
    ("_codecs", "encode"): _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(f"refused to load global {module}.{name}: only plain dicts, lists, "
                                 "strings, numbers and numeric numpy arrays are allowed") from None

    def persistent_load(self, pid):
        raise _Refused("refused a persistent id: not allowed in a data file")


def _unwrap(obj):
    """Replace the rebuilt-array placeholders by their arrays (in dicts, lists and tuples)."""
    if isinstance(obj, _ArraySpec):
        if obj.array is None:
            raise pickle.UnpicklingError("ndarray without state")
        return obj.array
    if isinstance(obj, dict):
        return {k: _unwrap(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unwrap(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_unwrap(v) for v in obj)
    if isinstance(obj, (_DTypeSpec, _NDArrayType)) or callable(obj):
        raise pickle.UnpicklingError(f"unexpected {type(obj).__name__} object in a data file")
    return obj


def restricted_load(path: Union[str, os.PathLike]):
    """Unpickle ``path`` allowing only plain builtins (dict, list, tuple, str, bytes, int, float, bool,
    None) and plain numeric numpy arrays (rebuilt with ``np.frombuffer``). Python 2 strings come back
    as ``bytes``, as with ``pickle.load(f, encoding="bytes")``.

    Raises :class:`UnsafePickleError` if the pickle names any other global (nothing is called), and
    :class:`CorruptFileError` if the file is missing, empty, truncated, malformed or has trailing bytes.
    """
    path = Path(path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise CorruptFileError(path, "file is missing") from None
    except OSError as e:
        raise CorruptFileError(path, f"cannot be read ({e})") from e
    if not blob:
        raise CorruptFileError(path, "file is empty")
    stream = io.BytesIO(blob)
    try:
        obj = _unwrap(_RestrictedUnpickler(stream, encoding="bytes").load())
    except _Refused as e:
        raise UnsafePickleError(path, f"unsafe pickle: {e}") from None
    except Exception as e:  # any failure to rebuild the object means the file is not valid
        raise CorruptFileError(path, f"truncated or corrupt pickle ({type(e).__name__}: {e})") from e
    if stream.tell() != len(blob):
        raise CorruptFileError(path, f"{len(blob) - stream.tell()} unexpected bytes after the pickle")
    return obj


# ------------------------------------------------------------------------------- CIFAR-10 reading
def _plain_keys(obj, path: Path, required: Tuple[str, ...]) -> dict:
    if not isinstance(obj, dict):
        raise CorruptFileError(path, f"expected a pickled dict, found {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if not isinstance(k, (bytes, str)):
            raise CorruptFileError(path, f"unexpected key {k!r}")
        out[k.decode("latin1") if isinstance(k, bytes) else k] = v
    missing = [k for k in required if k not in out]
    if missing:
        raise CorruptFileError(path, f"missing key(s) {', '.join(missing)} (not a CIFAR-10 batch?)")
    return out


def read_cifar_batch(path: Union[str, os.PathLike],
                     num_classes: int = 10) -> Tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch (``data_batch_k`` or ``test_batch``) with the restricted
    unpickler and validate it.

    Returns ``(data, labels)``: ``data`` uint8 of shape (n, 3072) (1024 red, 1024 green, 1024 blue
    values, each a 32x32 image in row-major order) and ``labels`` int64 of shape (n,) in
    ``[0, num_classes)``. Raises :class:`CorruptFileError` (naming the file) on any problem.
    """
    path = Path(path)
    d = _plain_keys(restricted_load(path), path, ("data", "labels"))
    data, labels = d["data"], d["labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != _PIXELS:
        desc = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                else type(data).__name__)
        raise CorruptFileError(path, f"'data' must be a uint8 array of shape (n, {_PIXELS}), "
                                     f"found {desc}")
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise CorruptFileError(path, f"'labels' must be 1-D integers, found {labels.dtype} "
                                         f"array of shape {labels.shape}")
        labels = labels.astype(np.int64)
    elif isinstance(labels, list):
        if not all(type(v) is int for v in labels):
            raise CorruptFileError(path, "'labels' must be a list of ints")
        labels = np.array(labels, dtype=np.int64).reshape(-1)
    else:
        raise CorruptFileError(path, f"'labels' must be a list, found {type(labels).__name__}")
    if labels.shape[0] != data.shape[0]:
        raise CorruptFileError(path, f"{data.shape[0]} images but {labels.shape[0]} labels")
    if data.shape[0] == 0:
        raise CorruptFileError(path, "batch holds no images")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise CorruptFileError(path, f"labels outside [0, {num_classes}): "
                                     f"min {labels.min()}, max {labels.max()}")
    return data, labels


def read_cifar_meta(path: Union[str, os.PathLike], num_classes: int = 10) -> List[str]:
    """Read ``batches.meta`` with the restricted unpickler and return the ``num_classes`` class names.
    Raises :class:`CorruptFileError` (naming the file) on any problem."""
    path = Path(path)
    d = _plain_keys(restricted_load(path), path, ("label_names",))
    names = d["label_names"]
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise CorruptFileError(path, "'label_names' must be a list of strings")
    if len(names) != num_classes:
        raise CorruptFileError(path, f"expected {num_classes} label names, found {len(names)}")
    return [n.decode("latin1") if isinstance(n, bytes) else n for n in names]


def find_cifar10(data_dir: Union[str, os.PathLike]) -> Optional[Path]:
    """The CIFAR-10 batch directory under ``data_dir``: ``data_dir/cifar-10-batches-py`` if it exists,
    or ``data_dir`` itself if it directly holds CIFAR batch files; ``None`` if neither. Existence only:
    a partial directory is found here and reported by :func:`read_cifar10`."""
    data_dir = Path(data_dir).expanduser()
    if (data_dir / CIFAR10_DIRNAME).is_dir():
        return data_dir / CIFAR10_DIRNAME
    names = CIFAR10_TRAIN_FILES + (CIFAR10_TEST_FILE, CIFAR10_META_FILE)
    if data_dir.is_dir() and any((data_dir / n).exists() for n in names):
        return data_dir
    return None


def read_cifar10(batch_dir: Union[str, os.PathLike]):
    """Read a whole ``cifar-10-batches-py`` directory.

    Returns ``(train_x, train_y, test_x, test_y, classes)``: uint8 tensors of shape (N, 3, 32, 32),
    int64 label tensors, and the class names from ``batches.meta``. A missing file of the six, or any
    invalid one, raises :class:`CorruptFileError` naming it.
    """
    batch_dir = Path(batch_dir)
    classes = read_cifar_meta(batch_dir / CIFAR10_META_FILE)
    parts = [read_cifar_batch(batch_dir / f, len(classes)) for f in CIFAR10_TRAIN_FILES]
    test_data, test_labels = read_cifar_batch(batch_dir / CIFAR10_TEST_FILE, len(classes))

    def images(data):
        return torch.from_numpy(data).view(-1, 3, 32, 32)

    train_x = images(np.concatenate([p[0] for p in parts]))
    train_y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return train_x, train_y, images(test_data), torch.from_numpy(test_labels), classes


# ---------------------------------------------------------------------------- download, extract
def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_url(url: str, dest: Union[str, os.PathLike], md5: Optional[str] = None,
              progress: bool = True, timeout: float = 60.0) -> Path:
    """Download ``url`` (http(s) or file://) to ``dest`` with a tqdm progress bar, verifying the MD5
    if given. The data goes to a temporary file next to ``dest`` that is renamed into place only when
    complete and verified, so ``dest`` never holds a partial download.

    Raises :class:`DownloadError` when the network or the source fails (offline, DNS, HTTP error,
    connection cut short) and :class:`ChecksumError` when the bytes arrive but the MD5 differs.
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    h = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    length = response.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                    received = 0
                    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                              desc=f"downloading {dest.name}", disable=not progress) as bar:
                        for block in iter(lambda: response.read(1 << 20), b""):
                            out.write(block)
                            h.update(block)
                            received += len(block)
                            bar.update(len(block))
                    if total is not None and received != total:
                        raise DownloadError(f"download of {url} was cut short: "
                                            f"{received} of {total} bytes")
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
                reason = getattr(e, "reason", None) or e
                raise DownloadError(f"could not download {url}: {reason}") from e
        digest = h.hexdigest()
        if md5 is not None and digest != md5.lower():
            raise ChecksumError(f"checksum mismatch for {url}: expected MD5 {md5.lower()}, got "
                                f"{digest}; the file was discarded")
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def _safe_member_path(member: tarfile.TarInfo, dest: Path) -> Path:
    name = member.name.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"archive member {member.name!r} has an absolute path")
    if ".." in Path(name).parts:
        raise UnsafeArchiveError(f"archive member {member.name!r} escapes the target directory")
    if not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(f"archive member {member.name!r} is a link or special file")
    target = (dest / name).resolve()
    if target != dest and dest not in target.parents:
        raise UnsafeArchiveError(f"archive member {member.name!r} escapes the target directory")
    return target


def extract_tar_safely(archive: Union[str, os.PathLike], dest: Union[str, os.PathLike]) -> List[Path]:
    """Extract a (gzipped) tar archive into ``dest`` after checking every member first: absolute
    paths, ``..`` components, paths resolving outside ``dest``, links and device files raise
    :class:`UnsafeArchiveError` and nothing is written. Owners and permission bits from the archive
    are ignored. Returns the paths of the extracted files; an unreadable archive raises
    :class:`CorruptFileError` naming it."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    dest = dest.resolve()
    written = []
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            targets = [_safe_member_path(m, dest) for m in members]
            for member, target in zip(members, targets):
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                with src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                written.append(target)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise CorruptFileError(archive, f"cannot extract archive ({type(e).__name__}: {e})") from e
    return written


def download_cifar10(data_dir: Union[str, os.PathLike], url: str = CIFAR10_URL,
                     md5: str = CIFAR10_MD5, progress: bool = True, timeout: float = 60.0) -> Path:
    """Make ``data_dir/cifar-10-batches-py`` exist: use ``data_dir/cifar-10-python.tar.gz`` if it is
    already there (after verifying its MD5), otherwise download it with :func:`fetch_url`, then extract
    it with :func:`extract_tar_safely` into a temporary directory that is renamed into place.
    Returns the batch directory.

    Raises :class:`DownloadError` when offline, :class:`ChecksumError` on an MD5 mismatch (a local
    archive with a wrong checksum is left alone: delete it to download again), and
    :class:`UnsafeArchiveError` / :class:`CorruptFileError` for a bad archive.
    """
    data_dir = Path(data_dir).expanduser()
    data_dir.mkdir(parents=True, exist_ok=True)
    final = data_dir / CIFAR10_DIRNAME
    if final.is_dir():
        return final
    archive = data_dir / CIFAR10_ARCHIVE
    if archive.exists():
        digest = _md5(archive)
        if digest != md5.lower():
            raise ChecksumError(f"{archive} has MD5 {digest}, expected {md5.lower()}: "
                                "delete it to download again")
    else:
        fetch_url(url, archive, md5=md5, progress=progress, timeout=timeout)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=data_dir))
    try:
        extract_tar_safely(archive, staging)
        if not (staging / CIFAR10_DIRNAME).is_dir():
            raise CorruptFileError(archive, f"archive has no {CIFAR10_DIRNAME}/ directory")
        if not final.exists():
            os.replace(staging / CIFAR10_DIRNAME, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- synthetic task
_SYN_CLASSES = 10
_SYN_CHUNK = 8192            # samples per generation chunk (fixed: part of the definition of the data)
_SYN_SHAPE_AMP = 1.0         # class shape amplitude, times U(0.5, 1.5) per sample
_SYN_DISTRACT_AMP = 1.2      # distractor shape (random class) amplitude, times U(0, 1)
_SYN_TEX_AMP = 0.8           # class grating amplitude, times U(0.3, 1.3)
_SYN_THETA_JITTER = 0.25     # grating orientation jitter, radians (classes are pi/10 apart)
_SYN_FREQ_JITTER = 0.1       # relative grating frequency jitter
_SYN_TINT = 0.3              # class colour offset amplitude
_SYN_COLOUR_JITTER = 0.5     # per-sample colour offset std
_SYN_NOISE = 2.0             # per-pixel Gaussian noise std


def _seeded(*parts: int) -> torch.Generator:
    """A CPU generator seeded from integers through a splitmix64-style hash (decorrelates streams)."""
    h = 0x9E3779B97F4A7C15
    mask = (1 << 64) - 1
    for p in parts:
        h = (h ^ (int(p) & mask)) * 0xBF58476D1CE4E5B9 & mask
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & mask
        h ^= h >> 29
    return torch.Generator().manual_seed(h & ((1 << 63) - 1))


def _smooth_fields(n: int, g: torch.Generator, max_freq: int = 3) -> torch.Tensor:
    """n random periodic (3, 32, 32) colour fields with spatial frequencies up to ``max_freq``
    cycles per image and a 1/(1+|f|^2) spectrum, each with zero mean and unit RMS."""
    f = torch.arange(-max_freq, max_freq + 1, dtype=torch.float32)
    fy, fx = torch.meshgrid(f, f, indexing="ij")
    keep = (fy.abs() + fx.abs()) > 0
    fy, fx = fy[keep], fx[keep]
    amp = torch.randn(n, 3, fy.numel(), generator=g) / (1 + fy ** 2 + fx ** 2)
    phase = torch.rand(n, 3, fy.numel(), generator=g) * (2 * math.pi)
    p = torch.arange(32, dtype=torch.float32) * (2 * math.pi / 32)
    arg = fy[:, None, None] * p[None, :, None] + fx[:, None, None] * p[None, None, :]
    field = (amp[..., None, None] * torch.cos(arg + phase[..., None, None])).sum(2)
    field -= field.mean(dim=(1, 2, 3), keepdim=True)
    return field / field.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()


def _translation_index() -> torch.Tensor:
    """(1024, 1024) int64: row ``dy * 32 + dx`` lists, for each output pixel, the flat source pixel of
    a circular translation by (dy, dx)."""
    i = torch.arange(32)
    rows = (i[None, :] - i[:, None]) % 32                                    # (d, i) -> (i - d) % 32
    return (rows[:, None, :, None] * 32 + rows[None, :, None, :]).reshape(1024, 1024)


class _Translator:
    """Class fields at per-sample circular translations. For large n it tabulates all 1024
    translations of every field once (126 MB for 10 classes, then one row gather per sample); for
    small n it gathers per sample. Both are pure gathers, so they give identical values."""

    def __init__(self, fields: torch.Tensor, n: int):
        self.flat = fields.reshape(fields.shape[0], 3, 1024)
        self.index = _translation_index()
        self.table = None
        if n >= 4 * _SYN_CHUNK:
            k = fields.shape[0]
            self.table = self.flat[:, :, self.index].permute(0, 2, 1, 3).reshape(k * 1024, _PIXELS)

    def __call__(self, cls: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        if self.table is not None:
            return self.table[cls * 1024 + shift]
        idx = self.index[shift][:, None, :].expand(-1, 3, -1)
        return torch.gather(self.flat[cls], 2, idx).view(-1, _PIXELS)


def make_synthetic(n: int, seed: int = 0, split: str = "train") -> Tuple[torch.Tensor, torch.Tensor]:
    """The built-in synthetic image task: ``n`` float32 images of shape (3, 32, 32) (CPU, not
    normalized) and balanced int64 labels in [0, 10).

    Each class k has three features, drawn once from ``seed``: a smooth random colour "shape"
    (spatial frequencies <= 3 cycles per image), an oriented sinusoidal grating (orientation about
    k * pi/10, 3 or 5 cycles per image, its own colour direction) and a weak colour tint. Each image is
    the class shape at a uniformly random circular translation (random amplitude), plus a distractor
    shape of a random class at another random translation, plus the class grating with random phase,
    jittered orientation (0.25 rad std, classes are 0.31 rad apart) and frequency, plus the tint and a
    random colour offset, all times a random contrast in [0.6, 1.4], plus N(0, 2^2) pixel noise.

    Only the tint survives averaging over the nuisances, so pixel-space classifiers do poorly while a
    CNN learns the translation-invariant shape and orientation cues. Measured (seed 0, 50000 train /
    10000 test, chance 10%): nearest class mean 30% test accuracy, ridge-regularized linear classifier
    on pixels 28%; a 3-conv-layer BN CNN (16/32/64 channels, SGD with momentum, 20000 training images)
    60% after 1 epoch, 81% after 3, 86% after 7 (train accuracy 89%: not solved quickly).
    ``split`` ("train" or "test") selects an independent sample stream for the same classes; the
    result depends only on (n, seed, split).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    K = _SYN_CLASSES
    g = _seeded(seed, 0)
    fields = _smooth_fields(K, g)
    tint = torch.randn(K, 3, generator=g)
    theta = (torch.arange(K, dtype=torch.float32) + 0.3 * torch.rand(K, generator=g)) * (math.pi / K)
    freq = (2 * math.pi / 32) * torch.tensor([3.0, 5.0])[torch.arange(K) % 2]
    gcolour = torch.randn(K, 3, generator=g)
    gcolour /= gcolour.norm(dim=1, keepdim=True)

    gs = _seeded(seed, 1 if split == "train" else 2)
    y = torch.randperm(n, generator=gs) % K
    shift = torch.randint(0, 1024, (n,), generator=gs)
    shape_amp = _SYN_SHAPE_AMP * (0.5 + torch.rand(n, generator=gs))
    distract = torch.randint(0, K, (n,), generator=gs)
    distract_shift = torch.randint(0, 1024, (n,), generator=gs)
    distract_amp = _SYN_DISTRACT_AMP * torch.rand(n, generator=gs)
    th = theta[y] + _SYN_THETA_JITTER * torch.randn(n, generator=gs)
    fr = freq[y] * (1 + _SYN_FREQ_JITTER * torch.randn(n, generator=gs))
    phase = (2 * math.pi) * torch.rand(n, generator=gs)
    tex_amp = _SYN_TEX_AMP * (0.3 + torch.rand(n, generator=gs))
    colour = _SYN_TINT * tint[y] + _SYN_COLOUR_JITTER * torch.randn(n, 3, generator=gs)
    contrast = 0.6 + 0.8 * torch.rand(n, generator=gs)

    # the contrast multiplies every class-dependent term (the noise is added after it)
    shape_amp *= contrast
    distract_amp *= contrast
    grating_colour = gcolour[y] * (tex_amp * contrast)[:, None]
    colour *= contrast[:, None]

    shapes = _Translator(fields, n)
    x = torch.empty(n, 3, 1024)
    pos = torch.arange(32, dtype=torch.float32)
    for a in range(0, n, _SYN_CHUNK):
        s = slice(a, min(n, a + _SYN_CHUNK))
        m = s.stop - s.start
        xc = x[s]
        flat = xc.view(m, _PIXELS)
        flat.normal_(0.0, _SYN_NOISE, generator=gs)
        flat.addcmul_(shapes(y[s], shift[s]), shape_amp[s, None])
        flat.addcmul_(shapes(distract[s], distract_shift[s]), distract_amp[s, None])
        kx, ky = fr[s] * torch.cos(th[s]), fr[s] * torch.sin(th[s])
        grating = torch.cos(ky[:, None, None] * pos[None, :, None] + kx[:, None, None] * pos[None, None, :]
                            + phase[s, None, None]).view(m, 1, 1024)
        xc.addcmul_(grating, grating_colour[s, :, None])
        xc += colour[s, :, None]
    return x.view(n, 3, 32, 32), y


# ------------------------------------------------------------------------- dataset on the device
@dataclasses.dataclass
class Dataset:
    """A whole data set on one device. ``train_x``/``test_x``: float32 (N, 3, 32, 32), scaled per
    channel with the training set's statistics; ``train_y``/``test_y``: int64 (N,).

    ``name`` is "cifar10" or "synthetic"; ``source`` a sentence saying exactly which data was used
    (and, for a fallback, why); ``fallback_reason`` is set when "auto" fell back to the synthetic task.
    ``mean``/``std`` are the per-channel training statistics that were removed (CIFAR-10: in [0, 1]
    pixel units; synthetic: in its raw units)."""
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


def channel_stats(x: torch.Tensor) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
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
            mean, std = channel_stats(train_x)
            return Dataset(
                name="cifar10",
                source=(f"CIFAR-10 from {batch_dir} ({train_x.shape[0]} train / {test_x.shape[0]} "
                        f"test images)"),
                train_x=_normalize(train_x, mean, std, 1 / 255.0, device),
                train_y=train_y.to(device), test_x=_normalize(test_x, mean, std, 1 / 255.0, device),
                test_y=test_y.to(device), classes=tuple(classes), mean=mean, std=std)
        if name == "cifar10":
            raise DataError(reason)

    n_train = 50000 if train_size is None else train_size
    n_test = 10000 if test_size is None else test_size
    if n_train <= 0 or n_test <= 0:
        raise ValueError(f"train_size and test_size must be positive, got {n_train}, {n_test}")
    train_x, train_y = make_synthetic(n_train, seed, "train")
    test_x, test_y = make_synthetic(n_test, seed, "test")
    mean, std = channel_stats(train_x)
    what = (f"synthetic 10-class 32x32x3 image task (seed {seed}, {n_train} train / {n_test} test "
            f"images)")
    return Dataset(
        name="synthetic",
        source=f"{what}: {reason}" if reason else f"{what}, as requested",
        train_x=_normalize(train_x, mean, std, 1.0, device), train_y=train_y.to(device),
        test_x=_normalize(test_x, mean, std, 1.0, device), test_y=test_y.to(device),
        classes=tuple(f"class {k}" for k in range(_SYN_CLASSES)), mean=mean, std=std,
        fallback_reason=reason)


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
