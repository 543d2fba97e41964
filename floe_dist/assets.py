"""Files that ship with floe-dist: ZeRO configs, sbatch templates, recipes.

The top-level ``zero_configs/``, ``slurm/`` and ``recipes/`` folders of the checkout are the source of
truth; the wheel carries them as package data under ``floe_dist/assets/`` (pyproject.toml).
"""
from __future__ import annotations

from pathlib import Path
from string import Template


def asset_dir(name: str) -> Path:
    """The installed package's copy of a shipped folder, else the checkout's top-level one."""
    installed = Path(__file__).resolve().parent / "assets" / name
    return installed if installed.is_dir() else Path(__file__).resolve().parents[1] / name


class SbatchTemplate(Template):
    """``slurm/<name>.sbatch`` with ``@{field}`` placeholders (bash keeps its ``${...}``)."""
    delimiter = "@"

    @classmethod
    def named(cls, name: str) -> SbatchTemplate:
        return cls((asset_dir("slurm") / f"{name}.sbatch").read_text())
