"""Small helpers for the typed argument dataclasses every stage exposes (one help text per field)."""
from __future__ import annotations

from dataclasses import field
from typing import Any


def arg(default: Any, help: str) -> Any:
    """A dataclass field whose help text becomes the CLI's ``--help`` line."""
    return field(default=default, metadata={"help": help})


def below_one(args: Any, names: tuple[str, ...]) -> list[str]:
    """``--flag must be >= 1`` for each named count field that is below 1 (for ``validate`` methods)."""
    return [f"--{n.replace('_', '-')} must be >= 1, got {getattr(args, n)}" for n in names if getattr(args, n) < 1]

