"""The training objective: LM cross-entropy on the answer tokens, plus the routers' balance loss.

The output projection runs only at the positions that predict answer tokens, so the vocabulary
matmul (28M parameters on SmolLM2) costs a few rows instead of every position of every sequence.
"""
from __future__ import annotations

import torch
from torch import nn

from floe_dist.modeling.inject import LORA_TAG
from floe_dist.modeling.lora_moe import LoRAMoELinear


class AnswerLM(nn.Module):
    """Wraps a Hugging Face causal LM (``lm``); ``forward`` returns a dict of losses and scores."""

    def __init__(self, lm: nn.Module, balance_coef: float = 0.0):
        super().__init__()
        self.lm = lm
        self.balance_coef = balance_coef
        self._adapters_by_layer: dict[int, list[LoRAMoELinear]] = {}
        for name, module in lm.named_modules():
            if isinstance(module, LoRAMoELinear):
                layer = int(name.split("layers.")[1].split(".")[0])
                self._adapters_by_layer.setdefault(layer, []).append(module)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Only the adapter (``lora_*``) tensors: the frozen backbone is reloaded from its source and
        never checkpointed. Keeps checkpoints small and 4-bit weights (which ZeRO-3 partitions and
        bitsandbytes cannot serialise partitioned) out of them."""
        out = {} if destination is None else destination
        for name, p in self.named_parameters():
            if LORA_TAG in name:
                out[prefix + name] = p if keep_vars else p.detach()
        return out

    @property
    def adapters_by_layer(self) -> dict[int, list[LoRAMoELinear]]:
        return self._adapters_by_layer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        target = labels[:, 1:]  # token t is predicted from position t-1
        picked = target != -100  # (B, T-1)
        logits = self.lm.get_output_embeddings()(hidden[:, :-1][picked]).float()  # (N_answer, V)
        token_logprob = logits.log_softmax(-1).gather(-1, target[picked].unsqueeze(-1)).squeeze(-1)
        seq = picked.nonzero()[:, 0]
        seq_logprob = torch.zeros(input_ids.shape[0], device=logits.device).index_add(0, seq, token_logprob)
        ce = -token_logprob.mean()
        balance = self.balance_loss(ce)
        return {"loss": ce + self.balance_coef * balance, "ce": ce, "balance": balance,
                "seq_logprob": seq_logprob, "n_tokens": picked.sum()}

    def balance_loss(self, like: torch.Tensor) -> torch.Tensor:
        """Sum of the Switch balance losses of every top-k LoRA-MoE module in the last forward."""
        losses = [m.balance_loss for mods in self._adapters_by_layer.values() for m in mods
                  if m.balance_loss is not None]
        return torch.stack(losses).sum() if losses else like.new_zeros(())

    def dropped_picks(self) -> torch.Tensor:
        """(token, expert) picks the capacity rule dropped in the last forward, over all modules."""
        counts = [m.dropped for mods in self._adapters_by_layer.values() for m in mods if m.dropped is not None]
        return torch.stack(counts).sum().float() if counts else torch.zeros(())

    def active_parameters_per_token(self) -> float:
        """Adapter parameters a token used on average since the modules' last reset_activity (summed
        over modules; padding positions count as tokens)."""
        return sum(m.active_parameters_per_token() for mods in self._adapters_by_layer.values() for m in mods)

    def reset_activity(self) -> None:
        for mods in self._adapters_by_layer.values():
            for m in mods:
                m.reset_activity()

    def expert_load(self) -> dict[int, torch.Tensor]:
        """Per layer, the mean share of routing weight each expert received in the last forward."""
        out = {}
        for layer, mods in self._adapters_by_layer.items():
            loads = [m.expert_load for m in mods if m.expert_load is not None]
            if loads and all(x.shape == loads[0].shape for x in loads):
                out[layer] = torch.stack(loads).mean(0)
        return out

