"""The package's layers: a module imports only from its own layer or those below it, so the picture in
docs/design.md stays true. Modelling code is single-process: it never imports a distributed library."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Lowest first, one package or top-level module per layer: a module imports only from its own package or those
# below it, so no two packages import each other (a cycle would need an import pointing up).
LAYERS = [
    "floe_dist.config", "floe_dist.schedule", "floe_dist.files", "floe_dist.assets", "floe_dist.flops",
    "floe_dist.tracking", "floe_dist.recipe", "floe_dist.resume",       # settings, files, logs
    "floe_dist.generation", "floe_dist.allocation", "floe_dist.modeling", "floe_dist.sources", "floe_dist.data",
    "floe_dist.streaming",
    "floe_dist.distributed", "floe_dist.resources", "floe_dist.lm_eval_model",  # models, data, ranks
    "floe_dist.evaluation", "floe_dist.methods", "floe_dist.trainer", "floe_dist.search",  # engines, allocators
    "floe_dist.stages",                                                  # one run(recipe, output) per stage
    "launcher",                                                          # the CLI, the campaign, Slurm
]
SINGLE_PROCESS = ("floe_dist.modeling",)
DISTRIBUTED = ("deepspeed", "torch.distributed", "floe_dist.distributed", "mpi4py")


def layer_of(module: str) -> int | None:
    """The layer of a module (``floe_dist.modeling.inject``: floe_dist.modeling's); None outside floe-dist or for
    the package's own ``floe_dist/__init__.py``."""
    return next((i for i, p in enumerate(LAYERS) if module == p or module.startswith(p + ".")), None)


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def violations(root: Path = REPO) -> list[str]:
    bad = []
    for path in sorted([*(root / "floe_dist").rglob("*.py"), *(root / "launcher").rglob("*.py")]):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        mine = layer_of(module)
        if mine is None and module != "floe_dist":
            bad.append(f"{path.relative_to(root)} is in no layer: add its package to LAYERS")
        for line, name in imports(path):
            theirs = layer_of(name)
            if mine is not None and theirs is not None and theirs > mine:
                bad.append(f"{path.relative_to(root)}:{line} imports {name} ({LAYERS[theirs]} is above "
                           f"{LAYERS[mine]})")
            if module.startswith(SINGLE_PROCESS) and name.startswith(DISTRIBUTED):
                bad.append(f"{path.relative_to(root)}:{line} imports {name} (modelling code is single-process)")
    return bad


def test_no_module_imports_a_layer_above_its_own():
    assert violations() == []
    assert all(layer_of(m) is not None for m in ("floe_dist.recipe", "floe_dist.stages.train", "launcher.cli"))


def test_the_check_catches_an_import_pointing_up_a_cycle_and_a_module_without_a_layer(tmp_path):
    (tmp_path / "floe_dist" / "modeling").mkdir(parents=True)
    (tmp_path / "launcher").mkdir()
    (tmp_path / "floe_dist" / "files.py").write_text("from floe_dist.stages.train import run\n")
    (tmp_path / "floe_dist" / "modeling" / "layer.py").write_text("import torch.distributed as dist\n")
    # the cycle of the earlier layout: allocation <-> modeling, once in one layer together
    (tmp_path / "floe_dist" / "allocation.py").write_text("from floe_dist.modeling import layer\n")
    (tmp_path / "floe_dist" / "modeling" / "inject.py").write_text("import floe_dist.allocation\n")
    (tmp_path / "floe_dist" / "newthing.py").write_text("x = 1\n")
    assert violations(tmp_path) == [
        "floe_dist/allocation.py:1 imports floe_dist.modeling (floe_dist.modeling is above floe_dist.allocation)",
        "floe_dist/allocation.py:1 imports floe_dist.modeling.layer (floe_dist.modeling is above "
        "floe_dist.allocation)",
        "floe_dist/files.py:1 imports floe_dist.stages.train (floe_dist.stages is above floe_dist.files)",
        "floe_dist/files.py:1 imports floe_dist.stages.train.run (floe_dist.stages is above floe_dist.files)",
        "floe_dist/modeling/layer.py:1 imports torch.distributed (modelling code is single-process)",
        "floe_dist/newthing.py is in no layer: add its package to LAYERS"]
