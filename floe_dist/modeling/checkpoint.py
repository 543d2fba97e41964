"""The safetensors files of a model folder, read one tensor at a time: sharded loading and merging never
hold a whole model."""
from __future__ import annotations

import json
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def weight_files(model_dir: Path) -> list[Path]:
    """The model's safetensors files (one, or the shards its index names)."""
    index = model_dir / INDEX
    files = (sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
             if index.is_file() else [model_dir / "model.safetensors"])
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir}: no safetensors weights ({', '.join(missing)} missing); floe-dist reads "
                                f"safetensors checkpoints only (save_pretrained writes them)")
    return files


class Checkpoint:
    """key -> (file, shape, dtype) from the files' headers only; ``read`` maps one file at a time."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        self.files = weight_files(Path(model_dir))
        self.where: dict[str, Path] = {}
        self.meta: dict[str, tuple[torch.Size, torch.dtype]] = {}
        self._open: dict[Path, object] = {}
        for f in self.files:
            with safe_open(f, "pt") as handle:
                for key in handle.keys():
                    sl = handle.get_slice(key)
                    self.where[key] = f
                    self.meta[key] = (torch.Size(sl.get_shape()), _DTYPES[sl.get_dtype()])

    def read(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        f = self.where[key]
        if f not in self._open:  # one file open at a time: its mapped pages go when it closes
            self._open.clear()
            self._open[f] = safe_open(f, "pt")
        return self._open[f].get_tensor(key)
