""".ci/gpu_check.sh and its report writer .ci/gpu_report.py, on this machine: argument handling,
the no-GPU path (exit 2, a plain message, nothing built), and the report on fake results (steps,
benchmark tables, the GPU benchmark targets, at most 8 files)."""
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "gpu_check.sh"
REPORT = ROOT / ".ci" / "gpu_report.py"


def load_report():
    spec = importlib.util.spec_from_file_location("gpu_report", REPORT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_bin(tmp_path, nvidia_smi_rc):
    """A directory with a fake nvidia-smi (exit status `nvidia_smi_rc`), put first on PATH."""
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    tool = d / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\necho 'GPU 0: Fake'\nexit {nvidia_smi_rc}\n")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return str(d)


def run_script(args, tmp_path, nvidia_smi_rc=1, env_extra=None):
    env = dict(os.environ, PYTHON=sys.executable,
               PATH=fake_bin(tmp_path, nvidia_smi_rc) + os.pathsep + os.environ.get("PATH", ""))
    env.update(env_extra or {})
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("script", ["gpu_check.sh", "compute_sanitizer.sh", "compile_cuda.sh"])
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(ROOT / ".ci" / script)]).returncode == 0


@pytest.mark.parametrize("args,message", [([], "OUTDIR is required"), (["--frobnicate", "out"], "unknown option"),
                                          (["a", "b"], "more than one OUTDIR"), (["--help"], "usage")])
def test_bad_arguments_exit_2_with_a_message(tmp_path, args, message):
    r = run_script(args, tmp_path)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_bad_budget_exits_2(tmp_path):
    r = run_script([str(tmp_path / "out")], tmp_path, env_extra={"BNEXT_GPU_CHECK_BUDGET": "soon"})
    assert r.returncode == 2 and "BNEXT_GPU_CHECK_BUDGET" in r.stderr


@pytest.mark.parametrize("nvidia_smi_rc", [1, 0])
def test_no_gpu_exits_2_with_a_plain_message(tmp_path, nvidia_smi_rc):
    # nvidia-smi failing, or answering while this Python's torch sees no GPU (the CPU torch here).
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "out"
    r = run_script([str(out), "--no-bench"], tmp_path, nvidia_smi_rc=nvidia_smi_rc)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no GPU" in r.stderr and "nothing was built or run" in r.stderr
    summary = (out / "summary.md").read_text()
    assert "no GPU" in summary
    assert json.loads((out / "results.json").read_text())["verdict"] == "no GPU"
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "summary.md"]
    assert not (ROOT / "build" / "gpu_check_marker").exists()


def fake_bench():
    rows = []
    for impl, ms in (("bnext", 0.10), ("torch", 0.105), ("compile", 0.12)):
        rows.append({"group": "bn", "shape": [128, 64, 32, 32], "dtype": "fp32", "layout": "nchw",
                     "pass": "fwd+bwd", "impl": impl, "ms": ms, "bytes": 8 * 128 * 64 * 32 * 32 * 4,
                     "gbps": 8 * 128 * 64 * 32 * 32 * 4 / (ms * 1e-3) / 1e9})
    for impl, ms in (("bnext", 0.2), ("torch", 0.5)):  # 2.5x: misses the 3x target
        rows.append({"group": "noisy_bn", "shape": [128, 64, 32, 32], "dtype": "bf16", "layout": "channels_last",
                     "pass": "fwd", "impl": impl, "ms": ms, "bytes": 1, "gbps": 1.0})
    return {"device": "Fake H200", "copy_gbps": 4000.0, "rows": rows, "errors": ["bn_relu (1,): boom"],
            "training_step": {"bnext_ms": 20.0, "torch_ms": 21.0},
            "line_probe": {"batched_ms": 10.0, "sequential_ms": 30.0, "case": "VGG"},
            "grad_stats": {"bnext_ms": 0.1, "foreach_norm_ms": 0.3}}


def test_report_on_fake_results(tmp_path):
    rep = str(REPORT)
    run = lambda *a: subprocess.run([sys.executable, rep, str(tmp_path), *a], capture_output=True, text=True)  # noqa: E731
    assert run("init").returncode == 0
    log = tmp_path / "tests.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)) + "FAILED tests/test_cuda.py::test_x\n")
    assert run("step", "build", "passed", "95", str(tmp_path / "build.log"), "exit 0").returncode == 0
    assert run("step", "tests", "failed", "40", str(log), "exit 1").returncode == 0
    partial = (tmp_path / "summary.md").read_text()  # written as it goes: readable before finish
    assert "running (or cut off)" in partial and "| tests | failed | 40 |" in partial
    (tmp_path / "bench.json").write_text(json.dumps(fake_bench()))
    assert run("finish").returncode == 0
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["verdict"] == "FAILED: tests"
    assert [s["name"] for s in record["steps"]] == ["build", "tests"]
    assert "FAILED tests/test_cuda.py::test_x" in record["steps"][1]["tail"]
    assert "line 50" not in record["steps"][1]["tail"]  # only the last lines
    targets = {(t["target"], t["case"]): t for t in record["targets"]}
    bn = targets[("BN fwd+bwd time vs torch", "bn 128x64x32x32 fp32 nchw fwd+bwd")]
    assert bn["met"] and bn["value"] == round(0.10 / 0.105, 3)
    bw = targets[("BN fwd+bwd bandwidth vs copy", "bn 128x64x32x32 fp32 nchw fwd+bwd")]
    assert not bw["met"] and bw["value"] == round(8 * 128 * 64 * 32 * 32 * 4 / 1e-4 / 1e9 / 4000.0, 3)  # 0.67
    noisy = targets[("noisy_bn speedup vs eager composition", "noisy_bn 128x64x32x32 bf16 channels_last fwd")]
    assert not noisy["met"] and noisy["value"] == 2.5
    assert targets[("line probe batched vs sequential", "VGG")]["met"]
    summary = (tmp_path / "summary.md").read_text()
    assert "FAILED: tests" in summary and "Targets: 2 of 4 met" in summary  # BN time and the line probe
    assert "benchmark error: bn_relu (1,): boom" in summary and "| **no** |" in summary
    assert "FAILED tests/test_cuda.py::test_x" in summary
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8 and "summary.md" in files and "results.json" in files
    assert not any(f.endswith(".tmp") for f in files)


def test_report_rejects_bad_commands(tmp_path):
    rep = str(REPORT)
    bad = [[str(tmp_path), "launch"], [str(tmp_path), "step", "x", "great", "1", "log"],
           [str(tmp_path / "missing"), "init"], [str(tmp_path), "finish", "extra"]]
    for args in bad:
        assert subprocess.run([sys.executable, rep, *args], capture_output=True, text=True).returncode != 0, args


def test_bn_target_ratio_and_missing_baseline():
    mod = load_report()
    row = {"group": "bn", "shape": [2, 3], "dtype": "fp32", "layout": "nchw", "pass": "fwd+bwd", "bytes": 1}
    slow = [dict(row, impl="bnext", ms=1.2, gbps=1.0), dict(row, impl="torch", ms=1.0, gbps=1.0)]
    checks = mod.check_targets({"rows": slow})
    assert [c["met"] for c in checks] == [False]  # 1.2x slower; no copy bandwidth: no bandwidth check
    assert mod.check_targets({"rows": slow[:1]}) == []  # no baseline, nothing to compare


def test_script_is_executable():
    # The README says `.ci/gpu_check.sh OUTDIR`: that needs the run bit, in the checkout and in git.
    assert os.access(SCRIPT, os.X_OK), f"{SCRIPT} is not executable"
    if shutil.which("git") and (ROOT / ".git").exists():
        line = subprocess.run(["git", "ls-files", "-s", ".ci/gpu_check.sh"], cwd=ROOT, capture_output=True,
                              text=True).stdout
        assert not line or line.startswith("100755"), line


def test_step_limits_fit_the_budget_and_one_device_command():
    # The device tool allows 600 s per command and 900 s per lease (start included): the default budget
    # is the sum of the step limits, so no step is skipped for lack of time when each keeps to its limit,
    # and it leaves room for the machine's start and one rerun.
    text = SCRIPT.read_text()
    import re
    budget = int(re.search(r'BUDGET="\$\{BNEXT_GPU_CHECK_BUDGET:-(\d+)\}"', text).group(1))
    limits = dict(re.findall(r"(LIMIT_[A-Z_]+)=(\d+)", text))
    used = set(re.findall(r'run_step \w[\w-]* "\$(LIMIT_[A-Z_]+)"', text))
    assert used == set(limits), (used, limits)  # every step has a named limit and every limit is used
    assert sum(int(v) for v in limits.values()) == budget
    assert budget <= 480
    # the slow steps come last: a cut-off run still has the build, the tests and the benchmarks
    order = [m for m in re.findall(r'run_step (\w[\w-]*)', text) if m != "NAME"]
    assert order.index("sanitizer") > order.index("bench") > order.index("tests-existing")


def test_dry_run_runs_every_step_without_a_gpu(tmp_path):
    # Everything but the GPU: the test steps collect (and skip) the CUDA files, the benchmark code runs on
    # the CPU at small sizes, the sanitizer subset is collected. --no-build reuses this tree's build.
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: run the real check")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable,
               PATH=fake_bin(tmp_path, 1) + os.pathsep + os.environ.get("PATH", ""))
    r = subprocess.run(["bash", str(SCRIPT), str(out), "--dry-run", "--no-build"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=400)
    record = json.loads((out / "results.json").read_text())
    assert r.returncode == 0, (r.stderr, (out / "summary.md").read_text())
    assert [s["name"] for s in record["steps"]] == ["tests-new", "tests-existing", "bench", "sanitizer"]
    assert all(s["status"] == "passed" for s in record["steps"])
    assert record["verdict"] == "dry run: all steps passed"
    bench = record["bench"]
    assert bench["dry_run"] and bench["complete"] and not bench["errors"]
    assert {(r["group"], r["impl"]) for r in bench["rows"]} >= {("bn", "bnext"), ("bn", "torch"),
                                                                ("noisy_bn", "bnext")}
    assert bench["training_step"] and bench["line_probe"] and bench["grad_stats"]
    assert "dry run without a GPU" in (out / "summary.md").read_text()
    assert "1 test collected" in (out / "sanitizer.log").read_text()
