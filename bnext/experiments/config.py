"""Typed experiment configs built from the command line.

`BaseConfig` holds the options every experiment has (the grid, SGD, measurement, machine and files);
vgg.VGGConfig and dln.DLNConfig add their own. Each field carries its help text (units in it). An
experiment's presets are dicts of field values: "quick" is applied first, then the chosen preset, then
explicit flags. Unknown flags are rejected; a bad value ends the command with one `error: ...` line
naming the option (exit status 2). List-valued options take comma-separated values.
"""
import argparse
import dataclasses
import math
import sys
import typing
from typing import Any, ClassVar, Dict, List, Optional, Tuple


def option(default, help: str, **kw):
    """A config field: its default (the quick preset may override it) and help."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=default: list(d), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass
class BaseConfig:
    """Options shared by every experiment. Field defaults here are generic; each experiment's "quick"
    preset sets its own values (shown in --help)."""
    NAME: ClassVar[str] = "experiment"                 # output directory default: runs/<NAME>-<preset>
    NORMS: ClassVar[Tuple[str, ...]] = ()              # accepted --norms / --ics-norms
    preset: str = option("quick", "preset name")
    # --- grid
    norms: List[str] = option(["none", "bn"], "normalizations (bnext.nn.convert targets)")
    lrs: List[float] = option([0.1], "learning rates of the main grid")
    ics_lrs: List[float] = option([], "extra learning rates run for --ics-norms only (the paper's Fig 3 pair)")
    ics_norms: List[str] = option(["none", "bn"], "normalizations run at the extra --ics-lrs")
    ref_lr: float = option(0.1, "LR whose runs the landscape figures and claims use")
    seeds: List[int] = option([0], "seeds (model init, batch order, noise); claims compare seed means with the "
                                   "seed spread as margin")
    # --- training
    steps: int = option(100, "training steps per run")
    init: str = option("glorot", "weight init: glorot (Xavier uniform, zero bias) or torch", choices=["glorot", "torch"])
    momentum: float = option(0.0, "SGD momentum ([choice]: plain SGD)")
    weight_decay: float = option(0.0, "SGD weight decay ([choice]: none)")
    # --- measurement
    eval_every: int = option(0, "steps between test-set evaluations (0: never)")
    measure_every: int = option(40, "steps between landscape measurements (0: never) [choice: K]")
    probe_etas: List[float] = option([0.5, 4.0], "line-probe step sizes as multiples of the LR: two values = a "
                                                 "log grid of --probe-points between them, more = the list itself")
    probe_points: int = option(8, "points of the line-probe log grid [choice: 8]")
    hist_layers: Optional[List[int]] = option(None, "layers (1-based) whose activation histograms are recorded at "
                                                    "each measurement (the per-step drift covers every layer)")
    ics_layers: Optional[List[int]] = option(None, "layers shown in the ICS figure (all layers are measured)")
    curvature: bool = option(False, "also record the top Hessian eigenvalue at each measurement")
    curvature_iters: int = option(20, "power iterations for the Hessian eigenvalue")
    # --- machine and files
    device: str = option("auto", "auto (CUDA if present), cpu, cuda, cuda:N")
    threads: Optional[int] = option(None, "CPU threads per process (default: torch's, or cores / local ranks)")
    procs: int = option(2, "local processes sharing the grid (relaunches under torchrun; 1: this process). "
                           "On CPU, 2 single-threaded processes beat 1 process x 2 threads, and degrade "
                           "gracefully when other jobs load the cores")
    data_parallel: bool = option(False, "train each run on all --procs processes together (DDP, normalization "
                                        "synchronized across them; see bnext/experiments/data_parallel.py) "
                                        "instead of sharing the grid's runs out among them")
    tune_allocator: bool = option(True, "call bnext.tune_cpu_allocator() on CPU (see README)")
    checkpoint_every: int = option(80, "steps between checkpoints (0: none)")
    out: Optional[str] = option(None, "output directory (default runs/<experiment>-<preset>)")
    progress: bool = option(True, "progress: bars on a terminal, a few plain lines per run otherwise")
    save_weights: bool = option(False, "keep each run's final weights as runs/<run>/final.pt")

    def validate(self) -> None:
        """Raises ValueError naming the option when a value cannot work; fills in derived defaults."""
        bad = [n for n in self.norms + self.ics_norms if n not in self.NORMS]
        if bad:
            raise ValueError(f"--norms/--ics-norms: unknown normalization(s) {', '.join(bad)}; "
                             f"choose from {', '.join(self.NORMS)}")
        for name in ("lrs", "ics_lrs"):
            if any(not lr > 0 for lr in getattr(self, name)):
                raise ValueError(f"--{name.replace('_', '-')}: learning rates must be positive")
        if not self.ref_lr > 0:
            raise ValueError("--ref-lr must be positive")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError("--seeds: at least one seed, no repeats")
        for name in ("steps", "probe_points", "curvature_iters", "procs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("eval_every", "measure_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError("--threads must be >= 1")
        if len(self.probe_etas) < 2 or any(not e > 0 for e in self.probe_etas):
            raise ValueError("--probe-etas needs at least two positive multipliers")
        if self.data_parallel and self.procs < 2:
            raise ValueError("--data-parallel needs --procs >= 2 (or a torchrun launch with --procs matching it)")
        if self.out is None:
            self.out = f"runs/{self.NAME}-{self.preset}"

    def eta_multipliers(self) -> List[float]:
        """The line probe's step sizes, as multiples of the run's LR."""
        if len(self.probe_etas) == 2:
            return log_grid(self.probe_etas[0], self.probe_etas[1], self.probe_points)
        return list(self.probe_etas)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option ends with a single `error: ...` line (exit status 2) instead of the
    usage text followed by the message: the usage of ~50 options buries the one line that matters."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _parse_list(kind):
    def parse(text: str):
        items = [t.strip() for t in str(text).split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list with at least one value")
        try:
            return [kind(t) for t in items]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def _field_kind(f: dataclasses.Field):
    t = f.type if not isinstance(f.type, str) else eval(f.type, vars(typing))  # noqa: S307 (our own annotations)
    origin = typing.get_origin(t)
    if origin is typing.Union:  # Optional[X]
        t = [a for a in typing.get_args(t) if a is not type(None)][0]
        origin = typing.get_origin(t)
    if origin in (list, List):
        return "list", typing.get_args(t)[0]
    return "scalar", t


def build_parser(cls, presets: Dict[str, Dict[str, Any]], prog: str, description: str) -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description=description, formatter_class=argparse.HelpFormatter)
    quick = presets.get("quick", {})
    parser.add_argument("--preset", choices=sorted(presets), default="quick",
                        help="starting values for every option below; explicit flags override them. "
                             + "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in vals.items())
                                         for name, vals in presets.items() if vals and name != "quick"))
    for f in dataclasses.fields(cls):
        if f.name == "preset":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind, t = _field_kind(f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = quick.get(f.name, default)
        shown = ",".join(str(v) for v in default) if isinstance(default, list) else default
        help_text = f.metadata.get("help", "") + f" (quick preset: {shown})"
        if kind == "list":
            parser.add_argument(flag, type=_parse_list(t), default=None, help=help_text, metavar="A,B,...")
        elif t is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            choices = f.metadata.get("choices")
            parser.add_argument(flag, type=t, default=None, choices=choices, help=help_text)
    return parser


def parse_config(cls, presets, argv: Optional[List[str]], prog: str, description: str):
    """argv -> config instance (the quick preset's values, the chosen preset's, then explicit flags).
    Validates via cls.validate(); a bad value exits with one `error: ...` line."""
    parser = build_parser(cls, presets, prog, description)
    args = parser.parse_args(argv)
    values = {**presets.get("quick", {}), **presets[args.preset]}
    values["preset"] = args.preset
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if f.name != "preset" and v is not None:
            values[f.name] = v
    cfg = cls(**values)
    try:
        cfg.validate()
    except ValueError as e:
        parser.error(str(e))
    return cfg


def log_grid(lo: float, hi: float, n: int) -> List[float]:
    """n log-spaced points from lo to hi (inclusive)."""
    if n == 1:
        return [lo]
    return [math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * k / (n - 1)) for k in range(n)]

