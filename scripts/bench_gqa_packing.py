"""How the `triton` backend packs a GQA group into its forward and dq programs, timed both ways on one GPU.

Each program computes a tile of query tokens for all the query heads of one KV head, as one MMA of a power-of-two
number of rows (``prefix_attn.triton.common.packed_rows``). The default fills 64 rows with as many tokens as fit
(a group of 7: 9 tokens, 63 rows). The other way, ``pow2``, takes 64 / next_pow2(group) tokens (a group of 7: 8
tokens, 56 real rows of 64): the rows a program padded per token to a power of two of heads gets. Everything else
(the KV-major kernel, tiles of keys) is the same.

For each head count, on one ~16K-token row of ``--layout``: forward and forward+backward of both (do_bench medians,
then the median over ``--rounds`` rounds timed in alternating order), their ratio, and the largest relative
difference of (out, dq, dk, dv) between them. A CSV row per (heads, packing) goes to ``--csv`` (default
``$OUT/bench_gqa_packing.csv``), with the GPU, versions, date and command.

    python scripts/bench_gqa_packing.py --heads 32/8 24/8 40/8 24/4 28/4
"""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import replace

import torch

from prefixdpo.benchmarks import LAYOUTS, append_csv, make_layout, run_metadata, triton_attention_calls


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", nargs="+", default=["32/8", "24/8", "40/8", "24/4", "28/4"],
                    help="query/KV heads (groups 4, 3, 5, 6, 7 by default)")
    ap.add_argument("--layout", default="p700_r300x2_g7", choices=sorted(LAYOUTS))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)

    import triton

    from prefix_attn import triton as ta

    dev = torch.device("cuda")
    dtype, D = torch.bfloat16, args.head_dim
    csv_path = args.csv or os.path.join(os.environ.get("OUT", "."), "bench_gqa_packing.csv")
    meta = run_metadata()
    lay = make_layout(args.layout, args.tokens, dev)
    T = lay.total_tokens
    print(f"# {meta['gpu']}, torch {meta['torch']}, triton {meta.get('triton')}; {args.layout}: {T} tokens, D={D} bf16")
    print(f"{'heads':>6} {'group':>5} {'tokens':>11} {'fwd ms':>15} {'fwd x':>6} {'f+b ms':>15} {'f+b x':>6} "
          f"{'max rel diff':>12}")
    for spec in args.heads:
        hq, hkv = (int(x) for x in spec.split("/"))
        g = hq // hkv
        best = ta.default_config(D, dtype, dev, g)
        pow2 = max(64 // triton.next_power_of_2(g), 8)
        old = replace(best, fwd_block_m=pow2, dq_block_m=pow2)
        gen = torch.Generator(device=dev).manual_seed(0)
        q, k, v, do = (torch.randn(T, h, D, device=dev, generator=gen, dtype=dtype) for h in (hq, hkv, hkv, hq))
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        fns, outs = {}, {}
        for name, cfg in (("pow2", old), ("fill", best)):
            fns[name] = triton_attention_calls(q, k, v, do, lay, cfg)
            outs[name] = fns[name][1]()  # also compiles
        # Rounds in alternating order, medians over them: the GPU's clock drifts within a call (a config timed
        # against itself moves a few percent from the first timing to the second).
        runs = {name: ([], []) for name in fns}
        for r in range(args.rounds):
            for name in (("pow2", "fill") if r % 2 == 0 else ("fill", "pow2")):
                for fn, out in zip(fns[name], runs[name]):
                    out.append(triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median"))
        times = {name: tuple(statistics.median(x) for x in runs[name]) for name in fns}
        for name, cfg in (("pow2", old), ("fill", best)):
            append_csv(csv_path, {"heads": spec, "group": g, "packing": name, "tokens_per_tile": cfg.fwd_block_m,
                                  "layout": args.layout, "tokens": T, "head_dim": D, "rounds": args.rounds,
                                  "fwd_ms": round(times[name][0], 4), "fwd_bwd_ms": round(times[name][1], 4), **meta})
        diff = max(((a.float() - b.float()).norm() / b.float().norm()).item()
                   for a, b in zip(outs["fill"], outs["pow2"]))
        (f0, b0), (f1, b1) = times["pow2"], times["fill"]
        print(f"{spec:>6} {g:>5} {old.fwd_block_m:>4} -> {best.fwd_block_m:<4} {f0:>6.3f} -> {f1:<6.3f} "
              f"{f0 / f1:>6.2f} {b0:>6.3f} -> {b1:<6.3f} {b0 / b1:>6.2f} {diff:>12.2e}", flush=True)
    print(f"CSV appended: {csv_path}")


if __name__ == "__main__":
    main()
