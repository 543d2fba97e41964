"""Files that are whole or absent, and output folders held by one run at a time.

A reader never sees half a JSON file (write to a temp file, rename over the target), and a second run on
the same ``--output`` folder is refused while the first lives (an advisory flock the kernel drops when its
holder dies, kill -9 included).
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout


def cache_dir() -> Path:
    """Model conversions and tokenised data: ``FLOE_DIST_CACHE``, else ~/.cache/floe-dist."""
    return Path(os.environ.get("FLOE_DIST_CACHE", Path.home() / ".cache" / "floe-dist"))


def package_dir(package: str) -> Path:
    """Where a package's files are, without importing it (its __init__ may need missing deps)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed: pip install --no-deps "
                                f"{package.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0])


def output_file(output: str | os.PathLike, name: str) -> Path:
    """Where a command that writes one file puts it: ``--output`` is a folder that gets NAME, as every command's
    ``--output`` is a folder, unless it ends in NAME's suffix (``out.jsonl`` for generations.jsonl), which names the
    file itself."""
    path = Path(output)
    return path if path.suffix == Path(name).suffix else path / name


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write JSON to a temp file in the same folder, then rename over the target."""
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write to a temp file in the same folder, then rename over the target: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


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


def exclusive_output(folder: str | None, is_main: bool = True):
    """``exclusive`` over a run's output folder, taken by the launch's rank 0 only (``is_main``); none (a command
    that writes one file, or only prints): nothing to hold."""
    if not folder or not is_main:
        return nullcontext()
    return exclusive(Path(folder))
