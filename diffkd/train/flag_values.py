"""What each numeric or path flag of ``python -m diffkd.train`` / ``diffkd.eval`` accepts: argparse ``type``
functions whose errors name the expected value, so that a bad value is refused at parse time with the flag's name
(argparse prefixes the message with ``argument --flag:``)."""
from __future__ import annotations

import argparse
import math


def _parse_number(text: str, kind: type) -> int | float:
    """``text`` as an int or a finite float, or an argparse error saying what was expected."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = _parse_number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = _parse_number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def seed_value(text: str) -> int:
    """NumPy's generators take seeds in 0 .. 2**32 - 1."""
    value = _parse_number(text, int)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be in 0 .. 4294967295, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _parse_number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _parse_number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def learning_rate(text: str) -> float:
    """> 0; an explicit 0 is allowed (a frozen-weights check) and warned about by ``parse_args``."""
    value = _parse_number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (e.g. 0.05), got {text}")
    return value


def momentum_value(text: str) -> float:
    value = _parse_number(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (e.g. 0.9), got {text}")
    return value


def decay_rate(text: str) -> float:
    value = _parse_number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"is the factor the LR is multiplied by, in (0, 1] (0.1 divides it by "
                                         f"10), got {text}")
    return value


def path_text(text: str) -> str:
    """A file or folder name; an empty one (``--output ""``) would silently mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; pass a file or folder name")
    return text


def experiment_name(text: str) -> str:
    """One folder name inside --output: it cannot climb out of it or name a path elsewhere."""
    text = path_text(text)
    if "/" in text or "\\" in text or text in (".", ".."):
        raise argparse.ArgumentTypeError(f"must be one folder name inside --output, got {text!r}; choose where "
                                         f"runs go with --output")
    return text


_DURATION_UNITS = {"s": 1, "min": 60, "h": 3600}


def checkpoint_interval(text: str) -> str:
    """``N`` optimizer steps, or a wall-clock duration such as ``600s``, ``10min``, ``1h``."""
    text = str(text).strip()
    if text.isdigit() and int(text) > 0:
        return text
    for unit in sorted(_DURATION_UNITS, key=len, reverse=True):
        number = text[:-len(unit)]
        if text.endswith(unit) and number.replace(".", "", 1).isdigit() and float(number) > 0:
            return text
    raise argparse.ArgumentTypeError(f"expected a number of steps (e.g. 500) or a duration (e.g. 600s, 10min, 1h), "
                                     f"got {text!r}")


def interval_seconds_or_steps(text: str) -> tuple[float | None, int | None]:
    """(seconds, None) for a duration, (None, steps) for a step count."""
    if text.isdigit():
        return None, int(text)
    for unit in sorted(_DURATION_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            return float(text[:-len(unit)]) * _DURATION_UNITS[unit], None
    raise ValueError(f"bad checkpoint interval {text!r}")
