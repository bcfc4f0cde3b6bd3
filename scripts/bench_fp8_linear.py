"""Would FP8 linear layers pay in the reference model (issue 6)? Measure before building them into the trainer.

One GPU, bench_e2e's random-init Llama-3.2-1B shape, bf16, one packed prefix-shared row of synthetic pairs. The
reference model's forward (backbone + LM head at the response positions) is timed three ways:

- ``bf16``: as the trainer runs it (bf16 linears, triton attention);
- ``fp8``: every linear layer of the decoder through ``torch._scaled_mm`` with e4m3 operands: weights quantized once
  with one fp32 scale per output row, activations quantized on the fly with one scale per token (row-wise scaling,
  the finest ``_scaled_mm`` takes), the quantize written in torch (absmax, divide, cast);
- ``fp8+compiled-quantize``: the same with the quantize compiled by ``torch.compile`` (one fused kernel per call).

and the per-sequence summed log-probs of the FP8 runs are compared with bf16's (relative difference, max and median,
against the 0.5% the issue allows). The attention stays bf16 in all three (``ref_attn_backend`` covers it).

    python scripts/bench_fp8_linear.py --tokens 2048 16384
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench_e2e  # noqa: E402

E4M3_MAX = 448.0


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] bf16 -> ([M, K] e4m3, [M, 1] fp32 scale) with one absmax scale per row."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


class FP8Linear(torch.nn.Module):
    """Forward-only stand-in for an ``nn.Linear`` (no bias): y = x W^T with e4m3 operands and row-wise scales."""

    def __init__(self, linear: torch.nn.Linear, quantize):
        super().__init__()
        w = linear.weight.detach()
        self.w_fp8, w_scale = quantize_rows(w)  # [N, K], [N, 1]
        self.w_scale = w_scale.t().contiguous()  # [1, N]
        self.quantize = quantize

    def forward(self, x):
        shape = x.shape
        xq, x_scale = self.quantize(x.reshape(-1, shape[-1]))
        y = torch._scaled_mm(xq, self.w_fp8.t(), scale_a=x_scale, scale_b=self.w_scale, out_dtype=torch.bfloat16)
        return y.view(*shape[:-1], y.shape[-1])


def to_fp8(model, quantize):
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, FP8Linear(child, quantize))
    return model


def packed_row(shape: str, tokens: int, seed: int):
    """Prefix and branch lengths of pairs drawn as bench_e2e draws them, until the row holds ``tokens`` tokens."""
    total, ratio = bench_e2e.SHAPES[shape]
    p_med, c_med = total * ratio / (1 + ratio), total / (1 + ratio)
    rng = random.Random(seed)
    draw = lambda med: max(1, int(round(med * math.exp(rng.gauss(0, 0.5)))))  # noqa: E731
    prefix, branches, used = [], [], 0
    while used < tokens:
        p, c, r = draw(p_med), draw(c_med), draw(c_med)
        prefix.append(p - 1)  # DESIGN.md: the last prompt token opens each branch
        branches.append([1 + c, 1 + r])
        used += p + c + r + 1
    return prefix, branches


def ref_logps(model, ids, layout, labels):
    """Log-probs of the labelled positions: the backbone on the packed row, the LM head only where a label is."""
    out = model.model(input_ids=ids, position_ids=layout.position_ids[None], prefix_layout=layout,
                      prefix_attn_backend="triton", use_cache=False)
    mask = labels >= 0
    logits = model.lm_head(out.last_hidden_state[0][mask]).float()
    return torch.log_softmax(logits, -1).gather(1, labels[mask][:, None])[:, 0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 16384])
    ap.add_argument("--dataset", default="capybara", choices=list(bench_e2e.SHAPES))
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, LlamaConfig

    from prefix_attn import PrefixLayout
    from prefixdpo.modeling.attention import install

    torch.manual_seed(0)
    with torch.device("cuda"):
        base = AutoModelForCausalLM.from_config(LlamaConfig(**bench_e2e.MODELS["llama-1b"]), dtype=torch.bfloat16)
    base.eval().requires_grad_(False)
    install(base)
    compiled_quantize = torch.compile(quantize_rows, dynamic=True)
    variants = {"bf16": base, "fp8": to_fp8(copy.deepcopy(base), quantize_rows),
                "fp8+compiled-quantize": to_fp8(copy.deepcopy(base), compiled_quantize)}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| tokens | variant | ref forward ms | x bf16 | max rel. logp diff | median rel. logp diff |")
    print("|---|---|---|---|---|---|")
    for tokens in args.tokens:
        prefix, branches = packed_row(args.dataset, tokens, seed=tokens)
        layout = PrefixLayout.from_lengths(prefix, branches, device="cuda")
        T = layout.total_tokens
        ids = torch.randint(0, 128256, (1, T), device="cuda")
        # Labels: a branch token predicts the next token of its branch; the last token of each branch predicts none.
        labels = torch.full((T,), -100, device="cuda")
        seg = torch.full((T,), -1, device="cuda")
        pos, b = 0, 0
        for p, brs in zip(prefix, branches):
            pos += p
            for n in brs:
                labels[pos:pos + n - 1] = ids[0, pos + 1:pos + n]
                seg[pos:pos + n - 1] = b
                pos, b = pos + n, b + 1
        times, sums = {}, {}
        with torch.no_grad():
            for name, model in variants.items():
                for _ in range(3):
                    ref_logps(model, ids, layout, labels)
                torch.cuda.synchronize()
                ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(args.iters)]
                for e0, e1 in ev:
                    e0.record()
                    lp = ref_logps(model, ids, layout, labels)
                    e1.record()
                torch.cuda.synchronize()
                times[name] = statistics.median(e0.elapsed_time(e1) for e0, e1 in ev)
                m = labels >= 0
                sums[name] = torch.zeros(b, device="cuda", dtype=torch.float64).index_add_(0, seg[m], lp.double())
        for name in variants:
            rel = ((sums[name] - sums["bf16"]).abs() / sums["bf16"].abs()).cpu()
            print(f"| {T} | {name} | {times[name]:.2f} | {times['bf16'] / times[name]:.2f}x | "
                  f"{100 * rel.max():.3f}% | {100 * rel.median():.3f}% |")


if __name__ == "__main__":
    main()
