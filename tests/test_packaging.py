"""Packaging (issue 27): the sdist holds what a build and the tests need, the build decides its
kernels and writes its configuration only when it builds, the extension is a release build, a torch
that does not fit is refused with a fix that works, and a CUDA tensor on a CPU-only build gets a
bnext error.

Cost: the tests here take seconds (the sdist is built without compiling anything), except
test_wheel_from_sdist_installs_offline, which compiles the extension once more (minutes on 2 cores)
and therefore runs only with BNEXT_TEST_PACKAGING=1: `.ci/run` runs it as its own step after the
README's test line."""
import glob
import importlib.util
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
SLOW = os.environ.get("BNEXT_TEST_PACKAGING") == "1"


def _load_setup_module():
    """setup.py as a module: its functions without running setup() (guarded by __main__)."""
    spec = importlib.util.spec_from_file_location("bnext_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tracked_files():
    """Files git tracks or would track (untracked but not ignored), relative to ROOT; None outside a
    git checkout (for instance in an unpacked sdist)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return None
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, text=True, check=True).stdout
    return {f for f in out.splitlines() if (ROOT / f).is_file()}


def _elf_section_names(path) -> set:
    """The section names of a 64-bit little-endian ELF file (enough to tell whether debug info is in it)."""
    data = pathlib.Path(path).read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "expected a 64-bit little-endian ELF"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    def section(i):
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, offset, size
    _, str_off, str_size = section(shstrndx)
    strtab = data[str_off:str_off + str_size]
    return {strtab[n:strtab.index(b"\0", n)].decode() for n, _, _ in map(section, range(shnum))}


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """The sdist, made by setuptools' PEP 517 hook as `python -m build --sdist --no-isolation` would,
    from this tree as it is (with its built extension and _build_config.py, which must stay out)."""
    out = tmp_path_factory.mktemp("sdist")
    code = ("import sys; from setuptools import build_meta; "
            f"print(build_meta.build_sdist({str(out)!r}))")
    had_egg_info = (ROOT / "bnext.egg-info").exists()
    env = dict(os.environ, BNEXT_CUDA="1")  # must not matter: the sdist decides no kernels
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    if not had_egg_info:  # the hook leaves bnext.egg-info in the tree
        shutil.rmtree(ROOT / "bnext.egg-info", ignore_errors=True)
    assert res.returncode == 0, res.stdout + res.stderr
    return out / res.stdout.strip().splitlines()[-1]


def _sdist_members(path):
    with tarfile.open(path) as tar:
        names = tar.getnames()
    prefix = names[0].split("/")[0] + "/"
    return {n[len(prefix):] for n in names if n.startswith(prefix)}


# --- the sdist ------------------------------------------------------------------------------------

def test_sdist_holds_every_tracked_file_and_no_build_output(sdist):
    members = _sdist_members(sdist)
    # what the build needs, named so that a broken MANIFEST.in fails here even outside a checkout
    for needed in ("setup.py", "pyproject.toml", "MANIFEST.in", "LICENSE", "README.md", "csrc/entry.h",
                   "csrc/registration.cpp", "csrc/cpu/batch_norm.cpp", "csrc/common/welford.h",
                   "csrc/cuda/batch_norm.cu", "csrc/cuda/reduce.cuh", "tests/helpers.py", "tests/conftest.py",
                   ".ci/run", "bnext/experiments/PROTOCOL.md", "benchmarks/conftest.py"):
        assert needed in members, needed
    tracked = _tracked_files()
    if tracked is not None:
        missing = sorted(tracked - members - {".gitignore"})
        assert not missing, f"MANIFEST.in leaves out of the sdist: {missing}"
    assert not [m for m in members if m.endswith((".so", ".o", ".pyc"))], "build output in the sdist"
    assert "bnext/_build_config.py" not in members, "the maker's build configuration must not ship"


def test_sdist_metadata_license_and_python(sdist):
    members = _sdist_members(sdist)
    with tarfile.open(sdist) as tar:
        pkg_info = tar.extractfile(tar.getnames()[0].split("/")[0] + "/PKG-INFO").read().decode()
    assert "License-Expression: BSD-3-Clause" in pkg_info
    assert "License-File: LICENSE" in pkg_info
    assert "Requires-Python: >=3.11" in pkg_info
    assert "Classifier: Programming Language :: Python :: 3.12" in pkg_info
    # the maker's torch release; a wheel built from the sdist pins its own builder's (setup.py)
    assert f"Requires-Dist: torch=={torch.__version__.split('+')[0]}\n" in pkg_info
    assert "BSD 3-Clause License" in (ROOT / "LICENSE").read_text()


# --- the build: kernels, configuration, debug info ------------------------------------------------

@pytest.fixture(scope="module")
def setup_module_():
    return _load_setup_module()


@pytest.mark.parametrize("mode, torch_cuda, nvcc, gpu, expect", [
    ("auto", None, None, False, False),          # CPU torch: CPU kernels
    ("auto", None, (13, 0), False, False),       # nvcc alone does not make a CUDA torch
    ("0", "13.0", (13, 0), True, False),         # asked for CPU only
    ("auto", "13.0", (13, 0), True, True),       # CUDA torch, matching nvcc
    ("1", "13.0", (13, 1), False, True),         # same major is enough
    ("auto", "13.0", None, False, False),        # CUDA torch on a machine with neither nvcc nor GPU
    ("auto", "13.0", (12, 8), False, "nvcc 12.8 was found"),   # another major: stop, say so
    ("auto", "13.0", None, True, "a GPU is visible"),          # a GPU but no nvcc: stop, say so
    ("1", None, None, False, "CPU-only build"),
    ("1", "13.0", None, False, "nvcc was not found"),
    ("maybe", None, None, False, "must be auto, 0 or 1"),
])
def test_decide_cuda(setup_module_, mode, torch_cuda, nvcc, gpu, expect):
    if isinstance(expect, str):
        with pytest.raises(SystemExit) as e:
            setup_module_.decide_cuda(mode, torch_cuda, nvcc, gpu)
        assert expect in str(e.value)
        if mode != "maybe":
            assert "BNEXT_CUDA=0" in str(e.value), "the message must say how to build the CPU kernels anyway"
    else:
        build, reason = setup_module_.decide_cuda(mode, torch_cuda, nvcc, gpu)
        assert build is expect and reason


def test_setup_version_writes_no_build_config(tmp_path):
    """`setup.py --version` (and metadata, sdist) must neither decide kernels nor write
    bnext/_build_config.py: only the build that made the extension does (issue 27, item 5)."""
    cfg = ROOT / "bnext" / "_build_config.py"
    before = cfg.read_bytes() if cfg.exists() else None
    # BNEXT_CUDA=1 with a CPU torch stops a build; here nothing is built, so it must not matter
    env = dict(os.environ, BNEXT_CUDA="1" if torch.version.cuda is None else "0")
    res = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                         env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "0.1.0"
    assert "bnext: building" not in res.stdout
    assert (cfg.read_bytes() if cfg.exists() else None) == before


def test_loaded_extension_matches_its_build_config():
    import bnext
    import bnext._build_config as cfg
    info = bnext.build_info()
    assert info["torch_version"] == cfg.TORCH_VERSION == torch.__version__
    assert info["cuda"] == cfg.CUDA
    assert info["cuda_reason"] == cfg.CUDA_REASON and cfg.CUDA_REASON
    # the configuration sits beside the extension it describes
    assert pathlib.Path(cfg.__file__).parent == pathlib.Path(bnext._C.__file__).parent


def test_extension_is_a_release_build():
    """No debug info unless built with BNEXT_DEBUG=1 (issue 27, item 6: 59 MB with, 5.3 MB without)."""
    import bnext
    import bnext._build_config as cfg
    sections = _elf_section_names(bnext._C.__file__)
    if cfg.DEBUG:
        assert ".debug_info" in sections
    else:
        assert not {s for s in sections if s.startswith(".debug")}, sorted(sections)
        assert ".symtab" not in sections  # stripped at link (-s)


# --- a torch that does not fit --------------------------------------------------------------------

def test_torch_fit_is_release_and_cuda_major():
    import bnext
    f = bnext._release_and_cuda
    assert f("2.13.0+cpu", None) == f("2.13.0", None)
    assert f("2.13.0+cu130", "13.0") == f("2.13.0+cu13x", "13.1")   # local tag and CUDA minor: same ABI
    assert f("2.13.0+cu130", "13.0") != f("2.13.0+cpu", None)       # CPU vs CUDA build of one release
    assert f("2.13.0+cu130", "13.0") != f("2.13.0+cu126", "12.6")
    assert f("2.13.0", None) != f("2.12.0", None)


def test_mismatch_message_fits_editable_checkout_and_installed_wheel(tmp_path):
    import bnext
    editable = bnext._rebuild_hint(str(ROOT / "bnext"), "2.13.0+cpu")
    assert f"--no-build-isolation --no-deps --force-reinstall -e {ROOT}" in editable
    site = tmp_path / "site-packages"
    (site / "bnext").mkdir(parents=True)
    installed = bnext._rebuild_hint(str(site / "bnext"), "2.13.0+cu130")
    assert " -e " not in installed
    assert "pip install torch==2.13.0 " in installed            # the public release, no local tag
    assert "--no-build-isolation --no-deps --force-reinstall <bnext sdist" in installed


def test_mismatched_cuda_build_of_same_release_is_refused(monkeypatch):
    import bnext
    import bnext._build_config as cfg
    release = torch.__version__.split("+")[0]
    monkeypatch.setattr(cfg, "TORCH_VERSION", release + "+cu130")
    monkeypatch.setattr(cfg, "TORCH_CUDA", "13.0" if torch.version.cuda is None else None)
    with pytest.raises(ImportError, match=r"built against torch .* \(CUDA .*Rebuild bnext against this torch"):
        bnext._load_extension()
    monkeypatch.setattr(cfg, "TORCH_VERSION", release + "+other")   # only the local tag differs
    monkeypatch.setattr(cfg, "TORCH_CUDA", torch.version.cuda)
    assert bnext._load_extension() is bnext._C


# --- a CUDA tensor on a CPU-only build --------------------------------------------------------------

def _fake_cuda(*shape):
    """A tensor that says it is on cuda:0 without a GPU: a FakeTensor (shapes and devices only)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    return mode, FakeTensor(mode, torch.empty(shape, device="meta"), torch.device("cuda", 0))


def test_cuda_tensor_on_cpu_only_build_gets_a_bnext_error(monkeypatch):
    import bnext
    from bnext.ops import checks
    monkeypatch.setattr(checks, "_CUDA_BUILT", False)
    mode, x = _fake_cuda(4, 3, 2, 2)
    with mode:
        for call in (lambda: bnext.batch_norm(x, None, None, training=True),
                     lambda: bnext.lp_norm(x, 2, None, None, training=True),
                     lambda: bnext.noisy_batch_norm(x, None, None, training=True),
                     lambda: bnext.channel_stats(x),
                     lambda: bnext.nn.BatchNorm2d(3, affine=False, track_running_stats=False)(x)):
            with pytest.raises(RuntimeError, match=r"(?s)input is on cuda:0 but this bnext was built without CUDA "
                                                   r"kernels \(.+\)\. Rebuild it.*BNEXT_CUDA=1 pip install"):
                call()


def test_cuda_check_lets_cuda_tensors_through_a_cuda_build(monkeypatch):
    """The other side of the test above: with CUDA kernels the same call reaches the op (its fake kernel
    here), so the error above comes from the build check and nothing else."""
    import bnext
    from bnext.ops import checks
    monkeypatch.setattr(checks, "_CUDA_BUILT", True)
    mode, x = _fake_cuda(4, 3, 2, 2)
    with mode:
        y = bnext.batch_norm(x, None, None, training=True)
    assert y.shape == x.shape and y.device.type == "cuda"


def test_cuda_built_flag_is_the_dispatchers():
    import bnext
    from bnext.ops import checks
    assert checks._CUDA_BUILT == bnext.build_info()["cuda"]


# --- sdist -> wheel -> fresh environment (compiles the extension: BNEXT_TEST_PACKAGING=1) ----------

FORWARD = r"""
import os, sys, torch, torch.nn.functional as F, bnext, importlib.metadata as md
assert bnext.__file__.startswith(sys.prefix), (bnext.__file__, sys.prefix)
x = torch.randn(8, 3, 5, 5, dtype=torch.float64)
rm, rv, w, b = torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype), torch.rand(3, dtype=x.dtype), torch.randn(3, dtype=x.dtype)
rm2, rv2 = rm.clone(), rv.clone()
y = bnext.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5)
ref = F.batch_norm(x, rm2, rv2, w, b, training=True, momentum=0.1, eps=1e-5)
err = max((y - ref).abs().max().item(), (rm - rm2).abs().max().item(), (rv - rv2).abs().max().item())
assert err < 1e-12, err
print("REQUIRES", md.requires("bnext"))
print("INFO", bnext.build_info())
"""


@pytest.mark.skipif(not SLOW, reason="compiles the extension once more (minutes): BNEXT_TEST_PACKAGING=1, "
                                     "run by .ci/run after the README's test line")
def test_wheel_from_sdist_installs_offline(sdist, tmp_path):
    release = torch.__version__.split("+")[0]
    wheels = tmp_path / "wheels"
    # a wheel from the sdist alone, without network and with this environment's torch
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
                          "-w", str(wheels), str(sdist)], capture_output=True, text=True,
                         env=dict(os.environ, BNEXT_CUDA="auto"))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    wheel, = wheels.glob("bnext-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        so_name = next(n for n in names if re.fullmatch(r"bnext/_C\..*\.so", n))
        so = tmp_path / "_C.so"
        so.write_bytes(z.read(so_name))
    assert "bnext/_build_config.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "the license travels with the wheel"
    assert "bnext/experiments/PROTOCOL.md" in names
    assert not [n for n in names if n.startswith(("csrc/", "tests/", "benchmarks/")) or "simt" in n
                or "experiments/results/" in n], "test-only or recorded files in the wheel"
    assert f"Requires-Dist: torch=={release}\n" in meta
    assert "License-Expression: BSD-3-Clause" in meta
    assert not {s for s in _elf_section_names(so) if s.startswith(".debug")}
    print(f"wheel {wheel.stat().st_size / 1e6:.1f} MB, extension {so.stat().st_size / 1e6:.1f} MB")

    # a fresh environment: install the wheel alone (offline, no dependencies), then let it see this
    # environment's torch through a .pth, never this checkout
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    res = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    torch_site = os.path.dirname(os.path.dirname(torch.__file__))
    pathlib.Path(site, "torch_from_test_env.pth").write_text(torch_site + "\n")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([str(py), "-c", FORWARD], cwd=outside, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"torch=={release}" in res.stdout

    # the installed wheel under another torch: refused with a fix that fits an installed wheel
    cfg = pathlib.Path(site, "bnext", "_build_config.py")
    cfg.write_text(cfg.read_text().replace(f"TORCH_VERSION = {torch.__version__!r}", "TORCH_VERSION = '2.12.0'"))
    res = subprocess.run([str(py), "-c", "import bnext"], cwd=outside, capture_output=True, text=True, env=env)
    assert res.returncode != 0
    assert "built against torch 2.12.0" in res.stderr and "pip install torch==2.12.0 " in res.stderr
    assert " -e " not in res.stderr


def test_raw_ops_of_a_cpu_only_build_explain_themselves():
    """Every bnext op of a CPU-only build has a CUDA kernel that raises the bnext error (the raw ops and
    those without an input check, grad_stats and multi_axpy among them). Run here by redispatching to
    the CUDA key, which reaches that kernel without a GPU."""
    import bnext
    from bnext.ops import checks
    if bnext.build_info()["cuda"]:
        pytest.skip("a CUDA build has real CUDA kernels")
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("bnext::"))
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    kernels = [n for n in names if has(n, "CPU")]
    assert "bnext::grad_stats" in kernels and "bnext::batch_norm_forward" in kernels
    for name in names:   # every CPU kernel gets the explaining CUDA one, the composites none
        assert has(name, "CUDA") == has(name, "CPU") != has(name, "CompositeImplicitAutograd"), name
    cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    x = torch.randn(4, 3, 2)
    with pytest.raises(RuntimeError, match=r"(?s)bnext.batch_norm_forward: input is on cpu but this bnext was built "
                                           r"without CUDA kernels .*BNEXT_CUDA=1 pip install"):
        torch.ops.bnext.batch_norm_forward.default.redispatch(cuda, x, None, None, None, None, True, 1e-5, False)
    assert checks._CUDA_BUILT is False


@pytest.mark.parametrize("debug", ["0", "1"])
@pytest.mark.parametrize("cuda", [False, True])
def test_configure_sets_the_extension_for_the_kernels_it_decided(setup_module_, monkeypatch, cuda, debug):
    """configure() fills the placeholder extension setuptools finalized: the CUDA sources, libraries and
    nvcc flags only for a CUDA build, debug info only with BNEXT_DEBUG=1 (a CUDA build runs on the GPU
    machine only; this checks what it would be given)."""
    from setuptools import Extension
    from torch.utils import cpp_extension
    if cuda and cpp_extension.CUDA_HOME is None:
        # a CPU torch leaves CUDA_HOME unset even where a toolkit is installed: point it at one
        nvcc = shutil.which("nvcc") or next(iter(sorted(glob.glob("/usr/local/cuda*/bin/nvcc"))), None)
        if nvcc is None:
            pytest.skip("CUDAExtension needs a CUDA toolkit (CUDA_HOME) to name its libraries")
        monkeypatch.setattr(cpp_extension, "CUDA_HOME", os.path.dirname(os.path.dirname(nvcc)))
    monkeypatch.setattr(setup_module_, "decide_cuda", lambda *a: (cuda, "decided by the test"))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.setenv("BNEXT_DEBUG", debug)
    monkeypatch.chdir(ROOT)   # setup.py globs csrc/ relative to the tree, as pip runs it
    ext = Extension("bnext._C", ["placeholder.cpp"])
    ext._full_name = "bnext._C"   # what setuptools' finalize_options adds: must survive
    config = setup_module_.configure(ext)
    assert ext._full_name == "bnext._C"
    assert config["CUDA"] is cuda and config["CUDA_REASON"] == "decided by the test"
    assert config["DEBUG"] is (debug == "1")
    assert "csrc/registration.cpp" in ext.sources
    assert any(s.endswith(".cu") for s in ext.sources) is cuda
    assert ("c10_cuda" in ext.libraries) is cuda
    assert (("BNEXT_WITH_CUDA", None) in ext.define_macros) is cuda
    flags = ext.extra_compile_args
    assert ("nvcc" in flags) is cuda and "-ffp-contract=off" in flags["cxx"]
    assert flags["cxx"][-1] == ("-g" if debug == "1" else "-g0")   # last, so it overrides Python's -g
    assert ("-s" in ext.extra_link_args) is (debug != "1")
    if cuda:
        assert "--fmad=false" in flags["nvcc"] and ("-lineinfo" in flags["nvcc"]) is (debug == "1")
