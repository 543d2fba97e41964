"""Where a source's rows come from: a data file (JSON, JSONL, CSV, Parquet, Arrow), a ``save_to_disk`` folder, a
hub-style folder (data files and a README.md card listing its configs; a git clone of a hub dataset repository is
one) or a hub id ``owner/name``, opened with Hugging Face ``datasets`` in the recipe's ``hub_config``,
``hub_split`` and ``hub_revision``, whole or as a stream. What the rows mean is floe_dist/data.py's.

A revision of a hub id is the hub's to resolve. A git clone checked out at another revision is read at the one
asked for: its files at that commit, tag or branch, checked out once into floe-dist's cache (``at_revision``), so a
cluster without hub access pins a dataset as it would online. Errors name what exists: the configs and splits
(``datasets`` lists them), the clone's branches and tags, and the hub datasets cached on this machine when the
hub cannot be reached.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from floe_dist.files import cache_dir

READERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def is_saved_dataset(path: Path) -> bool:
    """A folder ``save_to_disk`` wrote (not a hub-style folder of data files)."""
    return any((path / marker).is_file() for marker in ("state.json", "dataset_dict.json"))


def open_source(task: str, hub: dict | None = None, streaming: bool = False):
    """A user's data as a ``datasets`` Dataset, or an IterableDataset read lazily when ``streaming``: a data file, a
    ``save_to_disk`` folder, a hub-style folder (data files, and a README.md listing its configs) or a hub id
    ``owner/name``. ``hub`` holds the last two's ``hub_config``, ``hub_split`` (default train) and
    ``hub_revision``."""
    import datasets

    datasets.disable_progress_bars()
    hub = {k: v for k, v in (hub or {}).items() if v not in (None, "")}
    split = hub.get("hub_split", "train")
    path = Path(task)
    if path.is_dir() and is_saved_dataset(path):
        given = [f"data.{k}" for k in ("hub_config", "hub_revision") if k in hub]
        if given:
            raise ValueError(f"{path}: {', '.join(given)} apply to hub datasets and hub-style folders, not to a "
                             f"save_to_disk folder")
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if split not in data and split != "train":  # train, the default, falls back to the first split
                raise ValueError(f"{path}: no split {split!r}; it has {', '.join(data)} (set data.hub_split)")
            data = data[split] if split in data else next(iter(data.values()))
        return data.to_iterable_dataset() if streaming else data
    if path.is_file() or (not path.is_dir() and names_a_file(task)):
        given = [f"data.{k}" for k, v in hub.items() if (k, v) != ("hub_split", "train")]
        if given:
            raise ValueError(f"{path}: {', '.join(given)} apply to hub datasets and hub-style folders, not to a data "
                             f"file")
        return _open_file(path, streaming)
    where = f"hub-style folder {path}" if path.is_dir() else f"hub dataset {task!r}"
    revision = hub.get("hub_revision")
    if path.is_dir() and revision:
        task, revision = str(at_revision(path, revision)), None
    cache = folder_cache(Path(task)) if Path(task).is_dir() else cache_dir() / "datasets"
    try:
        return datasets.load_dataset(task, name=hub.get("hub_config"), split=split, revision=revision,
                                     streaming=streaming, cache_dir=str(cache))
    except ValueError as err:  # a config or split it lacks: datasets names the ones it has
        said = " ".join(line.strip() for line in str(err).splitlines()[:2] if line.strip())
        raise ValueError(f"{where}: {said} (set data.hub_config, data.hub_split)") from None
    except Exception as err:  # datasets raises ConnectionError, DatasetNotFoundError, ... by situation
        said = f"{where} could not be loaded ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        if path.is_dir():
            raise ValueError(said) from None
        cached = ", ".join(cached_hub_datasets()) or "none"
        raise ValueError(f"{said}. Hub datasets cached here: {cached}. Without a reachable hub: git clone the "
                         f"dataset repository, or on a machine with one datasets.load_dataset({task!r}, "
                         f"split={split!r}).save_to_disk(DIR); copy it here and pass it as the task") from None


def _open_file(path: Path, streaming: bool):
    import datasets

    if not path.exists():
        raise FileNotFoundError(f"task file not found: {path}")
    if path.suffix == ".arrow":
        data = datasets.Dataset.from_file(str(path))
        return data.to_iterable_dataset() if streaming else data
    if path.suffix not in READERS:
        raise ValueError(f"{path}: unknown data file type {path.suffix!r} (use .json, .jsonl, .csv, .parquet, "
                         f".arrow, a save_to_disk folder or a hub-style folder)")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty")
    if path.suffix == ".jsonl" and not streaming:
        _check_json_lines(path)  # datasets' own error does not say which line
    try:
        return datasets.load_dataset(READERS[path.suffix], data_files=str(path), split="train", streaming=streaming,
                                     cache_dir=str(cache_dir() / "datasets"))
    except Exception as err:  # datasets wraps parser errors in its own types
        raise ValueError(f"{path}: cannot be read as {READERS[path.suffix]}: {err}") from None


def read_text(path: Path) -> str:
    """A text file's contents; a binary one is a ValueError that names it."""
    try:
        return path.read_text()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text file (byte {err.object[err.start]:#04x} at offset "
                         f"{err.start})") from None


def _check_json_lines(path: Path) -> None:
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: row {n} is not JSON: {err}") from None


def names_a_file(task) -> bool:
    """A task that is a path here, or names a data file by its suffix (even a missing one: its error says so)."""
    return Path(task).exists() or Path(task).suffix in (*READERS, ".arrow")


def source_name(task) -> str:
    """How errors name a source."""
    return str(Path(task)) if names_a_file(task) else f"hub dataset {task}"


HUB_KEYS = ("hub_config", "hub_split", "hub_revision")


def hub_of(data, source: dict | None = None) -> dict:
    """A source's hub config, split and revision: its own, else the data section's."""
    return {k: (source or {}).get(k, getattr(data, k)) for k in HUB_KEYS}


def at_revision(clone: Path, revision: str) -> Path:
    """A git clone of a dataset repository as it was at ``revision`` (a commit, tag or branch): checked out once
    into the cache, under the commit it resolves to; a folder that is not a clone, or a revision it lacks, is
    refused naming what there is."""
    def git(*args, cwd=clone):  # LFS files stay pointers here; their objects come from the clone (lfs_objects)
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                              env={**os.environ, "GIT_LFS_SKIP_SMUDGE": "1"})

    if not (clone / ".git").exists():
        raise ValueError(f"{clone}: data.hub_revision {revision!r} needs a git clone of the dataset repository "
                         f"(this folder is not one), or a hub id")
    found = git("rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}")
    if found.returncode:
        refs = git("for-each-ref", "--format=%(refname:short)", "refs/heads", "refs/tags").stdout.split()
        raise ValueError(f"{clone}: no revision {revision!r}; its branches and tags: {', '.join(refs) or 'none'} "
                         f"(or a commit)")
    commit = found.stdout.strip()
    checkout = cache_dir() / "datasets" / "revisions" / f"{clone.resolve().name}-{commit[:12]}"
    if not checkout.is_dir():
        partial = checkout.with_name(f"{checkout.name}.{os.getpid()}")
        checkout.parent.mkdir(parents=True, exist_ok=True)
        for step in (("clone", "--quiet", "--shared", "--no-checkout", str(clone.resolve()), str(partial)),
                     ("-C", str(partial), "checkout", "--quiet", commit)):
            done = git(*step, cwd=None)
            if done.returncode:
                shutil.rmtree(partial, ignore_errors=True)
                raise ValueError(f"{clone}: checking out {revision!r} failed: {done.stderr.strip()}")
        try:
            lfs_objects(partial, clone, revision)
        except ValueError:
            shutil.rmtree(partial)  # no half-made checkout left in the cache
            raise
        try:
            partial.rename(checkout)  # whole or not at all
        except OSError:  # another rank checked out the same commit first
            if not checkout.is_dir():
                raise
            shutil.rmtree(partial)
    return checkout


LFS_POINTER = b"version https://git-lfs.github.com/spec/v1\n"


def lfs_objects(checkout: Path, clone: Path, revision: str) -> None:
    """Replaces the git LFS pointers of a checkout (hub repositories keep their Parquet files in LFS) by the
    objects the clone has fetched; a missing one is refused with the command that fetches it."""
    for pointer in (f for f in checkout.rglob("*") if f.is_file() and ".git" not in f.relative_to(checkout).parts
                    and f.stat().st_size < 1024 and f.read_bytes().startswith(LFS_POINTER)):
        oid = next(line.split(":", 1)[1] for line in pointer.read_text().splitlines() if line.startswith("oid "))
        stored = clone / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
        if not stored.is_file():
            raise ValueError(f"{clone}: {pointer.relative_to(checkout)} is stored with git LFS and the clone has not "
                             f"fetched it at {revision!r}: git -C {clone} lfs fetch origin {revision}")
        shutil.copyfile(stored, pointer)


def folder_cache(folder: Path) -> Path:
    """Where ``datasets`` caches a hub-style folder: a place per state of its files (paths, sizes, times).
    ``datasets`` keys such a folder by its card alone, so an edited data file would be read as it was."""
    files = sorted((str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns) for f in folder.rglob("*")
                   if f.is_file() and ".git" not in f.relative_to(folder).parts)
    digest = hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]
    return cache_dir() / "datasets" / "folders" / f"{folder.resolve().name}-{digest}"


def cached_hub_datasets() -> list[str]:
    """The hub datasets this machine has cached (floe-dist's datasets cache and the Hugging Face hub cache), as
    ``owner/name``."""
    hub_cache = Path(os.environ.get("HF_HUB_CACHE", Path(os.environ.get("HF_HOME", Path.home() / ".cache"
                                                                        / "huggingface")) / "hub"))
    names = {d.name.replace("___", "/") for d in (cache_dir() / "datasets").glob("*___*") if d.is_dir()}
    names |= {d.name.removeprefix("datasets--").replace("--", "/") for d in hub_cache.glob("datasets--*")}
    return sorted(names)
