"""The CUDA paths: bitsandbytes NF4 kernels under a LoRA-MoE layer, NCCL + bf16 ZeRO-3 training, and an
export trained on the GPU that evaluates the same on CPU. Run on a GPU node: ``pytest -m gpu tests/gpu``
(tests/conftest.py leaves them out where CUDA is absent)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from floe_dist.modeling.backbone import nf4_linear
from floe_dist.modeling.lora_moe import LoRAMoELinear
from tests.conftest import REPO, clean_env, read_metrics, run_floe

pytestmark = pytest.mark.gpu

MOE = ["--experts", "2", "--router", "topk", "--top-k", "1", "--rank", "4", "--targets", "q_proj,v_proj,up_proj",
       "--dropout", "0"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def _nf4(weight: torch.Tensor, device: str):
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return nf4_linear(linear, weight.dtype)


def _dequantized(q) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(q.weight.data, q.weight.quant_state).float()


def test_nf4_cuda_lora_moe_forward_backward_match_a_dequantized_fp32_reference():
    torch.manual_seed(0)
    weight = (torch.randn(384, 256) * 256 ** -0.5).to(torch.bfloat16)
    q = _nf4(weight, "cuda")
    w = _dequantized(q)
    # the CUDA kernel and the CPU backend quantize to the same codes: a base trained on one serves on the other
    w_cpu = _dequantized(_nf4(weight, "cpu"))
    assert (w.cpu() != w_cpu).float().mean() < 1e-4

    layer = LoRAMoELinear(q, [8, 8, 8, 8], "topk", top_k=2)
    ref = LoRAMoELinear(nn.Linear(256, 384, bias=False, device="cuda"), [8, 8, 8, 8], "topk", top_k=2)
    with torch.no_grad():
        nn.init.normal_(layer.lora_B, std=0.05)
        ref.base.weight.copy_(w)
        for name in ("lora_A", "lora_B", "lora_router.weight"):
            ref.get_parameter(name).copy_(layer.get_parameter(name))
    assert layer.lora_A.is_cuda and layer.lora_A.dtype == torch.float32  # adapters stay fp32 over a 4-bit base

    x = torch.randn(4, 16, 256, device="cuda").to(torch.bfloat16).requires_grad_()
    xr = x.detach().float().requires_grad_()  # same values: the routing must pick the same experts
    y, yr = layer(x), ref(xr)
    assert y.dtype == torch.bfloat16
    assert torch.equal(layer.top_i, ref.top_i)
    assert _rel(y, yr) < 1e-2  # bf16 output of the NF4 kernel vs fp32 on the dequantized weight
    grad = torch.randn_like(yr).to(torch.bfloat16)
    y.backward(grad)
    yr.backward(grad.float())
    for name in ("lora_A", "lora_B", "lora_router.weight"):
        g, gr = layer.get_parameter(name).grad, ref.get_parameter(name).grad
        assert g is not None and _rel(g, gr) < 1e-4, name  # the adapter path is fp32 on both sides
    assert _rel(x.grad, xr.grad) < 2e-2  # through MatMul4Bit's CUDA backward
    assert layer.base.weight.grad is None


def test_the_fused_router_on_cuda_equals_the_eager_default():
    """The compiled router (Triton kernels), asked for, gives the same picks, outputs and gradients as the
    op-by-op router that CUDA runs by default (the CPU test checks the same on inductor's C++ code). Its passing
    on a GPU is what the fused router needs before it may become CUDA's default."""
    runs = []
    for fuse in (True, None):
        torch.manual_seed(0)
        layer = LoRAMoELinear(nn.Linear(256, 384, device="cuda"), [8, 8, 8, 8], "topk", top_k=2)
        nn.init.normal_(layer.lora_B, std=0.05)
        layer.fuse_router = fuse
        x = torch.randn(3, 50, 256, device="cuda", requires_grad=True)
        y = layer(x)
        (y.square().sum() + layer.balance_loss).backward()
        runs.append((layer, y, x.grad))
    (fused, y_fused, gx_fused), (eager, y_eager, gx_eager) = runs
    assert fused._fused(y_fused) and not eager._fused(y_eager)
    assert torch.equal(fused.top_i, eager.top_i)
    assert _rel(y_fused, y_eager) < 1e-5 and _rel(gx_fused, gx_eager) < 1e-5
    for name in ("lora_A", "lora_B", "lora_router.weight"):
        assert _rel(fused.get_parameter(name).grad, eager.get_parameter(name).grad) < 1e-5, name


def assert_trained(run_dir) -> None:
    """Training really happened: the loss fell and every exported lora_B (zero at init) moved off zero,
    so an equality check that follows cannot pass on an optimizer that never steps."""
    from safetensors.torch import load_file

    losses = [m["loss"] for m in read_metrics(run_dir)]
    assert min(losses[-2:]) < losses[0], losses
    tensors = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    b = [t for name, t in tensors.items() if "lora_B" in name]
    assert b and all(t.float().abs().max() > 0 for t in b)


def test_nf4_zero3_bf16_training_on_gpu_matches_zero0(tmp_path):
    """The automatic GPU choices (NCCL, bf16, fused AdamW, NF4 CUDA kernels) under ZeRO-3 and ZeRO-0 agree."""
    common = ["train", "--model", "tiny", "--steps", "8", "--micro-batch", "4", "--quant", "nf4", "--balance-coef", "0",
              "--checkpoint-every", "0", "--lr", "3e-3", *MOE]
    run_floe([*common, "--zero", "3", "--output", str(tmp_path / "z3")])
    run_floe([*common, "--zero", "0", "--output", str(tmp_path / "z0")])
    assert_trained(tmp_path / "z3")
    assert_trained(tmp_path / "z0")
    z3, z0 = read_metrics(tmp_path / "z3"), read_metrics(tmp_path / "z0")
    assert len(z3) == len(z0) == 8
    for a, b in zip(z3, z0):
        assert math.isfinite(a["loss"]) and a["grad_norm"] > 0
        assert abs(a["loss"] - b["loss"]) <= 2e-2 * abs(a["loss"])  # bf16 arithmetic, different reduction order
    assert (tmp_path / "z3" / "adapter" / "adapter_model.safetensors").is_file()


def _evaluate(adapter, cuda: bool) -> dict:
    code = ("import json, sys; from floe_dist.recipe import load_recipe; from floe_dist.stages.evaluate import run; "
            "print('RESULT', json.dumps(run(load_recipe(None, ['--model.name', 'tiny', '--model.adapter', "
            f"{str(adapter)!r}, '--model.quant', 'nf4', '--evaluate.limit', '32', '--evaluate.batch_size', '16']))))")
    env = {**clean_env(1), **({} if cuda else {"CUDA_VISIBLE_DEVICES": ""})}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))


def test_adapter_trained_on_gpu_evaluates_the_same_on_cpu(tmp_path):
    out = tmp_path / "run"
    run_floe(["train", "--model", "tiny", "--steps", "8", "--micro-batch", "4", "--quant", "nf4", "--zero", "3",
              "--checkpoint-every", "0", "--lr", "1e-2", *MOE, "--output", str(out)])
    assert_trained(out)  # B is non-zero, so the adapter changes what both devices evaluate
    gpu, cpu = _evaluate(out / "adapter", cuda=True), _evaluate(out / "adapter", cuda=False)
    assert gpu["examples"] == cpu["examples"] == 32
    assert abs(gpu["choice_loss"] - cpu["choice_loss"]) <= 2e-2 * abs(cpu["choice_loss"])
    assert abs(gpu["accuracy"] - cpu["accuracy"]) <= 2 / 32  # a near-tie may flip in bf16


def test_more_local_ranks_than_gpus_is_a_clear_error(tmp_path):
    gpus = torch.cuda.device_count()
    proc = run_floe(["train", "--model", "tiny", "--steps", "1", "--output", str(tmp_path / "x")], nproc=gpus + 1,
                    check=False, timeout=300)
    assert proc.returncode != 0
    assert f"this node has {gpus} GPU(s)" in proc.stderr
    assert not (tmp_path / "x" / "checkpoints").exists()
