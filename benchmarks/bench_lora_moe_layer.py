"""Where one LoRA-MoE layer's time goes, and what the concatenated-expert dispatch saves.

    python benchmarks/bench_lora_moe_layer.py                  # Llama-3-8B shapes, 8,192 tokens (GPU)
    python benchmarks/bench_lora_moe_layer.py --tokens 512     # CPU-sized

Forward + backward (gradients for the input and the adapters) over an NF4 base, median of --reps (the
variants taken in turn within each repetition), for the q_proj (4096 -> 4096) and up_proj (4096 -> 14336)
shapes of Llama-3-8B:

* ``base``        the frozen 4-bit linear alone;
* ``+router``     base + router (softmax, top-k, gates, balance loss), no expert, eager;
* ``floe-dist``   LoRAMoELinear: experts concatenated along the rank, two matmuls for all of them, eager
                  router (the default everywhere until the fused router has passed tests/gpu on a GPU);
* ``+router fused``, ``floe-dist fused``  the same with the router and the gate broadcast compiled
                  (``fuse_router``, opt-in: ``FLOE_DIST_FUSED_ROUTER=1``);
* ``fused, 3 graphs`` the fused path as first built: routing, balance loss and gate broadcast as three
                  compiled graphs, where floe-dist fused compiles routing and broadcast as one (a compiled
                  call has a fixed host cost);
* ``gather``      an older dispatch, kept for comparison: the gate gathered per rank column (its backward is an
                  accumulating index_put) instead of broadcast over a (tokens, experts, rank) view;
* ``loop``        the reference dispatch of MoLA/MixLoRA-style code: a Python loop over experts, each
                  gathering its tokens, two matmuls, and scattering back (index_add);
* ``lora``        a plain LoRA with the same parameters (rank E*r): the floor the MoE aims for.

Differences between rows place the time: router = ``+router`` - ``base``, experts = ``floe-dist`` -
``+router`` (likewise for the fused rows, there roughly: ``+router fused`` compiles the routing alone, the
layer compiles it with the gate broadcast). Every row with a router back-propagates the balance loss, as
training does (calls 1 and 2 in the result file, before the fused rows, left it out of the ``floe-dist``
row's backward, understating the experts' share). Then a torch.profiler table of the fused floe-dist
forward + backward by operator.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.result_file import write_result  # noqa: E402
from floe_dist.modeling.backbone import nf4_linear  # noqa: E402
from floe_dist.modeling.lora_moe import LoRAMoELinear, balance_loss, broadcast_gates, compiled, topk_route  # noqa: E402


def random_nf4_linear(d_in: int, d_out: int, dtype: torch.dtype, device: torch.device):
    linear = torch.nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(d_out, d_in, device=device, dtype=dtype) * d_in ** -0.5)
    return nf4_linear(linear, dtype)


def loop_delta(layer: LoRAMoELinear, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Token-sparse reference: per expert, gather its tokens, A then B, scatter-add back."""
    out = torch.zeros(x.shape[0], layer.out_features, device=x.device, dtype=x.dtype)
    start = 0
    for e, r in enumerate(layer.ranks):
        idx = (layer.top_i == e).any(-1).nonzero().squeeze(-1)
        a, b = layer.lora_A[start:start + r], layer.lora_B[:, start:start + r]
        start += r
        if idx.numel():
            h = F.linear(F.linear(x[idx], a), b) * (gates[idx, e:e + 1] * layer.alpha / r).to(x.dtype)
            out = out.index_add(0, idx, h)
    return out


def gather_delta(layer: LoRAMoELinear, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """floe-dist's dense dispatch before the broadcast gate: the gate gathered per rank column."""
    h = F.linear(x, layer.lora_A)
    h = h * (gates[:, layer.expert_of_col] * layer.col_scale).to(h.dtype)
    return F.linear(h, layer.lora_B)


def make_variants(layer: LoRAMoELinear, lora_a: torch.Tensor, lora_b: torch.Tensor):
    def base(x):
        return layer.base(x)

    def router_only(x):
        y = layer.base(x)
        gates = layer.route(x)
        return y + (gates.sum() * 0 + layer.balance_loss).to(y.dtype)

    def floe(x):
        y = layer(x)
        return y + layer.balance_loss.to(y.dtype) * 0

    def fused(fn):
        """fn with the compiled router; the forward picks the path, its backward follows."""
        def run(x):
            layer.fuse_router = True
            try:
                return fn(x)
            finally:
                layer.fuse_router = False
        return run

    def three_graphs(x):
        """The fused path as first built: routing, balance loss and gate broadcast as three compiled graphs
        (the layer now compiles routing and broadcast as one); each compiled call has a fixed host cost."""
        y = layer.base(x)
        logits = layer.lora_router(x)
        gates, prob_sum, *_, stats = compiled(topk_route)(logits, layer.top_k, layer.top_p, layer.min_k,
                                                          layer.capacity_factor)
        h = compiled(broadcast_gates)(F.linear(x, layer.lora_A), gates, layer.expert_scale, False)
        return y + F.linear(h, layer.lora_B).to(y.dtype) + compiled(balance_loss)(prob_sum, stats).to(y.dtype) * 0

    def gathered(x):
        y = layer.base(x)
        gates = layer.route(x)
        return y + gather_delta(layer, x, gates).to(y.dtype) + layer.balance_loss.to(y.dtype) * 0

    def loop(x):
        y = layer.base(x)
        gates = layer.route(x)
        return y + loop_delta(layer, x, gates).to(y.dtype) + layer.balance_loss.to(y.dtype) * 0

    def lora(x):
        return layer.base(x) + F.linear(F.linear(x, lora_a), lora_b) * (layer.alpha / lora_a.shape[0])

    return {"base": base, "+router": router_only, "floe-dist": floe, "+router fused": fused(router_only),
            "floe-dist fused": fused(floe), "fused, 3 graphs": three_graphs, "gather": gathered, "loop": loop,
            "lora": lora}


def time_fwd_bwd(variants: dict, x: torch.Tensor, grad: torch.Tensor, reps: int, warmup: int) -> dict[str, float]:
    """Median milliseconds of fn(x).backward(grad) per variant, the variants taken in turn within each
    repetition: a slow spell of a shared machine then hits every row alike instead of the rows timed in it."""
    cuda = x.is_cuda
    times = {name: [] for name in variants}
    for i in range(warmup + reps):
        for name, fn in variants.items():
            x.grad = None
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            else:
                t0 = time.perf_counter()
            fn(x).backward(grad)
            if cuda:
                end.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(end)
            else:
                ms = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                times[name].append(ms)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--shapes", default="4096x4096,4096x14336")
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table")
    parser.add_argument("--call", type=int, default=3, help="label of this run in the result file (its rows replace "
                        "that call's; calls 1 and 2 are session 7's)")
    parser.add_argument("--result", default=None, help="result file name (default lora_moe_layer on a GPU; on CPU "
                        "nothing is written unless this is given)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, {dtype}, "
          f"{args.tokens} tokens, {args.experts} experts x rank {args.rank}, top-{args.top_k}")
    rows = []
    for shape in args.shapes.split(","):
        d_in, d_out = map(int, shape.split("x"))
        torch.manual_seed(0)
        layer = LoRAMoELinear(random_nf4_linear(d_in, d_out, dtype, device), [args.rank] * args.experts, "topk", args.top_k)
        layer.fuse_router = False  # the eager rows; fused() switches it on for the fused ones
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.02)  # B = 0 (init) would make the loop-vs-concat check vacuous
        for p in (layer.lora_A, layer.lora_B, layer.lora_router.weight):
            p.data = p.data.to(dtype)  # what a bf16 DeepSpeed engine does to the trainable tensors
        lora_a = torch.randn(args.rank * args.experts, d_in, device=device, dtype=dtype, requires_grad=True)
        lora_b = torch.randn(d_out, args.rank * args.experts, device=device, dtype=dtype, requires_grad=True)
        x = torch.randn(args.tokens, d_in, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(args.tokens, d_out, device=device, dtype=dtype)
        variants = make_variants(layer, lora_a, lora_b)
        ref = variants["floe-dist"](x)
        check = variants["loop"](x)
        err = float((check - ref).detach().float().norm() / ref.detach().float().norm())
        fused_err = float((variants["floe-dist fused"](x) - ref).detach().float().norm()
                          / ref.detach().float().norm())
        # the product path (eager unless FLOE_DIST_FUSED_ROUTER=1) is timed twice: their spread is the noise floor
        product = "floe-dist"
        times = time_fwd_bwd({**variants, "product (again)": variants[product]}, x, grad, args.reps, args.warmup)
        rows.append((shape, times, err, fused_err))
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=acts) as prof:
                for _ in range(5):
                    variants["floe-dist fused"](x).backward(grad)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(f"\nprofile {shape}, 5 x forward+backward of LoRAMoELinear, fused router:")
            print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=48))

    print("\n| shape d_in x d_out | base ms | +router ms | floe-dist ms | +router fused ms | floe-dist fused ms "
          "| fused, 3 graphs ms | gather ms | loop ms | lora (same params) ms | router share (eager / fused) "
          "| fused / eager "
          "| floe-dist fused / lora | floe-dist / lora | loop / floe-dist | product path rerun ms "
          "| loop, fused rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape, t, err, fused_err in rows:
        share = (t["+router"] - t["base"]) / t["floe-dist"], (t["+router fused"] - t["base"]) / t["floe-dist fused"]
        print(f"| {shape} | {t['base']:.3f} | {t['+router']:.3f} | {t['floe-dist']:.3f} | {t['+router fused']:.3f} "
              f"| {t['floe-dist fused']:.3f} | {t['fused, 3 graphs']:.3f} | {t['gather']:.3f} | {t['loop']:.3f} "
              f"| {t['lora']:.3f} "
              f"| {share[0]:.1%} / {share[1]:.1%} | {t['floe-dist fused'] / t['floe-dist']:.2f} "
              f"| {t['floe-dist fused'] / t['lora']:.2f} | {t['floe-dist'] / t['lora']:.2f} "
              f"| {t['loop'] / t['floe-dist']:.2f} | {t['product (again)']:.3f} | {err:.1e}, {fused_err:.1e} |")
    if device.type != "cuda" and not args.result:
        return  # a CPU smoke run does not replace the GPU figures in benchmarks/results/
    write_result(args.result or "lora_moe_layer", [
        {"call": args.call, "shape": shape, "tokens": args.tokens, "base_ms": t["base"], "router_ms": t["+router"],
         "floe_ms": t["floe-dist"], "router_fused_ms": t["+router fused"], "floe_fused_ms": t["floe-dist fused"],
         "fused_three_graphs_ms": t["fused, 3 graphs"], "gather_ms": t["gather"], "loop_ms": t["loop"],
         "lora_ms": t["lora"], "floe_rerun_ms": t["product (again)"],
         "loop_over_floe": t["loop"] / t["floe-dist"], "gather_over_floe": t["gather"] / t["floe-dist"],
         "floe_over_lora": t["floe-dist"] / t["lora"], "floe_fused_over_lora": t["floe-dist fused"] / t["lora"],
         "fused_over_eager": t["floe-dist fused"] / t["floe-dist"], "loop_rel_diff": err, "fused_rel_diff": fused_err,
         "balance_in_backward": True} for shape, t, err, fused_err in rows],
        merge_key="call", device=str(device), dtype=str(dtype))


if __name__ == "__main__":
    main()
