"""A floe-dist model for lm-evaluation-harness: the backbone (NF4 too) with any floe-dist adapter, LoRA-MoE
included, as lm-eval's own ``hf`` model (``HFLM``) running on it, so loglikelihood, rolling loglikelihood and
generate requests are answered by lm-eval's code, batching and tokenisation, not ours.

    floe-dist lm-eval --model floe-dist --model_args adapter=runs/c/train/adapter --tasks hellaswag
    python -c "import floe_dist.lm_eval_model, lm_eval; lm_eval.simple_evaluate(model='floe-dist', ...)"

lm-eval 0.4 finds models only in its own table or by the ``register_model`` decorator, with no plugin
lookup, so its stock ``lm_eval`` command cannot see this one: ``floe-dist lm-eval`` is that command with
the model registered. ``--model_args``: ``adapter`` (an export folder), ``base`` (a model name or folder;
default the export's ``base_model``), ``quant`` (default the export's), and any ``HFLM`` argument
(``batch_size``, ``max_length``, ...). One process: ``HFLM`` does not shard a model it is handed; ``floe-dist
evaluate`` with ``evaluate.lm_eval_tasks`` on several ranks runs lm-eval on them (``RankedHFLM``).
"""
from __future__ import annotations

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from floe_dist.distributed.sharded_eval import SINGLE, Ranks
from floe_dist.modeling.backbone import load_backbone, load_tokenizer, resolve_model
from floe_dist.modeling.export import export_meta, load_adapter


@register_model("floe-dist")
class FloeDistLM(HFLM):
    def __init__(self, adapter: str | None = None, base: str | None = None, quant: str | None = None,
                 device: str | None = None, **hflm_args):
        meta = export_meta(adapter) if adapter else {}
        base = base or meta.get("base_model")
        if not base:
            raise ValueError("floe-dist lm-eval model: give base=MODEL or adapter=EXPORT_FOLDER in --model_args")
        quant = quant or meta.get("quant") or "none"
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model_dir = resolve_model(base)
        lm = load_backbone(model_dir, quant, device)
        if adapter:
            load_adapter(lm, adapter)
        hflm_args.pop("pretrained", None)
        super().__init__(pretrained=lm.eval(), tokenizer=load_tokenizer(model_dir), **hflm_args)
        self.floe_dist = {"base": base, "adapter": adapter, "quant": quant}

    def get_model_info(self) -> dict:
        """What lm-eval records of the model; HFLM's own asks the hub for a revision, which a local model has not."""
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(self.model.dtype), "floe_dist": self.floe_dist}


class RankedHFLM(HFLM):
    """lm-eval's ``hf`` model on the job's ranks (``floe-dist evaluate`` with several): lm-eval gives each rank every
    world-th document, pads the ranks' requests to equal counts and gathers the metrics on rank 0 through
    ``all_gather``, ``gather_object`` and ``barrier``, which it leaves to the model. A partitioned (ZeRO-3) model
    gathers its weights in every forward, so each forward is announced to the other ranks (``Ranks.step``) and
    at each barrier a rank whose requests are done runs dummy forwards, or dummy generations, until every rank
    is done (``Ranks.drain``); generation keeps its token steps in step with ``synced_gpus``."""

    def __init__(self, lm, tokenizer, ranks: Ranks, batch_size: int):
        # no logits cache when partitioned: it merges requests, and the ranks' forwards must stay countable
        super().__init__(pretrained=lm.eval(), tokenizer=tokenizer, batch_size=batch_size,
                         logits_cache=not ranks.partitioned)
        self.ranks, self._rank, self._world_size = ranks, ranks.rank, ranks.world
        self.generating = False  # what the drain's dummy must be: a forward, or a generation

    def all_gather(self, tensor):
        import torch.distributed as dist

        if self.world_size == 1:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst=0):
        import torch.distributed as dist

        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, gathered, dst=dst)
        return gathered

    def barrier(self):
        import torch.distributed as dist

        pad = torch.full((1, 2), self.tokenizer.pad_token_id, device=self.device)
        self.ranks.drain(lambda: self.model.generate(input_ids=pad, max_new_tokens=1, synced_gpus=True,
                                                     pad_token_id=self.tokenizer.pad_token_id)
                         if self.generating else self.model(pad))
        if self.world_size > 1:
            dist.barrier()

    def _model_call(self, inps, *args, **kwargs):
        self.generating = False
        self.ranks.step()
        return super()._model_call(inps, *args, **kwargs)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        self.generating = True
        self.ranks.step()
        return super()._model_generate(context, max_length, stop, synced_gpus=self.ranks.partitioned,
                                       **generation_kwargs)


def harness_results(lm, tokenizer, tasks: list[str], include: str | None = None, limit: int | None = None,
                    batch_size: int = 8, ranks: Ranks = SINGLE) -> dict:
    """lm-eval's results for a model already loaded (``floe-dist evaluate --lm-eval-tasks``), on ``ranks``:
    {task: metrics}, the same on every rank."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=RankedHFLM(lm, tokenizer, ranks, batch_size), tasks=tasks,
                          task_manager=TaskManager(include_path=include), limit=limit, log_samples=False)
    return ranks.broadcast(out and {task: {k: v for k, v in metrics.items() if k not in ("name", "alias")}
                                    for task, metrics in out["results"].items()})


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line, with the ``floe-dist`` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = ["lm_eval", *argv]
    cli_evaluate()
