"""Small helpers for the typed settings dataclasses (one help text per field)."""
from __future__ import annotations

from dataclasses import field
from typing import Any


def arg(default: Any, help: str) -> Any:
    """A dataclass field whose help text becomes the CLI's ``--help`` line (a list or dict default: a fresh copy
    for each instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def comma_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``: a setting that names several things."""
    return [t.strip() for t in text.split(",") if t.strip()]


def below_one(obj: Any, names: tuple[str, ...], prefix: str = "") -> list[str]:
    """``section.name must be >= 1`` (a tool's options: ``--flag-name``) for each named count field below 1."""
    key = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: "--" + n.replace("_", "-"))
    return [f"{key(n)} must be >= 1, got {getattr(obj, n)}" for n in names if getattr(obj, n) < 1]


DURATION_FORMS = "seconds (900), 900s, 45m, 2h, 1h30m or Slurm's H:MM:SS"


def duration_seconds(text: str, key: str) -> float:
    """``"1h30m"`` -> 5400.0: a wall-clock duration in the forms people write (``DURATION_FORMS``)."""
    import re

    value = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    if re.fullmatch(r"\d+(:\d\d){1,2}", value):  # Slurm's --time: M:SS or H:MM:SS
        return float(sum(int(p) * 60 ** i for i, p in enumerate(reversed(value.split(":")))))
    number = r"(\d+(?:\.\d+)?)\s*"
    match = re.fullmatch(rf"(?:{number}h\s*)?(?:{number}m\s*)?(?:{number}s)?", value)
    if not value or match is None:
        raise ValueError(f"{key}: {text!r} is not a duration; write {DURATION_FORMS}")
    hours, minutes, seconds = (float(g or 0) for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds
