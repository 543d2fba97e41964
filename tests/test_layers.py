"""The package's layers: a module imports only from its own layer or those below it, so the picture in
docs/design.md stays true. Modelling code is single-process: it never imports a distributed library."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Lowest first. A module belongs to the longest prefix that names it.
LAYERS = [
    ("floe_dist.config", "floe_dist.files", "floe_dist.assets", "floe_dist.recipe", "floe_dist.resume",
     "floe_dist.flops", "floe_dist.schedule"),                            # settings and files
    ("floe_dist.allocation", "floe_dist.data", "floe_dist.generation", "floe_dist.modeling",
     "floe_dist.distributed", "floe_dist.resources", "floe_dist.methods"),  # models, data, ranks, allocators
    ("floe_dist.trainer", "floe_dist.evaluation", "floe_dist.search"),      # engines: train, evaluate, search
    ("floe_dist.stages",),                                                  # one run(recipe, output) per stage
    ("launcher",),                                                          # the CLI, the campaign, Slurm
]
SINGLE_PROCESS = ("floe_dist.modeling",)
DISTRIBUTED = ("deepspeed", "torch.distributed", "floe_dist.distributed", "mpi4py")


def layer_of(module: str) -> int | None:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    return None if best is None else best[0]


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
        for line, name in imports(path):
            theirs = layer_of(name)
            if mine is not None and theirs is not None and theirs > mine:
                bad.append(f"{path.relative_to(root)}:{line} imports {name} (layer {theirs} over {mine})")
            if module.startswith(SINGLE_PROCESS) and name.startswith(DISTRIBUTED):
                bad.append(f"{path.relative_to(root)}:{line} imports {name} (modelling code is single-process)")
    return bad


def test_no_module_imports_a_layer_above_its_own():
    assert violations() == []
    assert all(layer_of(m) is not None for m in ("floe_dist.recipe", "floe_dist.stages.train", "launcher.cli"))


def test_the_check_catches_an_import_pointing_up(tmp_path):
    (tmp_path / "floe_dist" / "modeling").mkdir(parents=True)
    (tmp_path / "launcher").mkdir()
    (tmp_path / "floe_dist" / "files.py").write_text("from floe_dist.stages.train import run\n")
    (tmp_path / "floe_dist" / "modeling" / "layer.py").write_text("import torch.distributed as dist\n")
    assert violations(tmp_path) == [
        "floe_dist/files.py:1 imports floe_dist.stages.train (layer 3 over 0)",
        "floe_dist/files.py:1 imports floe_dist.stages.train.run (layer 3 over 0)",
        "floe_dist/modeling/layer.py:1 imports torch.distributed (modelling code is single-process)"]
