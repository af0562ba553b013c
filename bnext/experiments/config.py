"""Typed experiment configs built from the command line.

Every experiment declares a dataclass whose fields are its options (with the help text and units in
the field metadata) and a table of presets. The command line is: preset values, then explicit flags
on top; unknown flags are rejected by argparse. List-valued options take comma-separated values.
"""
import argparse
import dataclasses
import math
import typing
from typing import Any, Dict, List, Optional


def option(default, help: str, **kw):
    """A config field: its default (the 'quick' preset's value unless a preset overrides it) and help."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=default: list(d), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


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
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.HelpFormatter)
    parser.add_argument("--preset", choices=sorted(presets), default="quick",
                        help="starting values for every option below; explicit flags override them. "
                             + "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in vals.items())
                                         for name, vals in presets.items() if vals))
    for f in dataclasses.fields(cls):
        if f.name == "preset":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind, t = _field_kind(f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
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
    """argv -> config instance (preset values, then explicit flags). Validates via cls.validate()."""
    parser = build_parser(cls, presets, prog, description)
    args = parser.parse_args(argv)
    values = dict(presets[args.preset])
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


def to_dict(cfg) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)
