#!/usr/bin/env python3
"""The report of .ci/gpu_check.sh: OUTDIR/results.json (the record) and OUTDIR/summary.md (its
rendering), rewritten after every step so that a run cut off midway still leaves what it found.

    gpu_report.py OUTDIR init [--no-gpu REASON | --dry-run REASON]
                                                    start a record (machine, torch, time); a dry run
                                                    (gpu_check.sh --dry-run) is marked as such
    gpu_report.py OUTDIR step NAME STATUS SECONDS LOG [NOTE]
                                                    add a step (STATUS: passed, failed, timeout, skipped)
    gpu_report.py OUTDIR finish                     fold OUTDIR/bench.json in, check the targets

Standard library only (the GPU machine's Python has torch, but the report must not need it): the
machine facts come from nvidia-smi and `python3 -c "import torch"` when they answer, else "unknown".

Targets (issue 15), checked on the benchmark rows of bench.json (benchmarks/bench_gpu.py):
  BN fwd+bwd    bnext time <= 1.10 x torch (cuDNN) at every shape, and >= 80 % of the measured copy
                bandwidth counting the 8 transfers of a training BatchNorm (forward: x read by the
                statistics and the elementwise pass, y written; backward: x and dy read by the sums and
                the dx pass, dx written); bench_gpu.py puts that count in each row's `bytes`
  noisy BN, l_p bnext >= 3 x faster than their eager torch composition
  line probes   batched >= 2 x faster than sequential
"""
import json
import os
import subprocess
import sys
import time

RESULTS = "results.json"
SUMMARY = "summary.md"
BENCH = "bench.json"
LOG_TAIL = 30  # lines of a failed step's log quoted in the summary

BN_RATIO_MAX = 1.10
BN_COPY_FRACTION_MIN = 0.80
VARIANT_SPEEDUP_MIN = 3.0
LINE_PROBE_SPEEDUP_MIN = 2.0


def _run(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_facts():
    gpu = _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
    torch_line = _run([sys.executable, "-c", "import torch; print(torch.__version__, torch.version.cuda)"])
    return {"gpu": gpu or "unknown", "torch": torch_line or "unknown", "host_cpus": os.cpu_count()}


def load(outdir):
    path = os.path.join(outdir, RESULTS)
    if not os.path.exists(path):
        return {"steps": [], "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    with open(path) as f:
        return json.load(f)


def save(outdir, record):
    """Writes results.json and summary.md atomically (a reader never sees half a file)."""
    for name, text in ((RESULTS, json.dumps(record, indent=1, sort_keys=True) + "\n"), (SUMMARY, render(record))):
        tmp = os.path.join(outdir, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(outdir, name))


def log_tail(path, lines=LOG_TAIL):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


# --- benchmark analysis ---------------------------------------------------------------------------

def _key(row):
    return (row["group"], tuple(row["shape"]), row["dtype"], row["layout"], row["pass"])


def check_targets(bench):
    """Returns a list of {target, case, value, limit, met}: one per comparison the targets make."""
    checks = []
    rows = bench.get("rows", [])
    by_key = {}
    for r in rows:
        by_key.setdefault(_key(r), {})[r["impl"]] = r
    copy = bench.get("copy_gbps")
    for key, impls in sorted(by_key.items()):
        group, shape, dtype, layout, pas = key
        case = f"{group} {'x'.join(map(str, shape))} {dtype} {layout} {pas}"
        ours, eager = impls.get("bnext"), impls.get("torch")
        if ours is None or eager is None:
            continue
        if group == "bn" and pas == "fwd+bwd":
            ratio = ours["ms"] / eager["ms"]
            checks.append({"target": "BN fwd+bwd time vs torch", "case": case, "value": round(ratio, 3),
                           "limit": f"<= {BN_RATIO_MAX}", "met": ratio <= BN_RATIO_MAX})
            if copy:
                frac = ours["gbps"] / copy
                checks.append({"target": "BN fwd+bwd bandwidth vs copy", "case": case, "value": round(frac, 3),
                               "limit": f">= {BN_COPY_FRACTION_MIN}", "met": frac >= BN_COPY_FRACTION_MIN})
        elif group in ("noisy_bn", "lp_norm"):
            speedup = eager["ms"] / ours["ms"]
            checks.append({"target": f"{group} speedup vs eager composition", "case": case,
                           "value": round(speedup, 2), "limit": f">= {VARIANT_SPEEDUP_MIN}",
                           "met": speedup >= VARIANT_SPEEDUP_MIN})
    probe = bench.get("line_probe")
    if probe:
        speedup = probe["sequential_ms"] / probe["batched_ms"]
        checks.append({"target": "line probe batched vs sequential", "case": probe.get("case", ""),
                       "value": round(speedup, 2), "limit": f">= {LINE_PROBE_SPEEDUP_MIN}",
                       "met": speedup >= LINE_PROBE_SPEEDUP_MIN})
    return checks


# --- rendering ------------------------------------------------------------------------------------

def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def render(record):
    lines = ["# bnext GPU check", ""]
    m = record.get("machine", {})
    lines.append(f"- GPU: {m.get('gpu', 'unknown')}; torch: {m.get('torch', 'unknown')}; "
                 f"started {record.get('started', '?')}")
    if record.get("no_gpu"):
        lines += [f"- **no GPU**: {record['no_gpu']}; nothing was built or run", ""]
        return "\n".join(lines) + "\n"
    if record.get("dry_run"):
        lines.append(f"- **dry run without a GPU** ({record['dry_run']}): the CUDA tests were collected and "
                     "skipped, the benchmarks ran on the CPU at small sizes; nothing here measures a GPU")
    verdict = record.get("verdict", "running (or cut off)")
    lines += [f"- verdict: **{verdict}**", ""]
    steps = record.get("steps", [])
    if steps:
        lines += ["## Steps", "", _table(["step", "status", "seconds", "note"],
                                          [[s["name"], s["status"], s["seconds"], s.get("note", "")] for s in steps]), ""]
        for s in steps:
            if s["status"] != "passed" and s.get("tail"):
                lines += [f"### {s['name']}: last lines of {os.path.basename(s.get('log', ''))}", "", "```",
                          s["tail"].rstrip(), "```", ""]
    bench = record.get("bench")
    if bench:
        lines += ["## Benchmarks", "", f"device-to-device copy: {bench.get('copy_gbps', 0):.0f} GB/s "
                  "(read + write counted)", ""]
        if not bench.get("complete", True):
            lines += ["**incomplete**: the benchmark run was cut off; these are the cases it finished", ""]
        rows = [[r["group"], "x".join(map(str, r["shape"])), r["dtype"], r["layout"], r["pass"], r["impl"],
                 f"{r['ms']:.4f}", f"{r.get('gbps', 0):.0f}"] for r in bench.get("rows", [])]
        if rows:
            lines += [_table(["op", "shape", "dtype", "layout", "pass", "impl", "ms", "GB/s"], rows), ""]
        for name in ("training_step", "line_probe", "grad_stats"):
            if bench.get(name):
                lines.append(f"- {name}: " + ", ".join(f"{k} = {v}" for k, v in sorted(bench[name].items())))
        for err in bench.get("errors", []):
            lines.append(f"- benchmark error: {err}")
        lines.append("")
    checks = record.get("targets")
    if checks:
        met = sum(c["met"] for c in checks)
        lines += [f"## Targets: {met} of {len(checks)} met", "",
                  _table(["target", "case", "value", "limit", "met"],
                         [[c["target"], c["case"], c["value"], c["limit"], "yes" if c["met"] else "**no**"]
                          for c in checks]), ""]
    return "\n".join(lines) + "\n"


# --- commands -------------------------------------------------------------------------------------

def cmd_init(outdir, args):
    record = {"steps": [], "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "machine": machine_facts()}
    if args[:1] == ["--no-gpu"]:
        record["no_gpu"] = " ".join(args[1:]) or "no GPU"
        record["verdict"] = "no GPU"
    elif args[:1] == ["--dry-run"]:
        record["dry_run"] = " ".join(args[1:]) or "no GPU"
    elif args:
        raise SystemExit(f"gpu_report: init takes no arguments but --no-gpu REASON or --dry-run REASON, got {args}")
    save(outdir, record)


def cmd_step(outdir, args):
    if len(args) not in (4, 5):
        raise SystemExit("gpu_report: step NAME STATUS SECONDS LOG [NOTE]")
    name, status, seconds, log = args[:4]
    if status not in ("passed", "failed", "timeout", "skipped"):
        raise SystemExit(f"gpu_report: STATUS must be passed, failed, timeout or skipped, got {status!r}")
    record = load(outdir)
    step = {"name": name, "status": status, "seconds": int(seconds), "log": log,
            "note": args[4] if len(args) == 5 else ""}
    if status != "passed":
        step["tail"] = log_tail(log)
    record["steps"].append(step)
    save(outdir, record)


def cmd_finish(outdir, args):
    if args:
        raise SystemExit(f"gpu_report: finish takes no arguments, got {args}")
    record = load(outdir)
    path = os.path.join(outdir, BENCH)
    if os.path.exists(path):
        with open(path) as f:
            record["bench"] = json.load(f)
        record["targets"] = check_targets(record["bench"])
    failed = [s["name"] for s in record["steps"] if s["status"] != "passed"]
    record["verdict"] = ("dry run: " if record.get("dry_run") else "") + (
        "all steps passed" if not failed else "FAILED: " + ", ".join(failed))
    record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    save(outdir, record)


def main(argv):
    if len(argv) < 2 or argv[1] not in ("init", "step", "finish"):
        raise SystemExit(__doc__)
    outdir, command, args = argv[0], argv[1], argv[2:]
    if not os.path.isdir(outdir):
        raise SystemExit(f"gpu_report: OUTDIR {outdir!r} is not a directory")
    {"init": cmd_init, "step": cmd_step, "finish": cmd_finish}[command](outdir, args)


if __name__ == "__main__":
    main(sys.argv[1:])
