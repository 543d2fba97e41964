"""Small helpers for the typed argument dataclasses every stage exposes (one help text per field)."""
from __future__ import annotations

from dataclasses import field
from typing import Any


def arg(default: Any, help: str) -> Any:
    """A dataclass field whose help text becomes the CLI's ``--help`` line."""
    return field(default=default, metadata={"help": help})
