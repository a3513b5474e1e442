"""Checks shared by every settings type and entry point: types, finiteness, ranges, sizes.

Each settings type (DMSConfig, SamplingParams, PagedConfig, the CLI) validates through these
helpers, so the same bad value gets the same message wherever it comes in. Messages name the
argument and the expected value: ``"top_p: expected a finite number in (0, 1], got nan"``.
"""

from __future__ import annotations

import argparse
import math
import numbers
import os
from collections.abc import Sequence
from typing import Any, Callable, Iterable

# Sane upper bounds: far above any real use, low enough that a typo fails before an allocation.
MAX_WINDOW = 1 << 20  # dms_window_size (released checkpoints use 256-512)
MAX_PAGE_SIZE = 1 << 16  # tokens per page
MAX_SEQS = 1 << 16  # sequence slots of an engine
MAX_SAMPLES = 1 << 12  # n: samples per prompt
MAX_TOKENS = 1 << 24  # max_new_tokens, max_model_len, prefill_chunk
MAX_PAGES = 1 << 31  # num_pages
MAX_SEED = (1 << 63) - 1


class UserError(ValueError):
    """Bad input from the caller (a setting, a file): the CLI prints it as one line."""


class SettingTypeError(UserError, TypeError):
    """A setting of the wrong type (a bool where an int belongs, a string seed): both a TypeError
    and a ValueError, so callers catching either see it."""


def integer(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """An int (not a bool, not a float, not a string) in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SettingTypeError(f"{name}: expected an int{_range(lo, hi)}, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise UserError(f"{name}: expected an int{_range(lo, hi)}, got {value!r}")
    return value


def optional_integer(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int | None:
    return None if value is None else integer(name, value, lo, hi)


def number(name: str, value: Any, lo: float | None = None, hi: float | None = None, *,
           lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite real number (not a bool, not a string) in the given range; returns it as float."""
    what = f"a finite number{_range(lo, hi, lo_open, hi_open)}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SettingTypeError(f"{name}: expected {what}, got {value!r} ({type(value).__name__})")
    x = float(value)
    if not math.isfinite(x):
        raise UserError(f"{name}: expected {what}, got {value!r}")
    if lo is not None and (x <= lo if lo_open else x < lo):
        raise UserError(f"{name}: expected {what}, got {value!r}")
    if hi is not None and (x >= hi if hi_open else x > hi):
        raise UserError(f"{name}: expected {what}, got {value!r}")
    return x


def boolean(name: str, value: Any) -> bool:
    """True or False only: a string such as ``"no"`` or a number is an error, not a truth value."""
    if not isinstance(value, bool):
        raise SettingTypeError(f"{name}: expected true or false, got {value!r} ({type(value).__name__})")
    return value


def choice(name: str, value: Any, options: Iterable[str]) -> str:
    options = tuple(options)
    if not isinstance(value, str) or value not in options:
        raise UserError(f"{name}: expected one of {', '.join(map(repr, options))}, got {value!r}")
    return value


def strings(name: str, value: Any) -> list[str]:
    """A string or a list of non-empty strings -> a list."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or any(not isinstance(s, str) or not s for s in value):
        raise SettingTypeError(f"{name}: expected a string or a list of non-empty strings, got {value!r}")
    return list(value)


def token_ids(name: str, value: Any, vocab: int | None = None, *, empty_ok: bool = False) -> list[int]:
    """A list of token ids (ints, not bools) in ``[0, vocab)``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise SettingTypeError(f"{name}: expected a list of token ids (ints), got {type(value).__name__}")
    ids = list(value)
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, numbers.Integral)]
    if bad:
        raise SettingTypeError(f"{name}: token ids must be ints, got {bad[:4]!r}")
    ids = [int(t) for t in ids]
    hi = vocab if vocab is not None else MAX_SEED
    out = [t for t in ids if not 0 <= t < hi]
    if out:
        raise UserError(f"{name}: token ids must lie in [0, {hi}), got {out[:4]}")
    if not ids and not empty_ok:
        raise UserError(f"{name}: expected at least one token id, got an empty list")
    return ids


def seed(name: str, value: Any) -> int | None:
    return None if value is None else integer(name, value, 0, MAX_SEED)


def _range(lo, hi, lo_open=False, hi_open=False) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi}")
    return (" " + " and ".join(parts)) if parts else ""


# ---------------------------------------------------------------------- memory


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def available_bytes(device) -> int | None:
    """Free memory of a device (host RAM for the CPU); None when it cannot be told."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(dev)[0])
        except Exception:  # no driver answer: do not guess
            return None
    if dev.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def check_allocation(what: str, needed: int, device) -> None:
    """Fail before allocating ``needed`` bytes on ``device`` when they are not free there."""
    free = available_bytes(device)
    if free is not None and needed > free:
        raise UserError(f"{what}: needs {human_bytes(needed)} ({needed} bytes) on {device}, but only "
                        f"{human_bytes(free)} ({free} bytes) are available")


# ---------------------------------------------------------------------- command line


def cli_int(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An argparse ``type`` for ints in ``[lo, hi]``; argparse prints the message with the option's name."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int{_range(lo, hi)}, got {text!r}") from None
        try:
            return integer("value", value, lo, hi)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected an int{_range(lo, hi)}, got {text!r}") from None

    parse.__name__ = "int"
    return parse


def add_dms_overrides(p: argparse.ArgumentParser) -> None:
    """``--dms-window`` / ``--dms-sinks`` / ``--dms-offset``: DMS settings given or overridden at load
    (``dms_overrides``)."""
    p.add_argument("--dms-window", type=cli_int(1, MAX_WINDOW), default=None,
                   help="give or override the DMS delay window")
    p.add_argument("--dms-sinks", type=cli_int(0, MAX_WINDOW), default=None, metavar="N",
                   help="give or override dms_sink_tokens: the first N keys are never evicted (0: plain DMS)")
    p.add_argument("--dms-offset", type=cli_float(-1000.0, 1000.0), default=None, metavar="X",
                   help="give or override dms_initial_alpha_offset (logit = scale * raw - X): every eviction "
                        "logit moves by the change, so a larger X keeps more tokens, a smaller one evicts more")


def dms_overrides(args: argparse.Namespace) -> dict[str, int | float]:
    """The config.json keys ``--dms-window`` / ``--dms-sinks`` / ``--dms-offset`` give (empty when none is)."""
    given = {"dms_window_size": args.dms_window, "dms_sink_tokens": args.dms_sinks,
             "dms_initial_alpha_offset": args.dms_offset}
    return {key: value for key, value in given.items() if value is not None}


def cli_float(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
              hi_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type`` for finite floats in a range (nan and inf are refused)."""
    what = f"a finite number{_range(lo, hi, lo_open, hi_open)}"

    def parse(text: str) -> float:
        try:
            return number("value", float(text), lo, hi, lo_open=lo_open, hi_open=hi_open)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None

    parse.__name__ = "float"
    return parse
