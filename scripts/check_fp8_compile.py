"""Compile the FP8 forward's kernels (``prefix_attn.triton.fp8``) for Hopper (sm_90a) without a GPU; report what
the compiler did, as scripts/check_sm90_compile.py does for the 16-bit kernels (with the same compile helpers, prefixdpo.benchmarks).

Per variant: wgmma instructions (and how many are e4m3), TMA loads, e4m3 conversions (``cvt...e4m3x2``), shared
memory, ptxas registers and spills. Head dims 64 and 128, Llama-3-8B heads (32 query, 8 KV).

    python scripts/check_fp8_compile.py
    python scripts/check_fp8_compile.py --only "D=128"
"""

from __future__ import annotations

import argparse
import re
from dataclasses import replace

import triton

from prefix_attn.triton.common import packed_row_count
from prefix_attn.triton.config import FP8_CONFIGS, FP8AttentionConfig
from prefix_attn.triton.fp8 import fp8_fwd_kernel, fp8_quantize_kernel
from prefixdpo.benchmarks import compile_sm90, ptxas_stats

HQ, HKV = 32, 8


def _quant(d, dt, rot, warps=8, block=128, block_kv=None, q_tiles=1):
    fn = fp8_quantize_kernel
    types = {n: "i32" for n in fn.arg_names}
    types.update(Q=f"*{dt}", K=f"*{dt}", V=f"*{dt}", Q8="*fp8e4nv", K8="*fp8e4nv", VT8="*fp8e4nv", QS="*fp32",
                 KS="*fp32", VS="*fp32", R=f"*{dt}", rsqrt_d="fp32")
    block_kv = block_kv or block
    consts = dict(H_Q=HQ, H_KV=HKV, HEAD_DIM=d, BLOCK_Q=block, BLOCK_KV=block_kv, ROTATE=rot, EXACT_CAST=False,
                  Q_TILES=q_tiles)
    tiles = "" if (block, block_kv, q_tiles) == (128, 128, 1) else f" q{block}x{q_tiles} kv{block_kv}"
    return f"quant {dt} D={d} rotate={rot} w{warps}{tiles}", fn, types, consts, warps, 1


def _fwd(d, cfg: FP8AttentionConfig, hq=HQ, hkv=HKV):
    fn = fp8_fwd_kernel
    types = {n: "i32" for n in fn.arg_names}
    types.update(Q8="*fp8e4nv", K8="*fp8e4nv", VT8="*fp8e4nv", QS="*fp32", KS="*fp32", VS="*fp32", O="*bf16",
                 SCHED="*i32", TOK="*i32", sm_scale_log2="fp32")
    bm, bn = cfg.block_m, cfg.block_n
    consts = dict(H_KV=hkv, GROUPS=hq // hkv, ROWS=packed_row_count(bm, hq // hkv), HEAD_DIM=d, BLOCK_M=bm,
                  BLOCK_N=bn, USE_TMA=cfg.tma, EXACT_CAST=False)
    if cfg.tma:
        types.update(K_DESC=f"tensordesc<fp8e4nv[{bn}, {d}]>", VT_DESC=f"tensordesc<fp8e4nv[{d}, {bn}]>")
    else:
        consts.update(K_DESC=None, VT_DESC=None)
    # "merged doc": one loop over the key tiles, in position order (the kernel has no other variants); the name still
    # says so, so that tables taken of older kernels compare row by row.
    name = (f"fwd D={d} {bm}x{bn} w{cfg.warps} s{cfg.stages} pack{bm}tok x{hq // hkv}h"
            + (" tma" if cfg.tma else "") + " merged doc")
    return name, fn, types, consts, cfg.warps, cfg.stages


def variants():
    out = []
    for d in (64, 128):
        for dt in ("bf16", "fp16"):
            for rot in (False, True):
                out.append(_quant(d, dt, rot))
        base = FP8_CONFIGS["cuda"]
        # block_m tokens x 4 heads (Llama-3-8B), the FP8_SWEEP entries; then group sizes 3 (padded to 4), 8 and 1 at
        # 64-128 MMA rows.
        for w in (4, 8):  # the quantize of q in 16-token tiles, 4 per program (64 rows), K/V 64-key tiles
            out.append(_quant(d, "bf16", False, w, 16, 64, 4))
        out.append(_quant(d, "bf16", True, 4, 16, 64, 4))
        for kw in (dict(block_m=16, block_n=64, warps=4), dict(block_m=16, block_n=128, warps=4),
                   dict(block_m=32, block_n=64, warps=8), dict(block_m=16, block_n=64, warps=4, tma=False)):
            out.append(_fwd(d, replace(base, **kw)))
        for hq, hkv, bm, w in ((24, 8, 16, 4), (64, 8, 16, 8), (8, 8, 64, 4)):
            out.append(_fwd(d, replace(base, block_m=bm, warps=w), hq, hkv))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="")
    args = ap.parse_args(argv)
    print(f"# triton {triton.__version__}, target sm_90a, Hq={HQ} Hkv={HKV}")
    print(f"{'variant':<46}{'wgmma':>6}{'e4m3':>5}{'tma ld':>7}{'cvt e4m3':>9}{'smem KB':>8}{'regs':>5}"
          f"{'spill st/ld B':>15}")
    for name, fn, types, consts, w, s in variants():
        if args.only not in name:
            continue
        try:
            k = compile_sm90(fn, types, consts, w, s)
        except Exception as e:  # noqa: BLE001
            print(f"{name:<46} FAILED {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        ptx = k.asm["ptx"]
        wg = len(re.findall(r"wgmma\.mma_async", ptx))
        e4 = len(re.findall(r"wgmma\.mma_async[^;]*e4m3", ptx))
        tma = len(re.findall(r"cp\.async\.bulk\.tensor", ptx))
        cvt = len(re.findall(r"cvt\.rn\.satfinite\.e4m3x2", ptx))
        regs, sst, sld, err, _serialized = ptxas_stats(ptx)
        print(f"{name:<46}{wg:>6}{e4:>5}{tma:>7}{cvt:>9}{k.metadata.shared / 1024:>8.1f}{regs:>5}{sst:>8}/{sld:<6}")
        if err:
            print("   ptxas:", err[:300])


if __name__ == "__main__":
    main()
