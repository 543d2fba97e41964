"""Backbones: NF4 quantization of a model made from a config; the model cache's build-once folders."""
from __future__ import annotations

import torch
from torch import nn


def test_quantize_nf4_swaps_decoder_linears_and_keeps_the_function():
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    from transformers import LlamaConfig, LlamaForCausalLM

    from floe_dist.modeling.backbone import TINY_CONFIG, quantize_nf4_
    from floe_dist.modeling.inject import find_layer_linears

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, **TINY_CONFIG))
    reference = LlamaForCausalLM(model.config)
    reference.load_state_dict(model.state_dict())
    quantize_nf4_(model, torch.float32)

    linears = [m for mods in find_layer_linears(model).values() for _, m in mods.values()]
    assert len(linears) == 4 * 7 and all(isinstance(m, bnb.nn.Linear4bit) for m in linears)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, bnb.nn.Linear4bit)
    assert model.is_loaded_in_4bit  # PEFT wraps Linear4bit only on models that say so
    # the quantized model computes what the fp32 model does with the dequantized weights
    with torch.no_grad():
        for ref, q in zip((m for mods in find_layer_linears(reference).values() for _, m in mods.values()), linears):
            ref.weight.copy_(bnbf.dequantize_4bit(q.weight.data, q.weight.quant_state))
        ids = torch.randint(128, (2, 9))
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)


def test_nf4_layers_evaluate_as_they_train_whatever_the_cpu():
    """bitsandbytes computes a Linear4bit in eval mode without gradients in bf16 on a CPU with AVX512-BF16 (off
    in floe-dist): evaluation must give what the layers compute in training, loaded or quantized in memory."""
    from floe_dist.modeling.backbone import load_backbone, nf4_linear, resolve_model

    torch.manual_seed(0)
    layer, x = nf4_linear(nn.Linear(64, 32)), torch.randn(3, 64)
    model, ids = load_backbone(resolve_model("tiny"), "nf4"), torch.arange(24).view(2, 12) + 7
    with torch.no_grad():  # training first: bitsandbytes' bf16 path repacks the weights it then uses in any mode
        trained = layer.train()(x), model.train()(input_ids=ids).logits
        evaluated = layer.eval()(x), model.eval()(input_ids=ids).logits
    assert torch.equal(evaluated[0], trained[0]) and torch.equal(evaluated[1], trained[1])


def test_an_incomplete_cached_model_folder_is_rebuilt_not_published_over(tmp_path, monkeypatch):
    """A folder without config.json (an interrupted copy) is replaced; a complete one is reused as is."""
    from floe_dist.modeling import backbone

    tokenizer = backbone.resolve_model("tiny").parent / "smollm2-tokenizer"  # the real cache's, reused
    monkeypatch.setenv("FLOE_DIST_CACHE", str(tmp_path))
    (tmp_path / "tiny-llama").mkdir()
    (tmp_path / "tiny-llama" / "model.safetensors").write_text("truncated")
    (tmp_path / "smollm2-tokenizer").symlink_to(tokenizer)
    built = backbone.resolve_model("tiny")
    assert built == tmp_path / "tiny-llama" and (built / "config.json").is_file()
    assert not list(tmp_path.glob("tiny-llama.*[0-9]"))  # no tmp or stale folders left behind
    marker = built / "marker"
    marker.write_text("kept")
    assert backbone.resolve_model("tiny") == built and marker.is_file()
