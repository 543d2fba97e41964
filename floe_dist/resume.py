"""One resume guard for every stage: work saved under other settings is never silently continued.

A stage writes the settings it ran with beside its outputs; a rerun into the same folder compares
them and, if a setting that shapes the result changed, refuses with the keys that changed (old ->
new), so a user either restores them or picks another ``--output``. Settings that only say how to
run (workers, timeouts, how many more steps) are listed by each stage as ``may_change``.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from floe_dist.files import write_json_atomic


def changed_settings(before: dict[str, Any], now: dict[str, Any], may_change: Iterable[str] = ()) -> dict:
    """``{key: (old, new)}`` for every key whose value differs, except those that may change. A setting added
    since the work was saved (absent from it) and now off (None, False, empty) is what that work did: unchanged."""
    keep = set(may_change)
    normal = json.loads(json.dumps(now))  # compare as saved: tuples become lists, keys strings
    return {k: (before.get(k), v) for k, v in normal.items()
            if k not in keep and before.get(k) != v and (k in before or v not in (None, False, ""))}


def describe(changed: dict) -> str:
    return ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in sorted(changed.items()))


def guard(saved: Path, settings: dict[str, Any], *, what: str, may_change: Iterable[str] = (),
          active: bool = True, write: bool = True) -> None:
    """Raise if ``saved`` holds other settings (when ``active``: there is work to resume), then save these."""
    saved = Path(saved)
    if active and saved.is_file():
        changed = changed_settings(json.loads(saved.read_text()), settings, may_change)
        if changed:
            raise ValueError(f"{saved.parent} holds {what} made with other settings: {describe(changed)}; "
                             f"use another --output, or the same settings to resume it")
    if write:
        write_json_atomic(saved, settings)
