"""bnext.data: the CIFAR-10 reader on files written in the exact CIFAR format, the restricted
unpickler against malicious pickles, corrupt/partial files, download (checksum, atomic write, offline
fallback) through file:// URLs, safe tar extraction, the synthetic task, and the batch iterator."""
import hashlib
import io
import math
import os
import pickle
import shlex
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from bnext import data

N_TRAIN_BATCH = 20          # images per data_batch_k in these tests (10000 in the real files)
N_TEST = 30


# --------------------------------------------------------------------------- writing CIFAR files
class Py2StylePickler(pickle._Pickler):
    """Writes pickles the way Python 2's cPickle wrote the official CIFAR-10 files at protocol 2:
    str and bytes as BINSTRING (read back as bytes with encoding="bytes"), and numpy's
    reconstructor under its numpy 1.x module name numpy.core.multiarray."""
    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_string(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_py2_string
    dispatch[str] = save_py2_string

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core.", "numpy.core.")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def py2_dumps(obj) -> bytes:
    buf = io.BytesIO()
    Py2StylePickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def batch_dict(rng, n, label):
    return {b"batch_label": label.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i:05d}.png".encode() for i in range(n)]}


def write_cifar(root: Path, seed=0, dumps=py2_dumps):
    """A complete cifar-10-batches-py directory under root with small batches; returns the dicts."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    batches = {f"data_batch_{k}": batch_dict(rng, N_TRAIN_BATCH, f"training batch {k} of 5")
               for k in range(1, 6)}
    batches["test_batch"] = batch_dict(rng, N_TEST, "testing batch 1 of 1")
    for name, b in batches.items():
        (d / name).write_bytes(dumps(b))
    meta = {b"num_cases_per_batch": N_TRAIN_BATCH, b"num_vis": 3072,
            b"label_names": [n.encode() for n in data.CIFAR10_CLASSES]}
    (d / "batches.meta").write_bytes(dumps(meta))
    return batches


@pytest.fixture
def cifar(tmp_path):
    root = tmp_path / "data"
    return root, write_cifar(root)


def reference_normalized(batches, names):
    """Independent: pixels in [0, 1] laid out as (n, c, i, j) = row[c*1024 + i*32 + j], scaled with
    float64 per-channel mean and population std of the training images."""
    def images(rows):
        out = np.empty((rows.shape[0], 3, 32, 32))
        for c in range(3):
            for i in range(32):
                out[:, c, i, :] = rows[:, c * 1024 + i * 32: c * 1024 + i * 32 + 32] / 255.0
        return out

    train = images(np.concatenate([batches[f"data_batch_{k}"][b"data"] for k in range(1, 6)]))
    mean = train.mean(axis=(0, 2, 3))
    std = np.sqrt(((train - mean[None, :, None, None]) ** 2).mean(axis=(0, 2, 3)))
    return {n: (images(batches[n][b"data"]) - mean[None, :, None, None]) / std[None, :, None, None]
            for n in names}, mean, std


# ---------------------------------------------------------------------------------- reading
@pytest.mark.parametrize("dumps", [py2_dumps, lambda o: pickle.dumps(o, protocol=2)],
                         ids=["python2-style", "python3-protocol2"])
def test_reads_cifar_format_values_labels_normalization(tmp_path, dumps):
    root = tmp_path / "data"
    batches = write_cifar(root, dumps=dumps)
    ds = data.load_dataset("cifar10", data_dir=root, download=False)
    assert ds.name == "cifar10" and ds.fallback_reason is None
    assert str(root / "cifar-10-batches-py") in ds.source and "CIFAR-10" in ds.source
    assert ds.classes == data.CIFAR10_CLASSES
    assert ds.train_x.shape == (5 * N_TRAIN_BATCH, 3, 32, 32) and ds.train_x.dtype == torch.float32
    assert ds.test_x.shape == (N_TEST, 3, 32, 32)
    assert ds.train_y.dtype == torch.int64
    labels = sum((batches[f"data_batch_{k}"][b"labels"] for k in range(1, 6)), [])
    assert ds.train_y.tolist() == labels
    assert ds.test_y.tolist() == batches["test_batch"][b"labels"]
    ref, mean, std = reference_normalized(batches, [f"data_batch_{k}" for k in range(1, 6)]
                                          + ["test_batch"])
    train_ref = np.concatenate([ref[f"data_batch_{k}"] for k in range(1, 6)])
    np.testing.assert_allclose(ds.train_x.numpy(), train_ref, rtol=0, atol=2e-5)
    np.testing.assert_allclose(ds.test_x.numpy(), ref["test_batch"], rtol=0, atol=2e-5)
    np.testing.assert_allclose(ds.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(ds.std, std, rtol=1e-12)


def test_auto_prefers_cifar_and_accepts_batch_dir_and_subsets(cifar):
    root, batches = cifar
    ds = data.load_dataset("auto", data_dir=root, download=False)
    assert ds.name == "cifar10"
    direct = data.load_dataset("auto", data_dir=root / "cifar-10-batches-py", download=False)
    assert torch.equal(direct.train_x, ds.train_x)
    sub = data.load_dataset("cifar10", data_dir=root, download=False, train_size=25, test_size=7)
    assert sub.train_x.shape[0] == 25 and sub.test_x.shape[0] == 7
    rows = np.concatenate([batches["data_batch_1"][b"data"], batches["data_batch_2"][b"data"]])[:25]
    pixels = rows.reshape(25, 3, 1024) / 255.0
    np.testing.assert_allclose(sub.mean, pixels.mean(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(sub.std, pixels.std(axis=(0, 2)), rtol=1e-12)
    with pytest.raises(ValueError, match="train_size"):
        data.load_dataset("cifar10", data_dir=root, download=False, train_size=1000)


def test_default_data_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("BNEXT_DATA", str(tmp_path))
    assert data.default_data_dir() == tmp_path
    monkeypatch.delenv("BNEXT_DATA")
    assert data.default_data_dir() == Path("~/.cache/bnext").expanduser()


def _truncate(p):
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])


def _garbage(p):
    p.write_bytes(b"\x00not a pickle at all" * 10)


def _trailing(p):
    p.write_bytes(p.read_bytes() + b"junk")


def _empty(p):
    p.write_bytes(b"")


def _missing(p):
    p.unlink()


def _rewrite(mutate):
    def f(p):
        d = pickle.loads(p.read_bytes(), encoding="bytes")
        mutate(d)
        p.write_bytes(py2_dumps(d))
    return f


@pytest.mark.parametrize("name,corrupt,problem", [
    ("data_batch_3", _truncate, "truncated or corrupt"),
    ("test_batch", _garbage, "truncated or corrupt"),
    ("data_batch_2", _trailing, "unexpected bytes"),
    ("data_batch_4", _empty, "empty"),
    ("data_batch_5", _missing, "missing"),
    ("batches.meta", _missing, "missing"),
    ("data_batch_1", _rewrite(lambda d: d.update({b"data": d[b"data"][:, :3000]})), "shape"),
    ("data_batch_1", _rewrite(lambda d: d.update({b"data": d[b"data"].astype(np.int16)})), "uint8"),
    ("data_batch_1", _rewrite(lambda d: d[b"labels"].__setitem__(0, 10)), "labels outside"),
    ("data_batch_1", _rewrite(lambda d: d[b"labels"].pop()), "labels"),
    ("test_batch", _rewrite(lambda d: d.pop(b"labels")), "missing key"),
    ("batches.meta", _rewrite(lambda d: d[b"label_names"].pop()), "label names"),
])
def test_corrupt_or_partial_files_raise_naming_the_file(cifar, name, corrupt, problem):
    root, _ = cifar
    path = root / "cifar-10-batches-py" / name
    corrupt(path)
    for mode in ("cifar10", "auto"):       # a broken CIFAR directory never falls back silently
        with pytest.raises(data.CorruptFileError, match=problem) as info:
            data.load_dataset(mode, data_dir=root, download=False)
        assert info.value.path == path and str(path) in str(info.value)


# ------------------------------------------------------------------------------ safe loading
class RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class CallsEval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').close()",)


def test_malicious_pickle_payload_is_real(tmp_path):
    """Sanity check of the payload used below: plain pickle runs it."""
    marker = tmp_path / "pwned-by-plain-pickle"
    pickle.loads(pickle.dumps(RunsShell(marker), protocol=2))
    assert marker.exists()


@pytest.mark.parametrize("payload", [
    lambda m: RunsShell(m),
    lambda m: {b"data": RunsShell(m), b"labels": [0]},
    lambda m: {b"data": np.zeros((1, 3072), np.uint8), b"labels": [CallsEval(m)]},
], ids=["top-level-os.system", "os.system-as-data", "eval-in-labels"])
def test_malicious_pickle_is_refused_and_never_runs(cifar, payload):
    root, _ = cifar
    marker = root / "pwned"
    path = root / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(pickle.dumps(payload(marker), protocol=2))
    with pytest.raises(data.UnsafePickleError, match="refused to load global") as info:
        data.load_dataset("cifar10", data_dir=root, download=False)
    assert info.value.path == path and "data_batch_2" in str(info.value)
    assert not marker.exists()


def test_restricted_unpickler_refuses_non_plain_numpy(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(pickle.dumps({b"data": np.array([object(), 1], dtype=object)}, protocol=2))
    with pytest.raises(data.UnsafePickleError, match="dtype 'O.*' is not allowed"):
        data.restricted_load(path)
    path.write_bytes(pickle.dumps(np.zeros(3, dtype=[("a", "u1"), ("b", "f4")]), protocol=2))
    with pytest.raises(data.UnsafePickleError, match="not allowed"):
        data.restricted_load(path)
    path.write_bytes(pickle.dumps(np.ma.masked_array([1, 2]), protocol=2))
    with pytest.raises(data.UnsafePickleError, match="numpy.ma"):
        data.restricted_load(path)
    path.write_bytes(pickle.dumps(np.zeros((2, 2), np.uint8), protocol=5))
    with pytest.raises(data.UnsafePickleError, match="_frombuffer"):
        data.restricted_load(path)
    plain = {b"a": [1, 2.5, None, True, (b"x", "y")], "b": np.arange(6, dtype=np.int64).reshape(2, 3)}
    path.write_bytes(pickle.dumps(plain, protocol=2))
    back = data.restricted_load(path)
    assert back[b"a"] == plain[b"a"] and np.array_equal(back["b"], plain["b"])


# ---------------------------------------------------------------------- download and extraction
def make_archive(path: Path, batch_root: Path):
    with tarfile.open(path, "w:gz") as tar:
        tar.add(batch_root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_verifies_checksum_and_extracts(tmp_path, cifar):
    src_root, batches = cifar
    archive = tmp_path / "cifar-10-python.tar.gz"
    md5 = make_archive(archive, src_root)
    dest = tmp_path / "dest"
    ds = data.load_dataset("auto", data_dir=dest, url=archive.as_uri(), md5=md5, progress=False)
    assert ds.name == "cifar10" and ds.fallback_reason is None
    assert ds.train_y.tolist() == sum((batches[f"data_batch_{k}"][b"labels"] for k in range(1, 6)), [])
    assert (dest / "cifar-10-python.tar.gz").read_bytes() == archive.read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    # a verified archive already in data_dir is extracted without fetching anything
    for f in (dest / "cifar-10-batches-py").iterdir():
        f.unlink()
    (dest / "cifar-10-batches-py").rmdir()
    again = data.load_dataset("cifar10", data_dir=dest, url=(tmp_path / "gone").as_uri(), md5=md5)
    assert torch.equal(again.train_x, ds.train_x)


def test_checksum_mismatch_is_detected_and_nothing_kept(tmp_path, cifar):
    src_root, _ = cifar
    archive = tmp_path / "cifar-10-python.tar.gz"
    make_archive(archive, src_root)
    dest = tmp_path / "dest"
    with pytest.raises(data.ChecksumError, match="expected MD5 0123"):
        data.load_dataset("auto", data_dir=dest, url=archive.as_uri(),
                          md5="0123456789abcdef0123456789abcdef", progress=False)
    assert list(dest.iterdir()) == []            # no archive, no partial file, no extraction
    (dest / "cifar-10-python.tar.gz").write_bytes(b"a damaged local archive")
    with pytest.raises(data.ChecksumError, match="delete it"):
        data.download_cifar10(dest, url=archive.as_uri(), progress=False)


def test_offline_falls_back_to_synthetic_with_reason(tmp_path):
    url = (tmp_path / "no-such-archive.tar.gz").as_uri()
    ds = data.load_dataset("auto", data_dir=tmp_path / "d", url=url, progress=False,
                           train_size=200, test_size=100, seed=3)
    assert ds.name == "synthetic"
    assert "download failed" in ds.fallback_reason and "CIFAR-10 not found" in ds.fallback_reason
    assert ds.source.startswith("synthetic 10-class 32x32x3 image task (seed 3")
    assert ds.fallback_reason in ds.source
    assert not list((tmp_path / "d").glob("*.part"))
    with pytest.raises(data.DataError, match="download failed"):
        data.load_dataset("cifar10", data_dir=tmp_path / "d", url=url, progress=False)
    no_dl = data.load_dataset("auto", data_dir=tmp_path / "d", download=False,
                              train_size=200, test_size=100)
    assert "download is disabled" in no_dl.source
    with pytest.raises(data.DownloadError):
        data.fetch_url(url, tmp_path / "x", progress=False)


def tar_with(path, name, kind="file"):
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(name)
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))


@pytest.mark.parametrize("name,kind", [
    ("../escaped.txt", "file"),
    ("cifar-10-batches-py/../../escaped.txt", "file"),
    ("/tmp/bnext-absolute-escape.txt", "file"),
    ("cifar-10-batches-py/link", "symlink"),
])
def test_tar_extraction_rejects_path_traversal(tmp_path, name, kind):
    archive = tmp_path / "a.tar"
    tar_with(archive, name, kind)
    dest = tmp_path / "out" / "inner"
    with pytest.raises(data.UnsafeArchiveError, match="archive member"):
        data.extract_tar_safely(archive, dest)
    assert not (tmp_path / "out" / "escaped.txt").exists()
    assert not (tmp_path / "escaped.txt").exists()
    assert list(dest.iterdir()) == []


# ------------------------------------------------------------------------------ synthetic task
def test_synthetic_is_deterministic_balanced_and_split():
    x1, y1 = data.make_synthetic(500, seed=7)
    x2, y2 = data.make_synthetic(500, seed=7)
    assert x1.shape == (500, 3, 32, 32) and x1.dtype == torch.float32 and y1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.bincount(y1, minlength=10).tolist() == [50] * 10
    x3, _ = data.make_synthetic(500, seed=8)
    xt, _ = data.make_synthetic(500, seed=7, split="test")
    assert not torch.equal(x1, x3) and not torch.equal(x1, xt)
    assert torch.isfinite(x1).all()
    ds = data.load_dataset("synthetic", train_size=300, test_size=100, seed=7)
    assert ds.source == ("synthetic 10-class 32x32x3 image task (seed 7, 300 train / 100 test "
                         "images), as requested")
    mean = ds.train_x.double().mean(dim=(0, 2, 3))
    std = ds.train_x.double().std(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean, torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)
    raw_test, _ = data.make_synthetic(100, seed=7, split="test")
    ref = (raw_test.double() - torch.tensor(ds.mean)[None, :, None, None]) \
        / torch.tensor(ds.std)[None, :, None, None]
    torch.testing.assert_close(ds.test_x.double(), ref, atol=1e-5, rtol=0)


def test_synthetic_is_learnable_but_not_by_class_means_alone():
    """A nearest-class-mean classifier on pixels beats chance (10%) by a clear margin but stays far
    from perfect (the shape and orientation cues are translation/phase-randomized)."""
    ds = data.load_dataset("synthetic", train_size=3000, test_size=1000, seed=0)
    means = torch.stack([ds.train_x[ds.train_y == k].mean(0) for k in range(10)]).flatten(1)
    pred = torch.cdist(ds.test_x.flatten(1), means).argmin(1)
    acc = (pred == ds.test_y).double().mean().item()
    assert 0.2 < acc < 0.6


def _naive_statistics(x: np.ndarray):
    """Independent reference for image_statistics: explicit pairs of adjacent pixels, per channel and
    direction, numpy float64."""
    corr, kurt = [], []
    n, c, h, w = x.shape
    for ch in range(c):
        for di, dj in ((0, 1), (1, 0)):
            a = [x[k, ch, i, j] for k in range(n) for i in range(h - di) for j in range(w - dj)]
            b = [x[k, ch, i + di, j + dj] for k in range(n) for i in range(h - di) for j in range(w - dj)]
            a, b = np.array(a), np.array(b)
            corr.append(np.corrcoef(a, b)[0, 1])
            d = b - a
            d = d - d.mean()
            kurt.append((d ** 4).mean() / (d ** 2).mean() ** 2 - 3)
    return np.mean(corr), np.mean(kurt)


def test_image_statistics_match_a_naive_reference():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 6, 5, generator=g).cumsum(3)  # correlated along rows
    st = data.image_statistics(x)
    corr, kurt = _naive_statistics(x.double().numpy())
    assert math.isclose(st["neighbour_correlation"], corr, rel_tol=1e-9)
    assert math.isclose(st["difference_kurtosis"], kurt, rel_tol=1e-9, abs_tol=1e-12)
    ref = x.double()
    assert np.allclose(st["channel_mean"], ref.mean(dim=(0, 2, 3)).numpy(), atol=1e-6)
    assert np.allclose(st["channel_std"], ref.std(dim=(0, 2, 3), unbiased=False).numpy(), atol=1e-6)
    u8 = (torch.rand(3, 3, 4, 4, generator=g) * 255).to(torch.uint8)
    su = data.image_statistics(u8)  # uint8 in [0, 1] pixel units
    assert math.isclose(su["neighbour_correlation"], _naive_statistics(u8.double().numpy() / 255)[0], rel_tol=1e-9)
    assert np.allclose(su["channel_mean"], (u8.double() / 255).mean(dim=(0, 2, 3)).numpy(), atol=1e-9)
    with pytest.raises(ValueError, match="x must be"):
        data.image_statistics(torch.randn(3, 32, 32))


def test_synthetic_pixels_look_natural_not_iid():
    """Natural images: neighbouring pixels correlate at ~0.9 and their differences are heavy-tailed
    (mostly small, sometimes an edge). i.i.d. pixel noise would give ~0 and ~0."""
    x, _ = data.make_synthetic(1000, seed=0)
    st = data.image_statistics(x)
    assert 0.85 < st["neighbour_correlation"] < 0.99
    assert st["difference_kurtosis"] > 3.0
    noise = data.image_statistics(torch.randn(200, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert abs(noise["neighbour_correlation"]) < 0.02 and abs(noise["difference_kurtosis"]) < 0.1
    # each dataset carries the statistics of its training images before scaling
    ds = data.load_dataset("synthetic", train_size=1000, test_size=10, seed=0)
    assert ds.statistics == st
    assert np.allclose(ds.statistics["channel_mean"], ds.mean) and np.allclose(ds.statistics["channel_std"], ds.std)


def test_cifar_dataset_carries_its_statistics(cifar):
    root, _ = cifar
    ds = data.load_dataset("cifar10", data_dir=root, download=False)
    raw, *_ = data.read_cifar10(root / "cifar-10-batches-py")
    assert ds.statistics == data.image_statistics(raw)
    assert np.allclose(ds.statistics["channel_mean"], ds.mean) and np.allclose(ds.statistics["channel_std"], ds.std)


def test_package_keeps_the_public_names():
    import bnext
    for name in data.__all__:
        assert hasattr(data, name), name
    # the per-channel helper no longer shadows bnext.channel_stats (the activation-statistics op)
    assert not hasattr(data, "channel_stats") and callable(bnext.channel_stats)
    mean, std = data.channel_mean_std(torch.arange(24, dtype=torch.float32).view(2, 3, 2, 2))
    ref = torch.arange(24, dtype=torch.float64).view(2, 3, 2, 2)
    assert np.allclose(mean, ref.mean(dim=(0, 2, 3)).numpy())
    assert np.allclose(std, ref.std(dim=(0, 2, 3), unbiased=False).numpy())


# ----------------------------------------------------------------------------- batch iteration
def test_batches_are_deterministic_epochwise_and_resumable():
    n, bs = 103, 10
    x = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)
    y = torch.arange(n)
    spe = data.steps_per_epoch(n, bs)
    assert spe == 10
    run = list(data.iterate_batches(x, y, bs, seed=5, num_steps=35))
    again = list(data.iterate_batches(x, y, bs, seed=5, num_steps=35))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(run, again))
    for e in range(3):                      # each epoch: distinct samples, x and y stay paired
        ys = torch.cat([run[s][1] for s in range(e * spe, (e + 1) * spe)])
        assert ys.unique().numel() == spe * bs
        assert torch.equal(torch.cat([run[s][0][:, 0] for s in range(e * spe, (e + 1) * spe)]),
                           ys.float())
        assert torch.equal(ys, data.epoch_permutation(n, e, seed=5)[:spe * bs])
    assert not torch.equal(run[0][1], run[spe][1])
    for start in (0, 7, 10, 23):
        resumed = list(data.iterate_batches(x, y, bs, seed=5, start_step=start, num_steps=35 - start))
        assert len(resumed) == 35 - start
        assert all(torch.equal(a[1], b[1]) for a, b in zip(resumed, run[start:]))
        assert torch.equal(data.batch_at(x, y, bs, start, seed=5)[1], run[start][1])
    other = next(data.iterate_batches(x, y, bs, seed=6))
    assert not torch.equal(other[1], run[0][1])
    with pytest.raises(ValueError, match="larger than the data set"):
        next(data.iterate_batches(x, y, 200))
