"""Attention kernel benchmark: our Triton kernel vs FlashAttention-4 on the same layout (the `fa4` backend's
decomposition) vs FlexAttention (same layout) vs dense causal attention (cuDNN SDPA, and FlashAttention-4's own).

One GPU, one packed row of ~16K tokens, Llama-3-8B attention shape by default (32 query heads, 8 KV heads, head dim
128, bf16; a layout may name its own heads). For each layout it times the forward and forward+backward
(triton.testing.do_bench, median, after warm-up, random inputs) and prints effective TFLOP/s over the (query, key)
pairs each computation is asked for: the layout's allowed pairs for ours, fa4 and Flex (forward 4*Hq*D*pairs,
backward 2.5x that), T(T+1)/2 for dense causal. FlashAttention-4 rows appear where ``flash_attn.cute`` imports. It also times the layout/schedule build next to FlexAttention's ``create_block_mask``. A CSV row per
(layout, implementation) is appended to ``--csv`` (default ``$OUT/bench_attention.csv`` when OUT is set, else
``bench_attention.csv``), with the GPU name, versions, date and command.

    python scripts/bench_attention.py                      # the table
    python scripts/bench_attention.py --sweep              # also time the config variants (SWEEP_VARIANTS) first
    python scripts/bench_attention.py --sweep --sweep-only # only the variant table (two layouts, ~3 min)
    python scripts/bench_attention.py --fp8-only           # FP8 forward vs ours: speed, accuracy (--fp8: after)
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import sys
import time
from dataclasses import replace

import torch

from prefixdpo.benchmarks import LAYOUTS, SWEEP_VARIANTS, layout_heads, make_layout, triton_attention_calls


def bench(fn, warmup=25, rep=100):
    import triton

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def host_median_ms(fn, n):
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def device_median_ms(fn, n):
    """Median GPU time of ``fn`` between two events, after a sync (so no earlier work is queued): what the build
    costs the device, as opposed to the host wall time of host_median_ms (Python, launch overhead, the sync)."""
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run_sweep(args, ta, base, inputs, dev, Hq, D, csv_path, command, gpu):
    """Time every SWEEP_VARIANTS entry on each --sweep-layouts row: forward and fwd+bwd (do_bench medians, short
    reps), effective TFLOP/s, and the largest relative difference of (out, dq, dk, dv) against the default config.
    Prints one compact table, appends a CSV (``*_sweep.csv`` beside --csv) and returns the name of the fastest fwd+bwd
    variant (summed over the layouts) among those within 2e-2 of the default. Compiles dominate the time (~3 kernels x a few
    seconds per variant); the timing itself is ~0.4 s per (variant, layout)."""
    names = args.sweep_variants or list(SWEEP_VARIANTS)
    rows = []
    for lname in args.sweep_layouts:
        lay = make_layout(lname, args.tokens, dev)
        T = lay.total_tokens
        q, k, v, do = inputs(T, 0)
        pairs = lay.allowed_pairs()
        ref_o = ta.triton_prefix_attention(q, k, v, lay, config=base)
        ref = (ref_o, *torch.autograd.grad(ref_o, (q, k, v), do))
        for name in names:
            cfg = replace(base, **SWEEP_VARIANTS[name])
            fwd, step = triton_attention_calls(q, k, v, do, lay, cfg)
            try:
                err = max(rel_err(a, b) for a, b in zip(step(), ref))
                f_ms = bench(fwd, warmup=5, rep=40)
                fb_ms = bench(step, warmup=5, rep=60)
            except Exception as e:  # a variant that does not compile (shared memory, registers) is reported, skipped
                print(f"{lname} {name}: failed {type(e).__name__}: {str(e)[:160]}")
                continue
            fl = 4 * Hq * D * pairs
            rows.append(dict(layout=lname, T=T, variant=name, fwd_ms=f_ms, fwd_tflops=fl / f_ms * 1e-9,
                             fwdbwd_ms=fb_ms, fwdbwd_tflops=3.5 * fl / fb_ms * 1e-9, rel_diff=err,
                             config=str(cfg.as_list())))
        del q, k, v, do, ref, ref_o
        torch.cuda.empty_cache()

    print(f"\n## sweep ({gpu}); rel diff = max over out, dq, dk, dv of |x - default| / |default|")
    print(f"{'layout':<14}{'variant':<30}{'fwd ms':>8}{'TF/s':>6}{'x def':>6}{'f+b ms':>8}{'TF/s':>6}{'x def':>6}"
          f"{'rel diff':>9}")
    for lname in args.sweep_layouts:
        rs = [r for r in rows if r["layout"] == lname]
        d = next((r for r in rs if r["variant"] == "default"), None)
        for r in rs:
            xf = d["fwd_ms"] / r["fwd_ms"] if d else float("nan")
            xb = d["fwdbwd_ms"] / r["fwdbwd_ms"] if d else float("nan")
            print(f"{lname:<14}{r['variant']:<30}{r['fwd_ms']:>8.3f}{r['fwd_tflops']:>6.0f}{xf:>6.2f}"
                  f"{r['fwdbwd_ms']:>8.3f}{r['fwdbwd_tflops']:>6.0f}{xb:>6.2f}{r['rel_diff']:>9.1e}")
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    import triton

    meta = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, date=stamp, command=command)
    sweep_csv = os.path.splitext(csv_path)[0] + "_sweep.csv"
    if rows:
        new = not os.path.exists(sweep_csv)
        with open(sweep_csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) + list(meta))
            if new:
                w.writeheader()
            for r in rows:
                w.writerow({**r, **meta})
        print(f"sweep CSV appended: {sweep_csv}")

    def total(name, key):
        rs = [r for r in rows if r["variant"] == name]
        ok = len(rs) == len(args.sweep_layouts) and all(r["rel_diff"] < 2e-2 for r in rs)
        return sum(r[key] for r in rs) if ok else float("inf")

    fastest_f = min(names, key=lambda n: total(n, "fwd_ms"))
    fastest_fb = min(names, key=lambda n: total(n, "fwdbwd_ms"))
    print(f"fastest forward: {fastest_f}; fastest fwd+bwd: {fastest_fb} (used for the table)")
    return fastest_fb if total(fastest_fb, "fwdbwd_ms") < float("inf") else "default"


FP8_SWEEP = {  # FP8AttentionConfig fields over the default; times the FP8 call (quantize included) per layout
    "default": {},
    # block_m counts query TOKENS, the MMA has block_m x (Hq/Hkv) rows (16 x 4 = 64)
    "pack16_s3": dict(block_m=16, block_n=64, warps=4, stages=3),
    "pack16_n128_s3": dict(block_m=16, block_n=128, warps=4, stages=3),  # 255 regs at D=128
    "pack32_w8_s3": dict(block_m=32, block_n=64, warps=8, stages=3),  # 32 x 4 = 128 rows
}


def run_fp8_sweep(args):
    """``--fp8-sweep``: FP8AttentionConfig variants (FP8_SWEEP) against the bf16 default forward, per layout."""
    from prefix_attn import triton as ta

    dev = torch.device("cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    Hq, Hkv, D = args.heads, args.kv_heads, args.head_dim
    base = ta.fp8_default_config(D, dev, Hq // Hkv)
    print(f"\n## FP8 sweep ({torch.cuda.get_device_name(dev)}); ms = quantize + attention; x bf16 = bf16 ms / fp8 ms")
    print(f"{'layout':<14}{'variant':<26}{'ms':>8}{'TF/s':>6}{'x bf16':>8}{'rel diff':>10}")
    for name in args.layouts:
        lay = make_layout(name, args.tokens, dev)
        T, pairs = lay.total_tokens, lay.allowed_pairs()
        g = torch.Generator(device=dev).manual_seed(3)
        q, k, v = (torch.randn(T, h, D, device=dev, dtype=dtype, generator=g) for h in (Hq, Hkv, Hkv))
        with torch.no_grad():
            ms16 = bench(lambda: ta.triton_prefix_attention(q, k, v, lay))
            ref = ta.triton_prefix_attention(q, k, v, lay)
            for vname, fields_ in FP8_SWEEP.items():
                cfg = replace(base, **fields_)
                try:
                    o = ta.triton_fp8_prefix_attention(q, k, v, lay, config=cfg)
                    ms = bench(lambda: ta.triton_fp8_prefix_attention(q, k, v, lay, config=cfg))
                except Exception as e:  # a config that does not compile (shared memory) is skipped
                    print(f"{name:<14}{vname:<26} failed {type(e).__name__}: {str(e)[:80]}")
                    continue
                print(f"{name:<14}{vname:<26}{ms:>8.3f}{4 * Hq * D * pairs / ms * 1e-9:>6.0f}{ms16 / ms:>8.2f}"
                      f"{rel_err(o, ref):>10.1e}")


def run_fp8(args):
    """``--fp8``: the FP8 forward (``triton_fp8``) against our bf16/fp16 forward, speed and accuracy.

    Speed, per layout (the --tokens row): our 16-bit forward; the FP8 forward without and with rotation, the
    quantize launch included (``fp8 total``), and its two parts alone (``quant``, ``attn``); effective TFLOP/s over
    the allowed pairs (4 * Hq * D * pairs; the quantize step counts as time, not FLOPs) and the ratio to the 16-bit
    forward. Accuracy, per layout on a short row (--fp8-acc-tokens, so float64 fits): relative error
    ||out - ref|| / ||ref|| against ``attention_math`` in float64 of the original inputs, for the 16-bit forward and
    FP8 without / with rotation, on random N(0, 1) inputs and on inputs with outlier channels (4 channels of q and k
    scaled by 10-50x, the same channels in both). CSV rows go to ``*_fp8.csv`` beside --csv.
    """
    import triton

    from prefix_attn import triton as ta
    from prefix_attn.reference import attention_math
    from prefix_attn.triton.fp8 import launch_fp8_forward

    dev = torch.device("cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    Hq, Hkv, D = args.heads, args.kv_heads, args.head_dim
    gpu = torch.cuda.get_device_name(dev)
    command = " ".join([os.path.basename(sys.executable)] + sys.argv)
    csv_path = args.csv or os.path.join(os.environ.get("OUT", "."), "bench_attention.csv")
    cfg16 = ta.default_config(D, dtype, dev, Hq // Hkv)
    cfg8 = ta.fp8_default_config(D, dev, Hq // Hkv)
    ok, why = ta.fp8_supported(dev, dtype, D)
    if not ok:
        print(f"--fp8: triton_fp8 does not run here ({why})")
        return
    print(f"# --fp8 | {gpu} | torch {torch.__version__} | triton {triton.__version__} | {args.dtype} Hq={Hq} "
          f"Hkv={Hkv} D={D} | fp8 config {cfg8}")

    def inputs(T, seed, outliers=0):
        g = torch.Generator(device=dev).manual_seed(seed)
        q, k, v = (torch.randn(T, h, D, device=dev, generator=g) for h in (Hq, Hkv, Hkv))
        if outliers:
            ch = torch.randperm(D, device=dev, generator=g)[:outliers]
            mult = 10 + 40 * torch.rand(outliers, device=dev, generator=g)
            q[:, :, ch] *= mult
            k[:, :, ch] *= mult
        return q.to(dtype), k.to(dtype), v.to(dtype)

    rows = []
    for name in args.layouts:
        lay = make_layout(name, args.tokens, dev)
        T, pairs = lay.total_tokens, lay.allowed_pairs()
        flops = 4 * Hq * D * pairs
        q, k, v = inputs(T, 1)
        out = torch.empty_like(q)
        t8 = ta.fp8_tables(lay, cfg8, D, dtype, Hq // Hkv)  # cached on the layout, as in training
        with torch.no_grad():
            t16 = bench(lambda: ta.triton_prefix_attention(q, k, v, lay, config=cfg16))
            rows.append(dict(kind="speed", layout=name, T=T, impl=args.dtype, pairs=pairs, fwd_ms=t16,
                             quant_ms=float("nan"), attn_ms=t16, tflops=flops / t16 * 1e-9, x_16bit=1.0))
            for rot in (False, True):
                def quant(rot=rot):
                    return ta.quantize_qkv_fp8(q, k, v, cfg8.block_m, cfg8.block_n, rot, cfg8.quant_warps)

                x = quant()
                t_q = bench(quant)
                t_a = bench(lambda: launch_fp8_forward(x, t8.fwd, t8.tokens.ranges, D**-0.5, cfg8, out))
                t_all = bench(lambda rot=rot: ta.triton_fp8_prefix_attention(q, k, v, lay, rotate=rot, config=cfg8,
                                                                              out=out))
                rows.append(dict(kind="speed", layout=name, T=T, impl="fp8_rotate" if rot else "fp8", pairs=pairs,
                                 fwd_ms=t_all, quant_ms=t_q, attn_ms=t_a, tflops=flops / t_all * 1e-9,
                                 x_16bit=t16 / t_all))
        q = k = v = out = x = None  # freed before empty_cache
        torch.cuda.empty_cache()

    acc = []
    for name in args.layouts:
        lay = make_layout(name, args.fp8_acc_tokens, dev)
        for data, outl in (("random", 0), ("outliers", 4)):
            q, k, v = inputs(lay.total_tokens, 2, outl)
            truth = attention_math(q.double(), k.double(), v.double(), lay)
            with torch.no_grad():
                outs = {args.dtype: ta.triton_prefix_attention(q, k, v, lay, config=cfg16),
                        "fp8": ta.triton_fp8_prefix_attention(q, k, v, lay, config=cfg8),
                        "fp8_rotate": ta.triton_fp8_prefix_attention(q, k, v, lay, rotate=True, config=cfg8)}
            for impl, o in outs.items():
                err = ((o.double() - truth).norm() / truth.norm()).item()
                acc.append(dict(kind="accuracy", layout=name, T=lay.total_tokens, impl=impl, data=data, rel_err=err,
                                finite=bool(torch.isfinite(o).all())))
            del truth, outs
            torch.cuda.empty_cache()

    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, date=stamp, command=command,
                dtype=args.dtype, Hq=Hq, Hkv=Hkv, D=D, fp8_config=str(cfg8.as_list()), config=str(cfg16.as_list()))
    fp8_csv = os.path.splitext(csv_path)[0] + "_fp8.csv"
    fields = ["kind", "layout", "T", "impl", "pairs", "fwd_ms", "quant_ms", "attn_ms", "tflops", "x_16bit", "data",
              "rel_err", "finite"]
    new = not os.path.exists(fp8_csv)
    with open(fp8_csv, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields + list(meta))
        if new:
            w.writeheader()
        for r in rows + acc:
            w.writerow({**{k: "" for k in fields}, **r, **meta})

    print(f"\n# FP8 forward vs {args.dtype} forward | {gpu} | {stamp}\n# {command}")
    print(f"{'layout':<14}{'T':>6} {'impl':<11}{'fwd ms':>8}{'quant ms':>9}{'attn ms':>8}{'TF/s':>6}"
          f"{'x ' + args.dtype:>8}")
    for r in rows:
        print(f"{r['layout']:<14}{r['T']:>6} {r['impl']:<11}{r['fwd_ms']:>8.3f}{r['quant_ms']:>9.3f}"
              f"{r['attn_ms']:>8.3f}{r['tflops']:>6.0f}{r['x_16bit']:>8.2f}")
    print("(fwd ms: the whole call; for fp8 = quantize + attention. TF/s: 4*Hq*D*allowed pairs / fwd ms.)")
    print(f"\n# accuracy: ||out - ref|| / ||ref||, ref = float64 attention of the original inputs "
          f"(rows of ~{args.fp8_acc_tokens} tokens; outliers: 4 channels of q and k x10-50)")
    impls = [args.dtype, "fp8", "fp8_rotate"]
    print(f"{'layout':<14}{'T':>6} {'data':<9}" + "".join(f"{i:>12}" for i in impls) + f"{'rot gain':>9}")
    for name in args.layouts:
        for data in ("random", "outliers"):
            rs = {r["impl"]: r for r in acc if r["layout"] == name and r["data"] == data}
            flag = "" if all(r["finite"] for r in rs.values()) else "  NON-FINITE"
            print(f"{name:<14}{rs['fp8']['T']:>6} {data:<9}" + "".join(f"{rs[i]['rel_err']:>12.2e}" for i in impls)
                  + f"{rs['fp8']['rel_err'] / rs['fp8_rotate']['rel_err']:>9.2f}{flag}")
    print(f"FP8 CSV appended: {fp8_csv}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--layouts", nargs="+", default=["p2048_r256x2", "p128_r768x2", "p512_r128x8", "p700_r300x2_g7"],
                    choices=sorted(LAYOUTS))
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="time the kernel config variants (SWEEP_VARIANTS) on "
                    "--sweep-layouts first, and use the fastest fwd+bwd variant for the table")
    ap.add_argument("--sweep-layouts", nargs="+", default=["p2048_r256x2", "p512_r128x8"], choices=sorted(LAYOUTS))
    ap.add_argument("--sweep-only", action="store_true", help="stop after the sweep (no table, no CSV of the table)")
    ap.add_argument("--sweep-variants", nargs="+", default=None, help="only these SWEEP_VARIANTS names")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--fp8", action="store_true", help="after the table, time and check the FP8 forward "
                    "(triton_fp8, with and without rotation) against our 16-bit forward (run_fp8)")
    ap.add_argument("--fp8-only", action="store_true", help="only the --fp8 tables")
    ap.add_argument("--fp8-sweep", action="store_true", help="only the FP8 config sweep (FP8_SWEEP)")
    ap.add_argument("--fp8-acc-tokens", type=int, default=4096, help="row length of the --fp8 accuracy table "
                    "(its float64 reference is O(T^2) memory)")
    args = ap.parse_args(argv)
    if args.fp8_sweep:
        return run_fp8_sweep(args)
    if args.fp8_only:
        return run_fp8(args)

    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from prefix_attn import PrefixLayout
    from prefix_attn import triton as ta
    from prefix_attn.flex import build_block_mask, flex_prefix_attention
    from prefix_attn.schedule import ENV_FLAG, build_tables

    dev = torch.device("cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    Hq, Hkv, D = args.heads, args.kv_heads, args.head_dim
    gpu = torch.cuda.get_device_name(dev)
    csv_path = args.csv or os.path.join(os.environ.get("OUT", "."), "bench_attention.csv")
    command = " ".join([os.path.basename(sys.executable)] + sys.argv)
    print(f"# {gpu} | torch {torch.__version__} | triton {triton.__version__} | {args.dtype} Hq={Hq} Hkv={Hkv} D={D}")
    from prefix_attn.fa4 import fa4_supported

    has_fa4, why_not_fa4 = fa4_supported(dev, dtype, D)
    if not has_fa4:
        print(f"# no FlashAttention-4 rows: {why_not_fa4}")

    def inputs(T, seed):
        g = torch.Generator(device=dev).manual_seed(seed)
        mk = lambda h: (torch.randn(T, h, D, device=dev, dtype=dtype, generator=g)).requires_grad_()  # noqa: E731
        q, k, v = mk(Hq), mk(Hkv), mk(Hkv)
        do = torch.randn(T, Hq, D, device=dev, dtype=dtype, generator=g)
        return q, k, v, do

    def time_fwd_bwd(f, q, k, v, do):
        def fwd():
            with torch.no_grad():
                f(q, k, v)

        def fwdbwd():
            o = f(q, k, v)
            torch.autograd.grad(o, (q, k, v), do)

        return bench(fwd), bench(fwdbwd)

    # ------------------------------------------------------------------ optional config sweep (SWEEP_VARIANTS)
    base = ta.default_config(D, dtype, dev, Hq // Hkv)  # the config a call with these heads gets
    best = "default"  # the variant the table runs, on top of each layout's default config (its heads' GQA group)
    if args.sweep:
        best = run_sweep(args, ta, base, inputs, dev, Hq, D, csv_path, command, gpu)
        if args.sweep_only:
            return

    # ------------------------------------------------------------------ the table
    rows = []
    for name in args.layouts:
        lay = make_layout(name, args.tokens, dev)
        T = lay.total_tokens
        pairs = lay.allowed_pairs()
        dense_pairs = T * (T + 1) // 2
        Hq, Hkv = layout_heads(name, args)
        q, k, v, do = inputs(T, 1)
        cfg = replace(ta.default_config(D, dtype, dev, Hq // Hkv), **SWEEP_VARIANTS[best])
        f_ours = lambda q, k, v: ta.triton_prefix_attention(q, k, v, lay, config=cfg)  # noqa: E731
        f_flex = lambda q, k, v: flex_prefix_attention(q, k, v, lay)  # noqa: E731

        # Build times: our layout + schedule from device-side lengths; Flex's create_block_mask over S x S.
        d = lay.to_dict()

        def build_ours():
            build_tables(PrefixLayout.from_dict(d), cfg.tile_shape)

        build_ours()
        t_build = host_median_ms(build_ours, 50)
        t_build_dev = device_median_ms(build_ours, 50)  # GPU time of the same build (its launches back to back)
        # The same build through the torch reference path (the fused Triton builder switched off).

        saved = os.environ.get(ENV_FLAG)
        os.environ[ENV_FLAG] = "0"
        try:
            build_ours()
            t_build_torch = host_median_ms(build_ours, 50)
        finally:
            os.environ.pop(ENV_FLAG) if saved is None else os.environ.__setitem__(ENV_FLAG, saved)
        from torch.nn.attention.flex_attention import create_block_mask

        lo1, hi1, lo2 = lay.query_key_ranges()

        def mask_mod(b, h, qi, ki):
            return ((ki >= lo1[qi]) & (ki < hi1[qi])) | ((ki >= lo2[qi]) & (ki <= qi))

        t_cbm = host_median_ms(lambda: create_block_mask(mask_mod, 1, 1, T, T, device=dev), 5)
        t_kvb = host_median_ms(lambda: build_block_mask(PrefixLayout.from_dict(d)), 20)

        # Correctness sanity against Flex (the GPU tests compare both against float64).
        o1 = f_ours(q, k, v)
        res = {}
        res["ours"] = time_fwd_bwd(f_ours, q, k, v, do)
        if has_fa4:
            from prefix_attn.fa4 import fa4_prefix_attention

            f_fa4 = lambda q, k, v: fa4_prefix_attention(q, k, v, lay)  # noqa: E731
            print(f"{name}: ours vs fa4 rel diff {rel_err(o1, f_fa4(q, k, v)):.1e}")
            res["fa4"] = time_fwd_bwd(f_fa4, q, k, v, do)
        from prefix_attn.sdpa import sdpa_prefix_attention

        f_sdpa = lambda q, k, v: sdpa_prefix_attention(q, k, v, lay)  # noqa: E731
        print(f"{name}: ours vs sdpa rel diff {rel_err(o1, f_sdpa(q, k, v)):.1e}")
        res["sdpa"] = time_fwd_bwd(f_sdpa, q, k, v, do)
        if not args.no_flex:
            o2 = f_flex(q, k, v)
            print(f"{name}: ours vs flex rel diff {rel_err(o1, o2):.1e}")
            res["flex"] = time_fwd_bwd(f_flex, q, k, v, do)
        qd = q.detach().transpose(0, 1).unsqueeze(0)
        kd = k.detach().repeat_interleave(Hq // Hkv, 1).transpose(0, 1).unsqueeze(0).contiguous()
        vd = v.detach().repeat_interleave(Hq // Hkv, 1).transpose(0, 1).unsqueeze(0).contiguous()
        qd, kd, vd = (x.contiguous().requires_grad_() for x in (qd, kd, vd))
        dod = do.transpose(0, 1).unsqueeze(0).contiguous()

        def f_dense(q_, k_, v_):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q_, k_, v_, is_causal=True)

        res["cudnn_dense_causal"] = time_fwd_bwd(f_dense, qd, kd, vd, dod)
        if has_fa4:
            from flash_attn.cute import flash_attn_func

            qb, kb, vb = (x.detach().unsqueeze(0).contiguous().requires_grad_() for x in (q, k, v))
            res["fa4_dense_causal"] = time_fwd_bwd(lambda a, b, c: flash_attn_func(a, b, c, causal=True)[0], qb, kb,
                                                   vb, do.unsqueeze(0))

        fl = 4 * Hq * D
        for impl, (tf_ms, tfb_ms) in res.items():
            p = dense_pairs if "dense" in impl else pairs
            rows.append(dict(layout=name, T=T, Hq=Hq, Hkv=Hkv, impl=impl, pairs=p, fwd_ms=tf_ms, fwdbwd_ms=tfb_ms,
                             fwd_tflops=fl * p / tf_ms * 1e-9, fwdbwd_tflops=3.5 * fl * p / tfb_ms * 1e-9,
                             build_ms=t_build if impl == "ours" else (t_cbm if impl == "flex" else float("nan")),
                             flex_from_kv_blocks_ms=t_kvb if impl == "flex" else float("nan"),
                             build_torch_path_ms=t_build_torch if impl == "ours" else float("nan"),
                             build_device_ms=t_build_dev if impl == "ours" else float("nan"),
                             config=str(cfg.as_list()) if impl == "ours" else ""))
        del q, k, v, do, qd, kd, vd, dod
        torch.cuda.empty_cache()

    # ------------------------------------------------------------------ print, CSV
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, date=stamp, command=command,
                dtype=args.dtype, D=D, variant=best)
    new = not os.path.exists(csv_path)
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + list(meta))
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**r, **meta})

    print(f"\n# {gpu} | torch {torch.__version__} | triton {triton.__version__} | {stamp}")
    print(f"# {command}")
    print(f"# config variant {best} (each layout's default config for its heads, with the variant's fields)")
    hdr = (f"{'layout':<16}{'T':>6} {'impl':<19}{'fwd ms':>8}{'TF/s':>6}{'x cuDNN':>8}{'f+b ms':>8}{'TF/s':>6}"
           f"{'x cuDNN':>8}{'x flex':>7}{'fa4/f':>6}{'fa4/fb':>7}{'build ms':>9}")
    print(hdr)
    for name in args.layouts:
        rs = {r["impl"]: r for r in rows if r["layout"] == name}
        dn = rs["cudnn_dense_causal"]
        for impl, r in rs.items():
            xf = (rs["flex"]["fwdbwd_ms"] / r["fwdbwd_ms"]) if "flex" in rs else float("nan")
            # fa4/f, fa4/fb: the fa4 decomposition's time over this row's (> 1: faster than fa4)
            x4f = rs["fa4"]["fwd_ms"] / r["fwd_ms"] if "fa4" in rs else float("nan")
            x4b = rs["fa4"]["fwdbwd_ms"] / r["fwdbwd_ms"] if "fa4" in rs else float("nan")
            print(f"{name:<16}{r['T']:>6} {impl:<19}{r['fwd_ms']:>8.3f}{r['fwd_tflops']:>6.0f}"
                  f"{r['fwd_tflops'] / dn['fwd_tflops']:>8.2f}{r['fwdbwd_ms']:>8.3f}{r['fwdbwd_tflops']:>6.0f}"
                  f"{r['fwdbwd_tflops'] / dn['fwdbwd_tflops']:>8.2f}{xf:>7.2f}{x4f:>6.2f}{x4b:>7.2f}"
                  f"{r['build_ms']:>9.3f}")
    print("(build ms: ours = PrefixLayout.from_dict + build_tables from device lengths; flex = create_block_mask;"
          f" flex via from_kv_blocks: {[round(r['flex_from_kv_blocks_ms'], 3) for r in rows if r['impl'] == 'flex']};"
          f" ours through the torch path: {[round(r['build_torch_path_ms'], 3) for r in rows if r['impl'] == 'ours']};"
          f" ours, GPU time between events: {[round(r['build_device_ms'], 3) for r in rows if r['impl'] == 'ours']})")
    print(f"CSV appended: {csv_path}")
    if args.fp8:
        run_fp8(args)


if __name__ == "__main__":
    main()
