"""One resume guard for every stage: work saved under other settings is never silently continued, and
an output folder is written by one live run at a time.

A stage writes the settings it ran with beside its outputs; a rerun into the same folder compares
them and, if a setting that shapes the result changed, refuses with the keys that changed (old ->
new), so a user either restores them or picks another ``--output``. Settings that only say how to
run (workers, timeouts, how many more steps) are listed by each stage as ``may_change``.
"""
from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any, Iterable, Iterator

from filelock import FileLock, Timeout

from floe_dist.allocation import write_json_atomic


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


LOCK_NAME = ".floe-dist.lock"


@contextmanager
def exclusive(folder: Path, wait: float = 3.0) -> Iterator[None]:
    """Hold ``folder`` for one run: a second run on it (a command started twice, a resume while the killed
    run's processes still live) would interleave checkpoints, metrics and trials. filelock's ``flock``, which the
    kernel drops when its holder dies, kill -9 included, so nothing stale is ever left; ``wait`` seconds for a run
    that is just ending. The holder writes who it is in the lock file, so a refusal names it. A folder the run
    created and left holding only the lock goes too (refused arguments leave nothing behind). Advisory (only
    floe-dist takes it); across hosts, as reliable as the shared filesystem's flock."""
    folder = Path(folder)
    created = not folder.exists()
    path = folder / LOCK_NAME

    def record_holder(fd: int) -> None:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                 .encode())

    while True:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path, timeout=wait, on_acquired=record_holder)
        try:
            lock.acquire()
            break
        except FileNotFoundError:  # the holder created the folder, left it empty and took it as it ended
            continue
        except Timeout:
            holder = (path.read_text().strip() if path.exists() else "") or "another process"
            raise ValueError(f"{folder} is in use by another floe-dist run ({holder}); wait for it to end or stop "
                             f"it, or use another --output") from None
    try:
        yield
    finally:
        if created and [p.name for p in folder.iterdir()] == [LOCK_NAME]:
            path.unlink()  # while held: filelock's waiters see the unlinked file and take a new one
        lock.release()
        if created:
            with suppress(OSError):  # only when empty: not once outputs (or a waiting run's lock file) are there
                folder.rmdir()


def exclusive_output(output: str | None):
    """``exclusive`` over a stage's ``--output`` folder, taken by the launch's rank 0 only (torchrun, deepspeed,
    mpirun or srun: ``discover``); a file output, or none: nothing to hold."""
    from floe_dist.distributed.runtime import discover

    if not output or Path(output).suffix or not discover().is_main:
        return nullcontext()
    return exclusive(Path(output))
