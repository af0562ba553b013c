"""The grid driver shared by vgg.py and dln.py: set up the process, run this rank's share of the grid
(resuming what was interrupted, skipping what is finished), then on rank 0 write summary.json, the
figures and report.md, and print the summary table.
"""
import dataclasses
import json
import os
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from . import analysis, common
from .common import Dist, RunSpec
from .models import norm_available
from .measure import landscape_available

# Options that may change between invocations on the same --out: they select runs or the machine, not
# what a run computes.
FREE_KEYS = {"procs", "preset", "norms", "lrs", "seeds", "ics_lrs", "ics_norms", "out", "device", "threads", "progress",
             "tune_allocator", "lr_sweep", "sweep_lrs", "download", "data_dir"}


@dataclasses.dataclass
class Experiment:
    """What an experiment module hands to `execute`."""
    name: str                                   # "vgg" or "dln"
    cfg: Any                                    # its config dataclass
    make_task: Callable                         # (cfg, device, say) -> task with .data_source
    specs: Callable                             # cfg -> list[RunSpec]
    report: Callable                            # (ctx dict) -> (claims, figures, text)
    argv: List[str]
    columns: Optional[list] = None              # run-table columns (report.RUN_COLUMNS by default)


def _check_config(out: Path, cfg_dict: Dict[str, Any]) -> None:
    path = out / "config.json"
    if not path.exists():
        return
    with open(path) as f:
        old = json.load(f).get("config", {})
    # options present in both configs (an option added or removed since is a code change, not a config change)
    diff = sorted(k for k in set(old) & set(cfg_dict)
                  if k not in FREE_KEYS and common.clean_json(old[k]) != common.clean_json(cfg_dict[k]))
    if diff:
        raise SystemExit(f"{out} holds runs made with a different configuration (differs in: {', '.join(diff)}). "
                         "Use another --out, or delete that directory to start over.")


def _bars(enabled: bool, rank: int):
    if not enabled:
        return None, None
    from tqdm.auto import tqdm
    prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    grid = tqdm(desc=prefix + "grid", unit="run", position=2 * rank, leave=True, dynamic_ncols=True)
    run = tqdm(desc=prefix + "run", unit="step", position=2 * rank + 1, leave=False, dynamic_ncols=True)
    return grid, run


def execute(exp: Experiment) -> int:
    """Runs the experiment; returns the process exit code. With --procs N > 1 outside torchrun, relaunches
    itself under torchrun with N local processes (the grid's runs are shared out among them)."""
    cfg = exp.cfg
    procs = getattr(cfg, "procs", 1)
    if procs > 1 and "WORLD_SIZE" not in os.environ:
        import subprocess
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               "-m", f"bnext.experiments.{exp.name}"] + list(exp.argv)
        print(f"launching {procs} processes: {' '.join(cmd[1:])}", flush=True)
        return subprocess.call(cmd)
    dist = common.init_distributed(cfg.device)
    try:
        return _execute(exp, dist)
    except KeyboardInterrupt:
        print("\ninterrupted: finished runs and the last checkpoint of the current run are kept; "
              "rerun the same command to continue.", file=sys.stderr)
        return 130
    finally:
        common.finish_distributed(dist)


def _execute(exp: Experiment, dist: Dist) -> int:
    cfg = exp.cfg
    out = Path(cfg.out)
    device = common.pick_device(cfg.device, dist)
    cpu = common.setup_cpu(cfg.threads, cfg.tune_allocator and device.type == "cpu", dist)
    env = common.environment(device, cpu)
    env["world"] = dist.world
    say = (print if dist.main else (lambda *a, **k: None))
    cfg_dict = dataclasses.asdict(cfg)
    _check_config(out, cfg_dict)  # every rank: a refusal ends all of them with the same message
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    common.barrier(dist)

    t_start = time.perf_counter()
    task = exp.make_task(cfg, device, say)
    data_parallel = getattr(cfg, "data_parallel", False)
    if data_parallel:  # every run on all ranks together: DDP + synchronized normalization
        from . import data_parallel as dp
        task = dp.DataParallelTask(task, device)
        say(f"data-parallel: each run on {dist.world} processes; {dp.MEASURED}")
    say(f"data: {task.data_source}")
    say(f"device: {device} ({env['device_name']}), bnext {env['bnext']} {env['bnext_kernels_ran']} kernels, "
        f"torch {env['torch']}, {cpu['threads']} threads, allocator tuned: {cpu['allocator_tuned']}"
        + (f", {dist.world} processes" if dist.world > 1 else ""))
    ok, why = landscape_available()
    if not ok:
        say(f"WARNING: {why}; ICS, line probes, curvature and Theorem 4.1 will be recorded as missing.")
    specs: List[RunSpec] = exp.specs(cfg)
    missing = {}
    for norm in dict.fromkeys(s.norm for s in specs):
        avail, reason = norm_available(norm)
        if not avail:
            missing[norm] = reason
            say(f"WARNING: normalization {norm!r} is not available in this bnext build ({reason}); its runs are skipped.")
    runnable = [s for s in specs if s.norm not in missing]
    if dist.main:
        common.atomic_write_json(out / "config.json", {"config": cfg_dict, "command": _command(exp),
                                                      "environment": env, "data_source": task.data_source,
                                                      "runs": [s.run_id for s in specs],
                                                      "missing_norms": missing})
    mine = runnable if data_parallel else assign(runnable, dist.world)[dist.rank]
    grid_bar, run_bar = _bars(cfg.progress, dist.rank)
    if grid_bar is not None:
        grid_bar.reset(total=len(mine))
    failed = {}
    for spec in mine:
        run_dir = dp.run_dir(out, spec.run_id, dist.rank) if data_parallel else out / "runs" / spec.run_id
        try:
            common.train_run(task, spec, run_dir, device=device, measure_every=cfg.measure_every,
                             eval_every=getattr(cfg, "eval_every", 0), checkpoint_every=cfg.checkpoint_every,
                             momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                             bar=run_bar, save_weights=cfg.save_weights,
                             interrupt_at=getattr(cfg, "_interrupt_at", None))
        except KeyboardInterrupt:
            raise
        except Exception as e:  # a broken run is reported, the grid goes on
            failed[spec.run_id] = f"{type(e).__name__}: {e}"
            common.atomic_write_text(run_dir / "error.txt", traceback.format_exc())
            say(f"ERROR in run {spec.run_id}: {type(e).__name__}: {e} (traceback in {run_dir / 'error.txt'})")
        if grid_bar is not None:
            grid_bar.update(1)
    for bar in (run_bar, grid_bar):
        if bar is not None:
            bar.close()
    common.barrier(dist)
    if not dist.main:
        return 0
    # ---- rank 0: everything on disk -> summary.json, figures, report.md
    summaries, records = [], {}
    for spec in runnable:
        d = out / "runs" / spec.run_id
        if (d / "summary.json").exists():
            with open(d / "summary.json") as f:
                summaries.append(json.load(f))
            records.setdefault((spec.group, spec.norm, float(spec.lr)), []).append(common.read_jsonl(d / "metrics.jsonl"))
        elif spec.run_id not in failed:
            err = d / "error.txt"
            failed[spec.run_id] = ("failed on another rank: " + err.read_text().strip().splitlines()[-1]
                                   if err.exists() else "did not finish")
    grid = analysis.Grid(summaries, missing)
    sps = sorted(s["steps_per_s"] for s in summaries if s.get("steps_per_s"))
    spm = sorted(s["steps_per_s_with_measurement"] for s in summaries
                 if s.get("steps_per_s_with_measurement") and s["spec"]["measure"])
    timing = {"wall_s": time.perf_counter() - t_start,
              "runs_cpu_s": (sum(s["cpu_s"] for s in summaries)
                             if summaries and all(s.get("cpu_s") is not None for s in summaries) else None),
              "runs_wall_s": sum(s.get("wall_s") or 0.0 for s in summaries),
              "steps_per_s": sps[len(sps) // 2] if sps else None,
              "steps_per_s_measured": spm[len(spm) // 2] if spm else None}
    ctx = dict(cfg=cfg, out=out, grid=grid, records=records, summaries=summaries, missing=missing, failed=failed,
               env=env, data_source=task.data_source, timing=timing, command=_command(exp))
    claims, figures, _ = exp.report(ctx)
    common.atomic_write_json(out / "summary.json", {
        "config": cfg_dict, "environment": env, "data_source": task.data_source, "timing": timing,
        "missing_norms": missing, "failed_runs": failed,
        "claims": [dataclasses.asdict(c) for c in claims], "runs": summaries})
    from .report import RUN_COLUMNS, run_rows
    cols = (exp.columns or RUN_COLUMNS)[:10]
    print()
    print(common.format_table([h for h, _ in cols], run_rows(summaries, cols)))
    print()
    print(common.format_table(["claim", "verdict", "measured"],
                              [[c.id, c.verdict, c.measured[:150] + ("..." if len(c.measured) > 150 else "")]
                               for c in claims]))
    print(f"\nreport: {out / 'report.md'} ({len(figures)} figures); data: {task.data_source}")
    print(f"total time: {time.perf_counter() - t_start:.0f} s")
    return 1 if failed else 0


def assign(specs: List[RunSpec], world: int) -> List[List[RunSpec]]:
    """Runs per rank, balanced by a rough cost (steps x relative CPU time per step, measured on the quick
    preset: none 1, BN and l_p 1.2, noisy BN 3.8): longest first onto the least loaded rank.
    Deterministic, so every rank computes the same split."""
    rel = {"none": 1.0, "noisy_bn": 3.8}

    def cost(s: RunSpec) -> float:
        return s.steps * rel.get(s.norm, 1.2) * (1.3 if s.measure else 1.0)
    load, out = [0.0] * world, [[] for _ in range(world)]
    for i in sorted(range(len(specs)), key=lambda i: (-cost(specs[i]), i)):
        r = min(range(world), key=lambda k: (load[k], k))
        out[r].append(i)
        load[r] += cost(specs[i])
    return [[specs[i] for i in sorted(idx)] for idx in out]


def _command(exp: Experiment) -> str:
    return " ".join([f"python -m bnext.experiments.{exp.name}"] + [shlex.quote(a) for a in exp.argv])
