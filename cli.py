"""Command-line helpers shared by the scripts: one-line errors (exit code 2) and checked flag types.

import cli
p = cli.Parser("train", description="...")
p.add_argument("--epochs", type=cli.positive_int, default=20)
cli.fail("--features: x.safetensors not found; run extract_features.py first")
"""

import argparse
import math
import sys


def fail(msg):
    """Bad input: one line on stderr that names the file or flag and the fix, then exit code 2."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to a help string unless the help names its default or it is None."""

    def _get_help_string(self, action):
        if "(default" in (action.help or "") or action.default is None:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with defaults in --help; a bad flag is answered by one line naming it (no usage)."""

    def __init__(self, prog, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(prog, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def number(kind, lo, strict=False, hi=None):
    """argparse type=: a finite int / float >= lo (> lo with strict; < hi when hi is given)."""

    def parse(s):
        try:
            x = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{s!r} is not {'an integer' if kind is int else 'a number'}"
            ) from None
        if not math.isfinite(x) or (x <= lo if strict else x < lo) or (hi is not None and x >= hi):
            where = f"{'>' if strict else '>='} {lo}" + (f" and < {hi}" if hi is not None else "")
            raise argparse.ArgumentTypeError(f"{s} must be {where}")
        return x

    return parse


positive_int = number(int, 1)
nonneg_int = number(int, 0)
positive_float = number(float, 0.0, strict=True)
nonneg_float = number(float, 0.0)
fraction = number(float, 0.0, hi=1.0)  # [0, 1): dropout rates, warmup ratios


def int_list(s):
    """argparse type=: comma-separated positive integers, e.g. "1024,512" ("": no entries)."""
    try:
        out = [int(t) for t in s.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{s!r}: expected comma-separated integers like 1024,512"
        ) from None
    if any(v <= 0 for v in out):
        raise argparse.ArgumentTypeError(f"{s!r}: every entry must be positive")
    return out
