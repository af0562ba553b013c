"""Runs the shape sweep, the per-call overhead and the VGG step benchmarks at each thread count and
writes their markdown tables (the ones in benchmarks/README.md), one command:

    python benchmarks/make_tables.py --threads 1 2 --out sweep_tables.md [--json-dir DIR] [--quick]

Each thread count is one pytest process (BNEXT_BENCH_THREADS=n pytest benchmarks/bench_sweep.py
benchmarks/bench_vgg_step.py --benchmark-only --benchmark-json DIR/threads_n.json). --quick sets
BNEXT_SWEEP_QUICK=1 and BNEXT_VGG_WIDTHS=0.125. --from-json skips the runs and only formats
existing JSON files. Machine, torch version, load average at start and end go in the header.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def run(threads, json_path, quick, extra):
    env = dict(os.environ, BNEXT_BENCH_THREADS=str(threads))
    if quick:
        env.update(BNEXT_SWEEP_QUICK="1", BNEXT_VGG_WIDTHS="0.125")
    cmd = [sys.executable, "-m", "pytest", os.path.join(HERE, "bench_sweep.py"), os.path.join(HERE, "bench_vgg_step.py"),
           "--benchmark-only", f"--benchmark-json={json_path}", "-q", "-p", "no:cacheprovider"] + extra
    print(f"[make_tables] {threads} thread(s): {' '.join(cmd)}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, env=env, check=True, cwd=os.path.dirname(HERE))
    print(f"[make_tables] {threads} thread(s) done in {time.time() - t0:.0f} s", flush=True)


def header(paths):
    lines = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        b = data.get("machine_info", {}).get("bnext", {})
        load = b.get("loadavg") or {}
        commit = data.get("commit_info", {})
        lines.append(f"- `{os.path.basename(path)}`: {b.get('cpu_model', '?')}, {b.get('logical_cpus', '?')} logical "
                     f"CPUs, {b.get('torch_threads', '?')} torch threads, torch {b.get('torch_version', '?')}, "
                     f"allocator {'tuned' if b.get('allocator_tuned') else 'default'}, {data.get('datetime', '?')}, "
                     f"commit {commit.get('id', '?')[:10]}{' (dirty)' if commit.get('dirty') else ''}, "
                     f"1-minute load average {load.get('start', float('nan')):.1f} at start, "
                     f"{load.get('end', float('nan')):.1f} at end")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default="sweep_tables.md")
    ap.add_argument("--json-dir", default=".")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--from-json", nargs="+", help="format these JSON files instead of running")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args()
    if args.from_json:
        paths = args.from_json
    else:
        os.makedirs(args.json_dir, exist_ok=True)
        paths = []
        for t in args.threads:
            path = os.path.join(args.json_dir, f"threads_{t}.json")
            run(t, path, args.quick, args.pytest_args)
            paths.append(path)
    import bench_sweep
    import bench_vgg_step
    text = "\n".join(["Runs:", "", header(paths), "", bench_sweep.report(paths), "",
                      "### VGG end to end", "", bench_vgg_step.tables(bench_vgg_step.load(paths))])
    with open(args.out, "w") as f:
        f.write(text + "\n")
    print(f"[make_tables] wrote {args.out}")


if __name__ == "__main__":
    main()
