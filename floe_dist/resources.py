"""What a run loads before its first step: the tokenizer, the tokenised examples and the frozen backbone.

A training run loads each once (``Resources()``). A warm search worker keeps one ``Resources(keep=True)``
across its trials (floe_dist/search/worker.py), so only its first trial pays for loading: later trials
get the same objects, the backbone with the previous trial's adapters taken out. A kept backbone is
never written to (it is frozen, and adapters only wrap its linears), so a trial on a warm worker computes
what it would on a fresh one. A ZeRO-3 backbone is not kept: the engine that partitioned it leaves its
gather hooks on every module, so each trial loads its own.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a warm worker of trials that need no torch (the search tests' numpy toy) starts without it
    import torch


class Resources:
    def __init__(self, keep: bool = False):
        self.keep = keep
        self.kept: dict[tuple, object] = {}

    def get(self, key: tuple, make: Callable[[], object]):
        if not self.keep:
            return make()
        if key not in self.kept:
            self.kept[key] = make()
        return self.kept[key]

    def tokenizer(self, model_dir: Path):
        from floe_dist.modeling.backbone import load_tokenizer

        return self.get(("tokenizer", str(model_dir)), lambda: load_tokenizer(model_dir))

    def examples(self, data, split: str, tokenizer) -> list:
        """The examples of a recipe's ``data`` section in ``split``."""
        from floe_dist.data import data_key
        from floe_dist.streaming import load_split

        return self.get(("examples", *data_key(data, split), tokenizer.name_or_path),
                        lambda: load_split(data, split, tokenizer))

    def tokenized(self, key: tuple, examples: list, tokenizer, max_length: int, pack: bool) -> tuple:
        """The training rows of ``examples`` (named by ``key``; ``data.tokenize``, cached on disk; a stream's are
        tokenised as they are read) and how many examples ``max_length`` cuts."""
        from floe_dist.data import pack as pack_rows
        from floe_dist.data import tokenize
        from floe_dist.streaming import ExampleStream, RowStream

        if isinstance(examples, ExampleStream):  # read as training goes; what it cuts is not counted ahead
            return RowStream(examples, tokenizer, max_length), 0

        def make():
            rows = tokenize(examples, tokenizer, max_length)
            return (pack_rows(rows, max_length) if pack else rows), sum(rows["cut"])

        return self.get(("tokenized", *key, max_length, pack), make)

    def backbone(self, model_dir: Path, quant: str, layout, ds_config: dict):
        """The frozen backbone for training on ``layout``, without adapters; under ZeRO-3 its frozen linears pin no
        gathered weight (elsewhere every weight is resident anyway, and plain autograd is the faster backward)."""
        from floe_dist.distributed.sharded_load import load_for_layout
        from floe_dist.modeling.frozen_linear import release_frozen_weights

        if layout.zero_stage == 3:
            lm = load_for_layout(model_dir, quant, layout, ds_config)  # partitioned as it loads
            release_frozen_weights(lm)
            return lm
        return self._clean(self.get(("train-backbone", str(model_dir), quant, str(layout.torch_device)),
                                    lambda: load_for_layout(model_dir, quant, layout, ds_config)))

    def eval_backbone(self, model_dir: Path, quant: str, device: torch.device):
        """The whole backbone on one device, for evaluation (no adapters)."""
        from floe_dist.modeling.backbone import load_backbone

        return self._clean(self.get(("eval-backbone", str(model_dir), quant, str(device)),
                                    lambda: load_backbone(model_dir, quant, device)))

    @staticmethod
    def _clean(lm):
        from floe_dist.modeling.inject import remove_adapters

        remove_adapters(lm)
        if getattr(lm, "is_activation_checkpointing", False):  # a trial that asked for it: the next may not
            lm.activation_checkpointing_disable()
        return lm
