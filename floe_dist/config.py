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
