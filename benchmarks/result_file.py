"""The small JSON every benchmark writes under benchmarks/results/, and that report.py turns into tables.

A result file holds the rows a script measured, the command that produced them, the machine and the
library versions, so that a table in BENCHMARKS.md can be checked against its data
(``python benchmarks/report.py --check``).
"""
from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("torch", "deepspeed", "transformers", "peft", "bitsandbytes", "smac")


def machine() -> dict:
    """Where the figures were measured: CPU model and count, memory, GPU if any."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name"))
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (OSError, StopIteration, ValueError):
        pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return info


def versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def write_result(name: str, rows: list[dict], merge_key: str | None = None, **extra) -> Path:
    """Write benchmarks/results/<name>.json: the rows, the command line, machine and versions.

    With ``merge_key``, rows of the existing file whose key this run did not measure are kept (a script
    run once per preset or batch size fills one table; a row without the key, run before arms were named, too);
    they keep their own provenance and command."""
    RESULTS.mkdir(exist_ok=True)
    command = " ".join(["python", *sys.argv])
    path = RESULTS / f"{name}.json"
    if merge_key and path.is_file():
        old = json.loads(path.read_text())
        mine = {row[merge_key] for row in rows}
        kept = [{"provenance": old["provenance"], "command": old["command"], **row}
                for row in old["rows"] if row.get(merge_key) not in mine]
        rows = [*kept, *({"provenance": "measured by the script", "command": command, **row} for row in rows)]
        carried = ("rows", "command", "provenance", "script", "machine", "versions")  # this run's own, below
        extra = {**{k: v for k, v in old.items() if k not in carried}, **extra}
    data = {"script": f"benchmarks/{Path(sys.argv[0]).name}", "command": command,
            "provenance": "measured by the script", "machine": machine(), "versions": versions(), **extra,
            "rows": rows}
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path.relative_to(RESULTS.parent.parent)}", flush=True)
    return path


def read_result(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())
