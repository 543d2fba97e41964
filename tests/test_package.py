"""The wheel: it carries the ZeRO configs, sbatch templates and recipes, and runs outside the checkout."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

from tests.conftest import REPO


def test_the_wheel_carries_the_shipped_files_and_runs_outside_the_checkout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("floe_dist-*.whl")
    inside = set(zipfile.ZipFile(wheel).namelist())
    for folder, pattern in (("zero_configs", "*.json"), ("slurm", "*.sbatch"), ("recipes", "*.yaml")):
        shipped = sorted((REPO / folder).glob(pattern))
        assert shipped and {f"floe_dist/assets/{folder}/{p.name}" for p in shipped} <= inside

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}

    def floe(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=elsewhere, env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    where = subprocess.run([sys.executable, "-c", "import floe_dist, launcher.cli; print(floe_dist.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site))  # the installed copy, not the checkout
    floe("plan", "--config", "llama3-70b-2node")  # a shipped recipe
    floe("slurm", "--action", "render", "--config", "tiny", "--output", "job")  # a shipped template
    assert "--config" in (elsewhere / "job" / "campaign.sbatch").read_text()
    floe("train", "--config", "tiny", "--parallel.nproc", "1", "--train.steps", "1", "--zero", "3",
         "--output", "run")  # a shipped ZeRO config
    assert json.loads((elsewhere / "run" / "train.json").read_text())["steps"] == 1
    assert (elsewhere / "run" / "recipe.yaml").is_file()
