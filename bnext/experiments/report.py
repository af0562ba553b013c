"""report.md: setup (data, device, versions), the claims table, the runs, the figures.

`ReportContext` is what the runner hands an experiment's report function once every run is on disk.
`parse_claims(text)` reads the claims table back (used by the tests, usable by anyone)."""
import dataclasses
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .analysis import Claim, Grid, untrained_notes


@dataclasses.dataclass
class ReportContext:
    """Everything a report is computed from, after all runs of an invocation are on disk.

    records: (group, norm, lr) -> one list of metrics.jsonl records per seed (what the figures plot);
    summaries: every finished run's summary.json (what the claims are decided on), in grid order;
    missing: norm -> why it could not run in this build; failed: run_id -> why it failed;
    data_source: the data-source description the task reports: a string, or a dict whose
    "description" is the text and whose optional "statistics" holds the pixel statistics of the data
    (see `data_statistics`)."""
    cfg: Any
    out: Path
    grid: Grid
    records: Dict[Tuple[str, str, float], List[List[dict]]]
    summaries: List[dict]
    env: Dict[str, Any]
    data_source: Any
    timing: Dict[str, Any]
    command: str
    missing: Dict[str, str] = dataclasses.field(default_factory=dict)
    failed: Dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def coerce(cls, ctx) -> "ReportContext":
        """A ReportContext as is, or one built from the keyword dict the runner used to pass."""
        if isinstance(ctx, cls):
            return ctx
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(ctx) - names)
        if unknown:
            raise TypeError(f"ReportContext: unknown field(s) {unknown}")
        return cls(**ctx)

    def __getitem__(self, key: str):
        # the report functions were written against a dict: ctx["cfg"] keeps working while they move over
        if key not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    @property
    def data_text(self) -> str:
        d = self.data_source
        if isinstance(d, dict):
            return str(d.get("description") or d.get("source") or {k: v for k, v in d.items() if k != "statistics"})
        return str(d)

    @property
    def data_statistics(self) -> Optional[Dict[str, Any]]:
        d = self.data_source
        st = d.get("statistics") if isinstance(d, dict) else None
        return st if isinstance(st, dict) else None

CLAIMS_HEADER = "| # | claim | rule | measured | verdict |"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}"
    return str(v)


def claims_markdown(claims: Sequence[Claim]) -> str:
    lines = [CLAIMS_HEADER, "|---|---|---|---|---|"]
    for c in claims:
        lines.append("| " + " | ".join(_cell(x) for x in (c.id, c.claim, c.rule, c.measured, f"**{c.verdict}**")) + " |")
    return "\n".join(lines)


def parse_claims(text: str) -> List[Dict[str, str]]:
    """The claims table of a report.md as a list of {id, claim, rule, measured, verdict}."""
    rows, inside = [], False
    for line in text.splitlines():
        if line.strip() == CLAIMS_HEADER:
            inside = True
            continue
        if inside:
            if not line.startswith("|"):
                break
            if line.startswith("|---"):
                continue
            cells = [c.strip().replace("\\|", "|") for c in _split_row(line)]
            rows.append(dict(zip(("id", "claim", "rule", "measured", "verdict"), cells[:4] + [cells[4].strip("*")])))
    return rows


def _split_row(line: str) -> List[str]:
    body = line.strip()[1:-1]
    cells, cur, i = [], "", 0
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body) and body[i + 1] == "|":
            cur += "\\|"
            i += 2
            continue
        if body[i] == "|":
            cells.append(cur)
            cur = ""
        else:
            cur += body[i]
        i += 1
    cells.append(cur)
    return cells


RUN_COLUMNS = [("run", "run_id"), ("steps", "steps_done"), ("diverged at", "diverged_step"),
               ("initial loss", "initial_loss"), ("final loss", "final_loss"), ("trained", "trained"),
               ("final train acc", "final_acc"), ("test acc", "test_acc"),
               ("ICS cos (#2..)", "ics_cosine"), ("loss range", "loss_range"), ("max ||dg||", "grad_pred_top"),
               ("max ||dg||/||g||", "grad_pred_rel"), ("beta", "beta"), ("probe drift", "drift_probe"),
               ("drift floor", "drift_floor"),
               ("pooled |kurtosis|", "kurtosis_pooled"), ("steps/s", "steps_per_s"),
               ("steps/s (measured)", "steps_per_s_with_measurement")]


def statistics_line(stats: Optional[Dict[str, Any]]) -> Optional[str]:
    """The data's pixel statistics in one line (None when the data source did not record them)."""
    if not isinstance(stats, dict) or not stats:
        return None
    parts = []
    for key, label in (("neighbour_correlation", "neighbouring-pixel correlation"),
                       ("difference_kurtosis", "excess kurtosis of neighbouring-pixel differences")):
        if key in stats:
            parts.append(f"{label} {_fmt(stats[key], 3)}")
    for key, label in (("channel_mean", "per-channel mean"), ("channel_std", "per-channel std")):
        v = stats.get(key)
        if isinstance(v, (list, tuple)):
            parts.append(f"{label} [" + ", ".join(_fmt(x, 3) for x in v) + "]")
    known = {"neighbour_correlation", "difference_kurtosis", "channel_mean", "channel_std"}
    parts += [f"{k} {_fmt(v, 3)}" for k, v in stats.items() if k not in known and not isinstance(v, (dict, list))]
    return "; ".join(parts) if parts else None


def seeds_line(summaries: List[dict]) -> str:
    """How many seeds the claims average over, and what that means for their margins."""
    seeds = sorted({s["spec"]["seed"] for s in summaries if s["spec"].get("group") == "main"})
    if len(seeds) > 1:
        return (f"{len(seeds)} seeds ({', '.join(map(str, seeds))}): figures show the mean over seeds with a band "
                "from the seed minimum to maximum; margins count only outside the seed-to-seed std.")
    return ("one seed: no seed-to-seed spread is measured, so every comparison that needs a margin is "
            "inconclusive, and the figures have no seed band.")


def run_rows(summaries: List[dict], columns=RUN_COLUMNS) -> List[List[Any]]:
    return [[s.get(key) for _, key in columns] for s in summaries]


def write_report(path: Path, *, title: str, command: str, env: Dict[str, Any], data_source: Any,
                 settings: Dict[str, Any], claims: Sequence[Claim], summaries: List[dict],
                 missing: Dict[str, str], failed: Dict[str, str], figures: List[tuple], timing: Dict[str, Any],
                 notes: Optional[List[str]] = None, columns=RUN_COLUMNS,
                 statistics: Optional[Dict[str, Any]] = None, rule_notes: Optional[List[str]] = None) -> str:
    """report.md. data_source: a string, or a dict with "description" and optional "statistics" (the pixel
    statistics of the data, printed when present; `statistics` overrides them). rule_notes: where a rule
    goes beyond PROTOCOL.md's defaults and why (analysis.RULE_NOTES by default)."""
    from .analysis import RULE_NOTES
    from .common import atomic_write_text
    if isinstance(data_source, dict):
        ds = ReportContext(None, Path("."), None, {}, [], {}, data_source, {}, "")
        data_text, statistics = ds.data_text, statistics if statistics is not None else ds.data_statistics
    else:
        data_text = str(data_source)
    stats_text = statistics_line(statistics)
    L = [f"# {title}", "", f"Command: `{command}`", ""]
    L += ["## Setup", "",
          f"- **Data:** {data_text}"]
    if stats_text:  # a data source that records no statistics (or puts them in its text) gets no line
        L.append(f"- **Data statistics:** {stats_text}")
    L += [f"- **Seeds:** {seeds_line(summaries)}",
          f"- **Device:** {env.get('device')} ({env.get('device_name')}); bnext kernels that ran: "
          f"**{env.get('bnext_kernels_ran')}**; CUDA kernels built into this bnext: "
          f"{_fmt(env.get('bnext_cuda_kernels_built'))}",
          f"- **Versions:** torch {env.get('torch')}, bnext {env.get('bnext')}, Python {env.get('python')}",
          f"- **CPU:** {env.get('threads')} threads per process, glibc allocator tuned: "
          f"{_fmt(env.get('allocator_tuned'))}; processes: {env.get('world', 1)}",
          "- **Settings:** " + ", ".join(f"{k}={_fmt(v)}" for k, v in settings.items()),
          f"- **Time:** {timing.get('wall_s', 0):.0f} s from start to report in this invocation "
          f"(runs finished by an earlier invocation are not redone); median steps/s without measurement "
          f"{_fmt(timing.get('steps_per_s'))}, with measurement {_fmt(timing.get('steps_per_s_measured'))}; "
          f"the runs' own time, summed over runs: {timing.get('runs_wall_s', 0):.0f} s wall, "
          + (f"{timing['runs_cpu_s']:.0f} s process CPU" if timing.get("runs_cpu_s") is not None
             else "process CPU not recorded by these runs"), ""]
    if missing or failed:
        L += ["## Runs not performed", ""]
        for norm, why in missing.items():
            L.append(f"- `{norm}`: not available in this bnext build ({why}); its runs are missing and the claims "
                     "that need them are inconclusive.")
        for run, why in failed.items():
            L.append(f"- `{run}`: failed: {why}")
        L.append("")
    L += ["## Claims", "",
          "Verdicts are computed from the runs below by the rules of bnext/experiments/PROTOCOL.md, each printed "
          "next to its verdict (final figures: mean over the last 10% of steps; landscape figures: median over "
          "measurement points; mean over seeds, +- the seed std). A comparison with a network that did not train "
          "is inconclusive, whatever its numbers.", "",
          claims_markdown(claims), ""]
    rn = RULE_NOTES if rule_notes is None else rule_notes
    if rn:
        L += ["### Rules beyond the protocol's defaults", ""] + [f"- {n}" for n in rn] + [""]
    if notes:
        L += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    L += ["## Runs", "", "| " + " | ".join(_cell(h) for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in run_rows(summaries, columns):
        L.append("| " + " | ".join(_cell(_fmt(v)) for v in row) + " |")
    L += ["", "## Figures", ""]
    for fig_path, caption in figures:
        L += [f"### {caption}", "", f"![{caption}]({Path(fig_path).name})", ""]
    text = "\n".join(L)
    atomic_write_text(path, text)
    return text


def write_experiment_report(ctx: ReportContext, *, title: str, settings: Sequence[str], claims: Sequence[Claim],
                            figures: List[tuple], notes: List[str], probes: str, columns=RUN_COLUMNS) -> str:
    """report.md in ctx.out for the experiment whose report context is ctx: settings names the config fields
    to print; notes follow those on runs that did not train and precede the line on the line probes' step
    sizes, which `probes` completes (how the probes ran)."""
    cfg = ctx["cfg"]
    steps = ", ".join(f"{m:.3g}" for m in cfg.eta_multipliers())
    return write_report(ctx["out"] / "report.md", title=title, command=ctx["command"], env=ctx["env"],
                        data_source=ctx["data_source"], settings={k: getattr(cfg, k) for k in settings},
                        claims=claims, summaries=ctx["summaries"], missing=ctx["missing"], failed=ctx["failed"],
                        figures=figures, timing=ctx["timing"], columns=columns,
                        notes=untrained_notes(ctx["summaries"]) + notes
                        + [f"Line probes use step sizes {steps} x LR, {probes}"])
