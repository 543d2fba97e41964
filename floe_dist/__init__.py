"""floe-dist: sparse LoRA-MoE adapters placed and sized by Fisher scores, trained with DeepSpeed."""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types


class _Deferred(types.ModuleType):
    """A module that imports the real one on first use of an attribute it lacks (``__file__`` is set, so
    ``inspect.getmodule``'s scan of sys.modules, which torch runs at import, does not load it as it would
    importlib's LazyLoader)."""

    def __getattr__(self, attr: str):
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
            sys.modules[self.__name__] = importlib.import_module(self.__name__)
        return getattr(sys.modules[self.__name__], attr)


def _defer_import(name: str) -> None:
    """DeepSpeed's autotuner runs ``import mlflow`` when deepspeed is imported: 1.3 s of the 6.5 s each floe-dist
    process spent importing (``python -X importtime``), though only the MLflow tracker uses it."""
    if name in sys.modules or (spec := importlib.util.find_spec(name)) is None:
        return
    module = _Deferred(name)
    module.__file__, module.__spec__ = spec.origin, spec
    sys.modules[name] = module


_defer_import("mlflow")
