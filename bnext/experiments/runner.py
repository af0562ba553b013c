"""The grid driver shared by vgg.py and dln.py: check the data, set up the process, run this rank's share
of the grid with train.run_one (resuming what was interrupted, skipping what is finished), then on rank 0
write summary.json, the figures and report.md, and print the summary table.
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

from . import analysis, common, train
from .common import Dist, RunSpec
from .config import parse_config
from .report import ReportContext

# Options that may change between invocations on the same --out: they select runs or the machine, not
# what a run computes.
FREE_KEYS = {"procs", "preset", "norms", "lrs", "seeds", "ics_lrs", "ics_norms", "out", "device", "threads", "progress",
             "tune_allocator", "lr_sweep", "sweep_lrs", "download", "data_dir"}


@dataclasses.dataclass
class Experiment:
    """What an experiment module hands to `execute`."""
    name: str                                   # "vgg" or "dln"
    cfg: Any                                    # its config (a config.BaseConfig)
    make_task: Callable                         # (cfg, device) -> task (train.Task) with .data_source
    specs: Callable                             # cfg -> list[RunSpec]
    report: Callable                            # (report context) -> (claims, figures, text)
    argv: List[str]
    columns: Optional[list] = None              # run-table columns (report.RUN_COLUMNS by default)
    check: Optional[Callable] = None            # cfg -> None, raises DataError: run before any worker starts


class Progress:
    """What a person watching sees of the runs. On a terminal: tqdm bars (grid and current run). Elsewhere
    (a log file, CI), where tqdm would write a control-character line per step: one plain line when a run
    starts and when it ends and, with --progress, a line at each quarter of its steps."""

    def __init__(self, enabled: bool, rank: int, world: int, total: int, stream=None):
        self.stream = stream or sys.stdout
        self.prefix = f"[rank {rank}] " if world > 1 else ""
        self.total, self.done, self.enabled = total, 0, enabled
        self.lines = not self.stream.isatty()
        self.grid_bar = self.run_bar = None
        if enabled and not self.lines:
            from tqdm.auto import tqdm
            self.grid_bar = tqdm(desc=self.prefix + "grid", unit="run", total=total, position=2 * rank,
                                 leave=True, dynamic_ncols=True)
            self.run_bar = tqdm(desc=self.prefix + "run", unit="step", position=2 * rank + 1, leave=False,
                                dynamic_ncols=True)

    def _say(self, text: str) -> None:
        print(f"{self.prefix}[{self.done + 1}/{self.total}] {self.run_id}: {text}", file=self.stream, flush=True)

    def start_run(self, spec: RunSpec, step: int) -> None:
        self.run_id, self.steps, self.t0, self.step0 = spec.run_id, spec.steps, time.perf_counter(), step
        self.marks = {spec.steps * q // 4 for q in (1, 2, 3)} - {0}
        if self.run_bar is not None:
            self.run_bar.reset(total=spec.steps)
            self.run_bar.update(step)
            self.run_bar.set_description(spec.run_id)
        elif self.lines:
            self._say(f"start at step {step} of {spec.steps} (resumed)" if step else f"start ({spec.steps} steps)")

    def skip_run(self, spec: RunSpec) -> None:
        self.run_id = spec.run_id
        if self.lines:
            self._say("finished earlier (summary.json present): skipped")

    def step(self, step: int, loss: float) -> None:
        if self.run_bar is not None:
            self.run_bar.update(1)
            self.run_bar.set_postfix(loss=f"{loss:.3g}", refresh=False)
        elif self.lines and self.enabled and step in self.marks:
            rate = (step - self.step0) / max(time.perf_counter() - self.t0, 1e-9)
            self._say(f"step {step}/{self.steps}, loss {loss:.4g}, {rate:.3g} steps/s")

    def end_run(self, summary: Dict[str, Any]) -> None:
        if not self.lines:
            return
        if summary.get("diverged"):
            what = f"diverged at step {summary.get('diverged_step')}"
        else:
            what = f"final loss {_num(summary.get('final_loss'))} (initial {_num(summary.get('initial_loss'))})"
            if summary.get("test_acc") is not None:
                what += f", test accuracy {summary['test_acc']:.3f}"
        self._say(f"done in {time.perf_counter() - self.t0:.0f} s: {what}")

    def next_run(self) -> None:
        self.done += 1
        if self.grid_bar is not None:
            self.grid_bar.update(1)

    def close(self) -> None:
        for bar in (self.run_bar, self.grid_bar):
            if bar is not None:
                bar.close()


def _num(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def user_error(e: Exception) -> int:
    """A problem the user can fix (missing or corrupt data, an unsafe pickle): one line, exit status 2."""
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2


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


def command(name: str, cls, presets, doc: str, argv: Optional[List[str]], make_task: Callable, specs: Callable,
            report: Callable, **extra) -> int:
    """``python -m bnext.experiments.<name>``: argv (sys.argv[1:] when None) -> config of class cls (the
    description: doc's first paragraph) -> execute(Experiment(...)); extra: Experiment's optional fields."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(cls, presets, argv, f"python -m bnext.experiments.{name}", doc.split("\n\n")[0])
    return execute(Experiment(name, cfg, make_task, specs, report, list(argv), **extra))


def execute(exp: Experiment) -> int:
    """Runs the experiment; returns the process exit code (2: a user error, reported in one line).
    With --procs N > 1 outside torchrun, checks the data, then relaunches itself under torchrun with N
    local processes (the grid's runs are shared out among them)."""
    from bnext.data import DataError
    cfg = exp.cfg
    try:
        if exp.check is not None and "WORLD_SIZE" not in os.environ:
            exp.check(cfg)  # a data problem is one line here, not one traceback per worker
    except DataError as e:
        return user_error(e)
    if cfg.procs > 1 and "WORLD_SIZE" not in os.environ:
        import subprocess
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.procs}",
               "-m", f"bnext.experiments.{exp.name}"] + list(exp.argv)
        # torchrun prints a four-line OMP_NUM_THREADS banner unless the variable is set; set it to the threads
        # each process takes anyway (common.setup_cpu), so that the output starts with the data line
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(cfg.threads or max(1, (os.cpu_count() or 1) // cfg.procs)))
        return subprocess.call(cmd, env=env)
    dist = common.init_distributed(cfg.device)
    try:
        return _execute(exp, dist)
    except DataError as e:  # launched by torchrun directly: every rank says it, in one line each
        return user_error(e)
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
    task = exp.make_task(cfg, device)
    if cfg.data_parallel:  # every run on all ranks together: DDP + synchronized normalization
        from . import data_parallel as dp
        task = dp.DataParallelTask(task, device)
        say(f"data-parallel: each run on {dist.world} processes; {dp.MEASURED}")
    say(f"data: {common.describe_data(task.data_source)}")
    say(f"device: {device} ({env['device_name']}), bnext {env['bnext']} {env['bnext_kernels_ran']} kernels, "
        f"torch {env['torch']}, {cpu['threads']} threads, allocator tuned: {cpu['allocator_tuned']}"
        + (f", {dist.world} processes" if dist.world > 1 else ""))
    specs: List[RunSpec] = exp.specs(cfg)
    if dist.main:
        common.atomic_write_json(out / "config.json", {"config": cfg_dict, "command": _command(exp),
                                                      "environment": env, "data_source": task.data_source,
                                                      "runs": [s.run_id for s in specs]})
    mine = specs if cfg.data_parallel else assign(specs, dist.world)[dist.rank]
    progress = Progress(cfg.progress, dist.rank, dist.world, len(mine))
    failed = {}
    try:
        for spec in mine:
            run_dir = dp.run_dir(out, spec.run_id, dist.rank) if cfg.data_parallel else out / "runs" / spec.run_id
            try:
                train.run_one(cfg, spec, run_dir, task, device, progress)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # a broken run is reported, the grid goes on
                failed[spec.run_id] = f"{type(e).__name__}: {e}"
                common.atomic_write_text(run_dir / "error.txt", traceback.format_exc())
                say(f"ERROR in run {spec.run_id}: {type(e).__name__}: {e} (traceback in {run_dir / 'error.txt'})")
            progress.next_run()
    finally:
        progress.close()
    common.barrier(dist)
    if not dist.main:
        return 0
    # ---- rank 0: everything on disk -> summary.json, figures, report.md
    summaries, records = [], {}
    for spec in specs:
        d = out / "runs" / spec.run_id
        if (d / "summary.json").exists():
            with open(d / "summary.json") as f:
                summaries.append(json.load(f))
            records.setdefault((spec.group, spec.norm, float(spec.lr)), []).append(common.read_jsonl(d / "metrics.jsonl"))
        elif spec.run_id not in failed:
            err = d / "error.txt"
            failed[spec.run_id] = ("failed on another rank: " + err.read_text().strip().splitlines()[-1]
                                   if err.exists() else "did not finish")
    grid = analysis.Grid(summaries, {})
    sps = sorted(s["steps_per_s"] for s in summaries if s.get("steps_per_s"))
    spm = sorted(s["steps_per_s_with_measurement"] for s in summaries
                 if s.get("steps_per_s_with_measurement") and s["spec"]["measure"])
    timing = {"wall_s": time.perf_counter() - t_start,
              "runs_cpu_s": (sum(s["cpu_s"] for s in summaries)
                             if summaries and all(s.get("cpu_s") is not None for s in summaries) else None),
              "runs_wall_s": sum(s.get("wall_s") or 0.0 for s in summaries),
              "steps_per_s": sps[len(sps) // 2] if sps else None,
              "steps_per_s_measured": spm[len(spm) // 2] if spm else None}
    ctx = ReportContext(cfg=cfg, out=out, grid=grid, records=records, summaries=summaries, missing={}, failed=failed,
                        env=env, data_source=task.data_source, timing=timing, command=_command(exp))
    claims, figures, _ = exp.report(ctx)
    common.atomic_write_json(out / "summary.json", {
        "config": cfg_dict, "environment": env, "data_source": task.data_source, "timing": timing,
        "failed_runs": failed, "claims": [dataclasses.asdict(c) for c in claims], "runs": summaries})
    from .report import RUN_COLUMNS, run_rows
    cols = (exp.columns or RUN_COLUMNS)[:10]
    print()
    print(common.format_table([h for h, _ in cols], run_rows(summaries, cols)))
    print()
    print(common.format_table(["claim", "verdict", "measured"],
                              [[c.id, c.verdict, c.measured[:150] + ("..." if len(c.measured) > 150 else "")]
                               for c in claims]))
    print(f"\nreport: {out / 'report.md'} ({len(figures)} figures); data: {common.describe_data(task.data_source)}")
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
