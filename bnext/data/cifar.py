"""CIFAR-10 from the official python-pickle batches (``cifar-10-batches-py/data_batch_1..5``,
``test_batch``, ``batches.meta``), read with a restricted unpickler: the files can only rebuild dicts,
lists, strings, ints and plain numeric numpy arrays; any other global a pickle names (``os.system``,
``builtins.eval``, ...) is refused before it is called. Every file is validated (types, shapes, dtypes,
label range) and a missing, truncated or corrupt file raises :class:`CorruptFileError` naming it.
The official archive is downloaded (MD5-verified) and extracted member by member after checks.
"""
from __future__ import annotations

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
from typing import List, Optional, Tuple, Union

import numpy as np
import torch

from .errors import ChecksumError, CorruptFileError, DownloadError, UnsafeArchiveError, UnsafePickleError

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
