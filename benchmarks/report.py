"""Markdown table from a pytest-benchmark JSON file written by bench_batch_norm.py.

    pytest benchmarks --benchmark-only --benchmark-json run.json
    python benchmarks/report.py run.json [more.json ...]

One row per (device, op, shape, layout): median time of each implementation, bnext's speedup over
eager and over torch.compile, bnext's GB/s (bytes counted / median) and that as a fraction of the
copy bandwidth measured in the same process right after the row's benchmarks, and whether BatchNorm's
targets are met (TARGET_SPEEDUP, TARGET_FRACTION; forward+backward rows only: speedup over eager >= 2.5
on NCHW, >= 1.4 on channels_last, and >= 80% of copy bandwidth).
"""
import argparse
import json
import statistics
import sys
from collections import OrderedDict

TARGET_SPEEDUP = {"nchw": 2.5, "channels_last": 1.4}
TARGET_FRACTION = 0.8


def load_rows(path):
    with open(path) as f:
        data = json.load(f)
    rows = OrderedDict()
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if info.get("bench") != "batch_norm":  # rows of bench_batch_norm.py only
            continue
        key = (info["device"], info["op"], "x".join(map(str, info["shape"])), info["layout"])
        row = rows.setdefault(key, {"copy": [], "bytes": info["bytes"]})
        row[info["impl"]] = bench["stats"]["median"]
        row["copy"].append(info["copy_gbps"])
    return data, rows


def fmt_ms(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def machine_lines(data):
    m = data.get("machine_info", {})
    b = m.get("bnext", {})
    lines = [
        f"- CPU: {b.get('cpu_model', m.get('processor', '?'))}, {b.get('logical_cpus', '?')} logical CPUs, "
        f"{b.get('torch_threads', '?')} torch threads",
        f"- torch {b.get('torch_version', '?')} (CPU capability {b.get('torch_cpu_capability', '?')}), "
        f"allocator {'tuned (bnext.tune_cpu_allocator())' if b.get('allocator_tuned') else 'default'}",
        f"- date {data.get('datetime', '?')}, commit {data.get('commit_info', {}).get('id', '?')[:10]}"
        f"{' (dirty)' if data.get('commit_info', {}).get('dirty') else ''}",
    ]
    load = b.get("loadavg") or {}
    if load.get("start") is not None:
        lines.append(f"- 1-minute load average at start / end of the run: {load['start']:.1f} / {load['end']:.1f} "
                     f"(other processes share the {b.get('logical_cpus', '?')} CPUs)")
    for where, gbps in b.get("copy_gbps", {}).items():
        lines.append(f"- copy bandwidth (`dst.copy_(src)`, {where}), first measurement: {gbps:.1f} GB/s; "
                     "the table uses the mean of those taken right after each row's benchmarks")
    if b.get("cuda_device"):
        lines.append(f"- CUDA device: {b['cuda_device']}")
    return lines


def table(rows):
    spread = any(r.get("spread") for r in rows.values())
    out = ["| device | op | shape | layout | bnext ms | eager ms | compile ms | vs eager "
           + ("| vs eager, range over runs " if spread else "")
           + "| vs compile | bnext GB/s | copy GB/s | of copy | target |",
           "|---|---|---|---|---:|---:|---:|---:|" + ("---:|" if spread else "") + "---:|---:|---:|---:|---|"]
    for (device, op, shape, layout), r in rows.items():
        ours, eager, comp = r.get("bnext"), r.get("eager"), r.get("compile")
        vs_eager = eager / ours if ours and eager else None
        vs_comp = comp / ours if ours and comp else None
        gbps = r["bytes"] / ours / 1e9 if ours else None
        copy = sum(r["copy"]) / len(r["copy"])  # measured after each implementation's benchmark
        frac = gbps / copy if gbps else None
        target = ""
        if op != "fwd" and device == "cpu" and vs_eager is not None:
            need = TARGET_SPEEDUP[layout]
            ok_speed, ok_bw = vs_eager >= need, frac >= TARGET_FRACTION
            target = ("met" if ok_speed and ok_bw else "NOT met") + \
                f" ({'>=' if ok_speed else '<'}{need}x, {'>=' if ok_bw else '<'}80%)"
        rng = r.get("spread")
        out.append("| " + " | ".join([
            device, op, shape, layout, fmt_ms(ours), fmt_ms(eager), fmt_ms(comp),
            "-" if vs_eager is None else f"{vs_eager:.2f}x"]
            + ([f"{rng[0]:.2f}-{rng[1]:.2f}x" if rng else "-"] if spread else [])
            + ["-" if vs_comp is None else f"{vs_comp:.2f}x",
            "-" if gbps is None else f"{gbps:.1f}", f"{copy:.1f}", "-" if frac is None else f"{frac:.0%}",
            target]) + " |")
    return out


def combine(runs):
    """Rows of several runs merged: per implementation the median over runs of the per-run medians,
    copy bandwidth likewise; also the range over runs of bnext's speedup over eager ("spread")."""
    merged = OrderedDict()
    for rows in runs:
        for key, r in rows.items():
            m = merged.setdefault(key, {"bytes": r["bytes"], "copy": [], "runs": []})
            m["copy"].append(sum(r["copy"]) / len(r["copy"]))
            m["runs"].append(r)
    out = OrderedDict()
    for key, m in merged.items():
        row = {"bytes": m["bytes"], "copy": [statistics.median(m["copy"])]}
        for impl in ("bnext", "eager", "compile"):
            vals = [r[impl] for r in m["runs"] if impl in r]
            if vals:
                row[impl] = statistics.median(vals)
        ratios = [r["eager"] / r["bnext"] for r in m["runs"] if "eager" in r and "bnext" in r]
        row["spread"] = (min(ratios), max(ratios)) if ratios else None
        out[key] = row
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON files (--benchmark-json)")
    parser.add_argument("--combine", action="store_true",
                        help="one table for all files: medians over the runs, and the range of the speedup")
    args = parser.parse_args(argv)
    if args.combine:
        loaded = [load_rows(path) for path in args.json]
        print(f"### {len(loaded)} runs: {', '.join(args.json)}\n")
        for path, (data, _) in zip(args.json, loaded):
            print(f"{path}:\n" + "\n".join(machine_lines(data)) + "\n")
        print("\n".join(table(combine([rows for _, rows in loaded]))) + "\n")
        return
    for path in args.json:
        data, rows = load_rows(path)
        print(f"### {path}\n")
        print("\n".join(machine_lines(data)) + "\n")
        print("\n".join(table(rows)) + "\n")


if __name__ == "__main__":
    sys.exit(main())
