"""The program Nsight Compute profiles (scripts/ncu_attention.sh): one forward + backward of our Triton attention on a
16K-token row, after warm-up, inside ``cudaProfilerStart/Stop`` so that ``ncu --profile-from-start off`` sees only
the timed call: the forward kernel (``fwd_kernel``), the KV-major backward
(``bwd_kv_kernel``) and the dq kernel (``bwd_dq_kernel``), one launch each. The schedule build and
the compiles happen during the warm-up, outside the profiled range.

    python scripts/ncu_attention.py --variant default --layout p2048_r256x2   # alone: prints the timed call's ms
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from prefixdpo.benchmarks import LAYOUTS, SWEEP_VARIANTS, make_layout


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="default", choices=sorted(SWEEP_VARIANTS))
    ap.add_argument("--layout", default="p2048_r256x2", choices=sorted(LAYOUTS))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)

    from prefix_attn import triton as ta

    dev = torch.device("cuda")
    Hq, Hkv, D = args.heads, args.kv_heads, args.head_dim
    cfg = replace(ta.default_config(D, torch.bfloat16, dev), **SWEEP_VARIANTS[args.variant])
    lay = make_layout(args.layout, args.tokens, dev)
    T = lay.total_tokens
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(T, h, D, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
               for h in (Hq, Hkv, Hkv))
    do = torch.randn(T, Hq, D, device=dev, dtype=torch.bfloat16, generator=g)

    def step():
        o = ta.triton_prefix_attention(q, k, v, lay, config=cfg)
        return torch.autograd.grad(o, (q, k, v), do)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.cudart().cudaProfilerStart()
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"{args.variant} on {args.layout} (T={T}, pairs={lay.allowed_pairs()}): fwd+bwd {start.elapsed_time(end):.3f} ms "
          f"(under a profiler: replayed kernels, so not a benchmark); config {cfg.as_list()}")


if __name__ == "__main__":
    main()
