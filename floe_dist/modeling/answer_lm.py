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

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Padded rows are masked by ``attention_mask``; packed rows come with ``position_ids`` that restart at
        every example, and without a mask the decoder builds its block-diagonal causal mask from them
        (``floe_dist.data.collate_labelled``)."""
        mask = attention_mask if position_ids is None else None
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=mask,
                                       position_ids=position_ids).last_hidden_state
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

    @torch.no_grad()
    def choice_logprobs(self, prompts: list[list[int]], choices: list[list[list[int]]], pad_id: int
                        ) -> list[list[float]]:
        """Summed log-probability of every choice given its prompt, each prompt run once and its KV cache
        reused for every choice: about 1/n_choices of the work of scoring each prompt + choice pair.

        Prompts are left-padded (positions count from each prompt's first token) and choices right-padded
        after them, the layout of batched generation. Every prompt must be non-empty."""
        device = self.lm.get_input_embeddings().weight.device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
        ids, mask = ids.to(device), mask.to(device)
        decoder, head = self.lm.get_decoder(), self.lm.get_output_embeddings()
        out = decoder(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                      use_cache=True)
        cache, lengths = out.past_key_values, mask.sum(1, keepdim=True)
        first = head(out.last_hidden_state[:, -1]).float().log_softmax(-1)  # predicts every choice's 1st token
        scores = [[0.0] * len(c) for c in choices]
        for c in range(max(len(cs) for cs in choices)):
            answers = [cs[c] if c < len(cs) else cs[0] for cs in choices]  # a stand-in where a row has fewer
            rest = max(len(a) for a in answers) - 1
            logprob = first.gather(1, torch.tensor([[a[0]] for a in answers], device=device)).squeeze(1)
            if rest > 0:  # tokens 2.. of each choice, predicted from tokens 1.. after the prompt's cache
                cont = torch.full((len(answers), rest), pad_id, dtype=torch.long)
                picked = torch.zeros((len(answers), rest), dtype=torch.bool)
                target = torch.zeros((len(answers), rest), dtype=torch.long)
                for i, a in enumerate(answers):
                    cont[i, :len(a) - 1], target[i, :len(a) - 1] = torch.tensor(a[:-1]), torch.tensor(a[1:])
                    picked[i, :len(a) - 1] = True
                cont, picked, target = cont.to(device), picked.to(device), target.to(device)
                hidden = decoder(input_ids=cont, attention_mask=torch.cat([mask, picked.long()], 1),
                                 position_ids=lengths + torch.arange(rest, device=device), past_key_values=cache,
                                 use_cache=True).last_hidden_state
                cache.crop(-rest)  # back to the prompts alone for the next choice
                token = head(hidden[picked]).float().log_softmax(-1).gather(-1, target[picked].unsqueeze(-1))
                logprob = logprob.index_add(0, picked.nonzero()[:, 0], token.squeeze(-1))
            for i, value in enumerate(logprob.tolist()):
                if c < len(choices[i]):
                    scores[i][c] = value
        return scores

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

