"""Compile the attention kernels' config variants for Hopper (sm_90a) without a GPU and report what the compiler did.

For each variant: wgmma instructions in the PTX, whether the key/query loop got multi-buffered async copies (TMA
``cp.async.bulk.tensor`` or ``cp.async``), shared memory per program (Triton's metadata), and ptxas's registers per
thread and spill bytes (the bundled ptxas, ``-v``). ``ex2@mma``: the most ``ex2`` (softmax exponentials) issued in
one stretch of the PTX text while a wgmma group is outstanding (0: the softmax never overlaps an MMA, as in the
plain-Triton kernels; the Gluon kernels of backward_gluon.py overlap it); ``ser``: ptxas reports C7514 (it serialized
the wgmmas itself, undoing any such overlap). Run on any machine with Triton (no GPU needed):

    python scripts/check_sm90_compile.py                 # all variants, Llama-3-8B head shape (G=4, D=128, bf16)
    python scripts/check_sm90_compile.py --only fwd      # names containing "fwd"
    python scripts/check_sm90_compile.py --exact --only "kv 64x64 w4 s2 merged"   # one variant
    python scripts/check_sm90_compile.py --dump DIR      # also write each variant's ttgir / ptx to DIR

Argument specialization mirrors the runtime's: pointers and strides divisible by 16 (``tt.divisibility``), ``T``
unspecialized (as ``do_not_specialize`` does).
"""

from __future__ import annotations

import argparse
import os
import re

import triton

from prefixdpo.benchmarks import compile_sm90, ptxas_stats

from prefix_attn.triton.backward import bwd_dq_kernel, bwd_kv_kernel  # noqa: E402
from prefix_attn.triton import backward_gluon  # noqa: E402
from prefix_attn.triton.forward import fwd_kernel  # noqa: E402
from prefix_attn.triton.common import packed_row_count  # noqa: E402

G, D, HKV = 4, 128, 8  # Llama-3-8B: 32 query heads, 8 KV heads, head dim 128
DT = "bf16"


def _desc(rows):
    return f"tensordesc<{DT}[{rows}, {D}]>"


def _ex2_in_flight(ptx: str) -> int:
    """The most ex2 instructions issued in one stretch while a wgmma group is outstanding (PTX text order: each
    wgmma.commit_group adds a group, ``wgmma.wait_group N`` leaves at most N)."""
    best, count, outstanding = 0, 0, 0
    for line in ptx.splitlines():
        if "wgmma.commit_group" in line:
            outstanding += 1
        elif "wgmma.wait_group" in line:
            best = max(best, count)
            count = 0
            m = re.search(r"wait_group\.sync\.aligned\s+(\d+)", line)
            outstanding = min(outstanding, int(m.group(1))) if m else 0
        elif outstanding and "ex2.approx" in line:
            count += 1
    return max(best, count)


# The options' constexprs (soft-capping in log2 units, the sliding window): a cap of Gemma 2's 50 and gpt-oss's window
# of 128 positions for the variants that turn them on.
SOFTCAP = 50.0 * 1.4426950408889634
WINDOW = 128


def _fwd(name, bm, bn, w, s, tma=True, softcap=0.0):
    fn = fwd_kernel
    types = {n: "i32" for n in fn.arg_names}
    types.update(Q=f"*{DT}", K=f"*{DT}", V=f"*{DT}", O=f"*{DT}", LSE="*fp32", SCHED="*i32", TOK="*i32",
                 qk_scale="fp32")
    consts = dict(H_KV=HKV, GROUPS=G, ROWS=packed_row_count(bm, G), HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, USE_TMA=tma,
                  DOT_PREC="tf32", SOFTCAP=softcap)
    if tma:
        types.update(K_DESC=_desc(bn), V_DESC=_desc(bn))
    else:
        consts.update(K_DESC=None, V_DESC=None)
    return name, fn, types, consts, w, s, {}


def _gluon(name, kernel, types, consts):
    """A Gluon kernel of backward_gluon.py (None where this Triton has no Gluon): its descriptors are [64, D] blocks,
    every other argument an i32 unless ``types`` says otherwise; one warpgroup."""
    if not backward_gluon.available():
        return None
    fn = getattr(backward_gluon, kernel)
    desc = f"tensordesc<{DT}[64,{D}],{backward_gluon.SMEM_LAYOUT!r}>"
    sig = {n: desc if n.endswith("_DESC") else types.get(n, "i32") for n in fn.arg_names}
    return name, fn, sig, consts, 4, 1, dict(gluon=True)


def _kv_gluon(name, groups=G, stages=2):
    """The Gluon KV-major backward at 64 x 64 tiles."""
    return _gluon(name, "bwd_kv_kernel_gluon", dict(LSE="*fp32", DELTA="*fp32", DK=f"*{DT}", DV=f"*{DT}",
                                                    SCHED="*i32", QHI="*i32", qk_scale="fp32", sm_scale="fp32"),
                  dict(H_KV=HKV, GROUPS=groups, HEAD_DIM=D, BLOCK_M=64, BLOCK_N=64, STAGES=stages))


def _dq_gluon(name, groups=G, stages=2):
    """The Gluon dq kernel at 64 packed rows (as many tokens as fit) x 64 keys."""
    return _gluon(name, "bwd_dq_kernel_gluon", dict(Q=f"*{DT}", DO=f"*{DT}", DQ=f"*{DT}", LSE="*fp32", DELTA="*fp32",
                                                    SCHED="*i32", TOK="*i32", qk_scale="fp32", sm_scale="fp32"),
                  dict(H_KV=HKV, GROUPS=groups, ROWS=64, HEAD_DIM=D, BLOCK_M=64 // groups, BLOCK_N=64,
                       STAGES=stages))


def _kv(name, bm, bn, w, s, tma=True, softcap=0.0, window=0):
    fn = bwd_kv_kernel
    types = {n: "i32" for n in fn.arg_names}
    types.update(Q=f"*{DT}", K=f"*{DT}", V=f"*{DT}", DO=f"*{DT}", LSE="*fp32", DELTA="*fp32", DK=f"*{DT}",
                 DV=f"*{DT}", SCHED="*i32", QHI="*i32", qk_scale="fp32", sm_scale="fp32", POS="*i64", QMIN="*i32")
    consts = dict(H_KV=HKV, GROUPS=G, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, USE_TMA=tma, DOT_PREC="tf32",
                  SOFTCAP=softcap, WINDOW=window)
    if not window:
        consts.update(POS=None, QMIN=None)
    if tma:
        types.update(Q_DESC=_desc(bm), DO_DESC=_desc(bm))
    else:
        consts.update(Q_DESC=None, DO_DESC=None)
    return name, fn, types, consts, w, s, {}


def _dq(name, bm, bn, w, s, tma=True, softcap=0.0):
    fn = bwd_dq_kernel
    types = {n: "i32" for n in fn.arg_names}
    types.update(Q=f"*{DT}", K=f"*{DT}", V=f"*{DT}", DO=f"*{DT}", LSE="*fp32", DELTA="*fp32", DQ=f"*{DT}",
                 SCHED="*i32", TOK="*i32", qk_scale="fp32", sm_scale="fp32")
    consts = dict(H_KV=HKV, GROUPS=G, ROWS=packed_row_count(bm, G), HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, USE_TMA=tma,
                  DOT_PREC="tf32", SOFTCAP=softcap)
    if tma:
        types.update(K_DESC=_desc(bn), V_DESC=_desc(bn))
    else:
        consts.update(K_DESC=None, V_DESC=None)
    return name, fn, types, consts, w, s, {}


# Every kernel packs the GQA group ("pack"), walks its tiles in one loop ("merged") and runs them in position order;
# the names still say so, so that tables taken of older kernels, which had other variants, compare row by row.
VARIANTS = [
    # forward (default for a GQA group of 4: 16 tokens x 4 heads, 64 keys, 4 warps, 3 stages, TMA)
    _fwd("fwd pack 16tok x64 w4 s3 merged", 16, 64, 4, 3),
    _fwd("fwd pack 32tok x64 w8 s3 merged", 32, 64, 8, 3),
    _fwd("fwd pack 32tok x128 w8 s2 merged", 32, 128, 8, 2),
    _fwd("fwd pack 16tok x128 w4 s2 merged", 16, 128, 4, 2),
    # KV-major backward (default: 64 queries x 64 keys, 4 warps, 2 stages, TMA; two programs per SM)
    _kv("kv 64x64 w4 s2 merged", 64, 64, 4, 2),
    # the Gluon KV-major backward (backward_gluon.py)
    _kv_gluon("kv gluon 64x64 w4 s2"),
    _kv_gluon("kv gluon 64x64 w4 s3", stages=3),
    _kv("kv 64x64 w4 s3 merged", 64, 64, 4, 3),
    _kv("kv 64x128 w8 s2 merged", 64, 128, 8, 2),
    _kv("kv 32x128 w8 s3 merged", 32, 128, 8, 3),
    # dq kernel (default for a GQA group of 4: 16 tokens x 4 heads, 64 keys, 4 warps, 2 stages, TMA)
    _dq("dq pack 16tok(x4=64 rows) x64 w4 s2 merged", 16, 64, 4, 2),
    # the Gluon dq kernel (backward_gluon.py)
    _dq_gluon("dq gluon 16tok(x4) x64 w4 s2"),
    _dq_gluon("dq gluon 16tok(x4) x64 w4 s3", stages=3),
    _dq_gluon("dq gluon 9tok(x7) x64 w4 s2 g7", 7),
    _dq("dq pack 32tok x64 w8 s2 merged", 32, 64, 8, 2),
    # The options at the default configs (the forward and dq kernels take a window through their tables alone).
    _fwd("fwd pack 16tok x64 w4 s3 merged softcap", 16, 64, 4, 3, softcap=SOFTCAP),
    _kv("kv 64x64 w4 s2 merged softcap", 64, 64, 4, 2, softcap=SOFTCAP),
    _kv("kv 64x64 w4 s2 merged window", 64, 64, 4, 2, window=WINDOW),
    _kv("kv 64x64 w4 s2 merged window softcap", 64, 64, 4, 2, softcap=SOFTCAP, window=WINDOW),
    _dq("dq pack 16tok(x4=64 rows) x64 w4 s2 merged softcap", 16, 64, 4, 2, softcap=SOFTCAP),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", default=[""], help="variants whose names contain any of these")
    ap.add_argument("--exact", action="store_true", help="--only names whole variants")
    ap.add_argument("--dump", default=None)
    args = ap.parse_args(argv)
    print(f"# triton {triton.__version__}, target sm_90a, G={G} D={D} {DT}")
    print(f"{'variant':<44}{'wgmma':>6}{'tma ld':>7}{'cp.async':>9}{'smem KB':>8}{'regs':>5}{'spill st/ld B':>15}"
          f"{'ex2@mma':>8}{'ser':>4}")
    for name, fn, types, consts, w, s, opts in filter(None, VARIANTS):
        if not any(name == o if args.exact else o in name for o in args.only):
            continue
        try:
            k = compile_sm90(fn, types, consts, w, s, **opts)
        except Exception as e:  # noqa: BLE001
            print(f"{name:<44} FAILED {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        ptx = k.asm["ptx"]
        wgmma = len(re.findall(r"wgmma\.mma_async", ptx))
        tma = len(re.findall(r"cp\.async\.bulk\.tensor", ptx))
        cpa = len(re.findall(r"cp\.async\.(?:ca|cg)", ptx))
        regs, sst, sld, err, serial = ptxas_stats(ptx)
        smem = k.metadata.shared / 1024
        print(f"{name:<44}{wgmma:>6}{tma:>7}{cpa:>9}{smem:>8.1f}{regs:>5}{sst:>8}/{sld:<6}{_ex2_in_flight(ptx):>8}"
              f"{'yes' if serial else 'no':>4}")
        if err:
            print("   ptxas:", err[:300])
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            base = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
            for ext in ("ttgir", "ptx"):
                with open(os.path.join(args.dump, f"{base}.{ext}"), "w") as f:
                    f.write(k.asm[ext])


if __name__ == "__main__":
    main()
