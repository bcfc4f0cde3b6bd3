"""The program Nsight Compute profiles (scripts/ncu_attention.sh), and the summaries that script prints.

Profiled: one forward + backward of prefix-shared attention on a 16K-token row, after warm-up, inside
``cudaProfilerStart/Stop`` so that ``ncu --profile-from-start off`` sees only that call. Every schedule or plan build
and every compile happens during the warm-up, outside the profiled range.

- ``--backend triton``: our kernels with a SWEEP_VARIANTS config: ``fwd_kernel``; ``bwd_delta_kernel``
  (rowsum(dO * O)), ``bwd_kv_kernel`` (KV-major dk, dv) and ``bwd_dq_kernel``.
- ``--backend fa4``: ``prefix_attention(..., backend="fa4")``: K and V gathered per branch (torch ``index_select``),
  then FlashAttention-4's CuTe-DSL varlen causal kernels: the forward (``FlashAttentionForwardSm90`` on Hopper); in
  the backward a preprocess (``FlashAttentionBackwardPreprocess``: rowsum(dO * O), the LSE in base 2, the fp32 dq
  accumulator zeroed), the main backward (``FlashAttentionBackwardSm90``: dk, dv, dq accumulated in fp32) and the
  conversions of the fp32 accumulators (``FlashAttentionBackwardPostprocess``: dq, then dk and dv when Hq > Hkv).
  CuTe names a kernel ``kernel_cutlass_kernel_<module path><class>_object_at_<argument signature>_<n>``.

The call is also timed before the profiled range (CUDA events, median of --repeats): with nothing profiled ncu only
intercepts the launches, so the figure is close to, not exactly, an unprofiled run's.

    python scripts/ncu_attention.py --backend fa4 --layout p700_r300x2_g7       # alone: prints the call's ms
    python scripts/ncu_attention.py --summarize OUT/ncu_fa4_p2048_r256x2.csv    # one report's kernels (ncu raw CSV)
    python scripts/ncu_attention.py --compare OUT/ncu_*.csv                      # per layout: ours against fa4
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
from dataclasses import replace

from prefixdpo.benchmarks import LAYOUTS, SWEEP_VARIANTS, layout_heads, make_layout

# Raw-page columns the per-kernel summary prints: label -> metric.
SHOWN = {
    "tensor": "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
    "gmma": "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
    "warps_active": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "regs": "launch__registers_per_thread",
    "L2_hit": "lts__t_sector_hit_rate.pct",
    "dram_read": "dram__bytes_read.sum",
    "dram_write": "dram__bytes_write.sum",
    "occ_limit_regs": "launch__occupancy_limit_registers",
    "occ_limit_smem": "launch__occupancy_limit_shared_mem",
}
TIME = "gpu__time_duration.sum"
TO_MS = {"nsecond": 1e-6, "ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0, "second": 1e3, "s": 1e3}
# Stall-reason families, most useful first: the summary takes the first one the report has and never mixes two
# (their units differ: cycles per issued instruction, latency ratios, sample counts).
STALL_FAMILIES = (
    ("smsp__average_warps_issue_stalled_", "_per_issue_active.ratio"),
    ("smsp__average_warp_latency_issue_stalled_", ""),
    ("smsp__pcsamp_warps_issue_stalled_", ""),
)
# Kernel name -> role. Ours are named by their Triton function; FA4's by the CuTe class inside the generated name
# (the more specific class names first: Combine before Forward, Pre/Postprocess before Backward).
OURS = {"fwd_kernel": "fwd", "bwd_delta_kernel": "bwd_delta", "bwd_kv_kernel": "bwd_kv", "bwd_dq_kernel": "bwd_dq",
        "bwd_kv_kernel_gluon": "bwd_kv", "bwd_dq_kernel_gluon": "bwd_dq"}
FA4_CLASSES = (
    ("FlashAttentionForwardCombine", "fwd_combine"),
    ("FlashAttentionBackwardPreprocess", "bwd_pre"),
    ("FlashAttentionBackwardPostprocess", "bwd_post"),
    ("FlashAttentionForward", "fwd"),
    ("FlashAttentionBackward", "bwd"),
)
# FA4 converts its fp32 accumulators in this order (dk and dv only when Hq > Hkv).
POSTPROCESS_ORDER = ("dq", "dk", "dv")


def _number(s: str) -> float | None:
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


def _with_unit(value: str, unit: str) -> str:
    if unit == "%":
        return value + unit
    if unit in ("", "register/thread", "block"):  # counts: the label says what of
        return value
    return f"{value} {unit}"


def _cell(row: list[str], col: dict[str, int], metric: str) -> float | None:
    return _number(row[col[metric]]) if metric in col else None


def read_report(path: str) -> list[dict]:
    """The kernels of an ``ncu --import R --page raw --csv`` export, in launch order: dicts with ``name``, ``role``,
    ``label`` (role, numbered for FA4's postprocess launches), ``ms`` (gpu__time_duration), ``tensor`` (tensor-pipe
    active %, the gmma sub-pipe's where the general metric is absent), ``shown`` {label: text with unit} and
    ``stalls`` [(value, reason)] of one family (``stall_family``, its metric prefix), largest first."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 3:
        return []
    hdr, units, data = rows[0], rows[1], rows[2:]
    col = {h: i for i, h in enumerate(hdr)}
    name_col = col.get("Kernel Name", col.get("Function Name"))
    family, stall_prefix, stall_suffix = [], "", ""
    for stall_prefix, stall_suffix in STALL_FAMILIES:
        family = [(i, h) for i, h in enumerate(hdr) if h.startswith(stall_prefix) and "not_issued" not in h
                  and h.endswith(stall_suffix)]
        if family:
            break
    kernels, posts = [], 0
    for r in data:
        if len(r) < len(hdr):
            continue
        name = r[name_col] if name_col is not None else "?"
        role = kernel_role(name)
        label = role
        if role == "bwd_post":
            label = f"bwd_post_{POSTPROCESS_ORDER[posts] if posts < len(POSTPROCESS_ORDER) else posts}"
            posts += 1
        t = _cell(r, col, TIME)
        ms = t * TO_MS.get(units[col[TIME]], float("nan")) if t is not None else None
        tensor = _cell(r, col, SHOWN["tensor"])
        if tensor is None:
            tensor = _cell(r, col, SHOWN["gmma"])
        shown = {k: _with_unit(r[col[m]], units[col[m]]) for k, m in SHOWN.items() if m in col and r[col[m]] != ""}
        stalls = []
        for i, h in family:
            v = _number(r[i])
            if v is not None:
                reason = h[len(stall_prefix):len(h) - len(stall_suffix)]
                stalls.append((v, reason.split(".")[0]))
        kernels.append(dict(name=name, role=role, label=label, ms=ms, tensor=tensor, shown=shown,
                            stalls=sorted(stalls, reverse=True), stall_family=stall_prefix if family else None))
    return kernels


def kernel_role(name: str) -> str:
    if name in OURS:
        return OURS[name]
    for cls, role in FA4_CLASSES:
        if cls in name:
            return role
    return "other"


def short_name(name: str) -> str:
    """A kernel name fit for a line: FA4's CuTe class rather than its argument signature; else the first 60 chars."""
    m = re.search(r"FlashAttention[A-Za-z0-9]+", name)
    if m:
        return m.group(0)
    return name if len(name) <= 60 else name[:57] + "..."


def summarize(path: str) -> None:
    kernels = read_report(path)
    if not kernels:
        print(f"  (no kernels in {path})")
    for k in kernels:
        t = f"{k['ms']:.3f} ms" if k["ms"] is not None else "?"
        print(f"  {k['label']:<12} {short_name(k['name'])}: time={t}  "
              + "  ".join(f"{lab}={txt}" for lab, txt in k["shown"].items()))
        top = k["stalls"][:6]
        if top:
            print("    top stalls:", ", ".join(f"{n}={v:.2f}" for v, n in top))
    if kernels and kernels[0]["stall_family"]:
        print(f"  (stalls: {kernels[0]['stall_family']}*)")


def _who(path: str) -> tuple[str, str]:
    """(layout, who) from a report name ncu_<variant or fa4>_<layout>.csv."""
    stem = os.path.basename(path)
    stem = stem[:-len(".csv")] if stem.endswith(".csv") else stem
    stem = stem[len("ncu_"):] if stem.startswith("ncu_") else stem
    for layout in sorted(LAYOUTS, key=len, reverse=True):
        if stem.endswith("_" + layout):
            tag = stem[:-len(layout) - 1]
            return layout, "fa4" if tag == "fa4" else f"ours({tag})"
    return "?", stem


def _group(kernels: list[dict], roles) -> tuple[float | None, float | None]:
    """Summed ms of the kernels of ``roles`` and their tensor-pipe % weighted by time."""
    ks = [k for k in kernels if k["role"] in roles and k["ms"] is not None]
    if not ks:
        return None, None
    ms = sum(k["ms"] for k in ks)
    tw = [(k["tensor"], k["ms"]) for k in ks if k["tensor"] is not None]
    tc = sum(t * w for t, w in tw) / sum(w for _, w in tw) if tw and sum(w for _, w in tw) > 0 else None
    return ms, tc


def compare(paths: list[str]) -> None:
    """Per layout: the forward and backward kernel times and tensor-pipe % of each report (module doc)."""
    table = []
    for p in paths:
        layout, who = _who(p)
        kernels = read_report(p)
        fwd = _group(kernels, {"fwd"})
        bwd = _group(kernels, {"bwd"} if who == "fa4" else {"bwd_kv", "bwd_dq"})
        rest = _group(kernels, {k["role"] for k in kernels} - {"fwd", "bwd_kv", "bwd_dq", "bwd"})
        total = sum(x for x in (fwd[0], bwd[0], rest[0]) if x is not None)
        table.append((layout, who, fwd, bwd, rest, total))
    w = max([len(r[1]) for r in table] + [4]) + 1
    print("# ncu kernel times (ms, gpu__time_duration under --clock-control none) and tensor-pipe active %"
          " (time-weighted)")
    print("# fwd: the forward kernel; bwd: ours bwd_kv + bwd_dq, fa4 its main backward kernel; rest: the other")
    print("# kernels the filter caught (ours bwd_delta; fa4 its backward preprocess and accumulator postprocesses)")
    heads = ("fwd ms", "fwd tc%", "bwd ms", "bwd tc%", "rest ms", "all ms")
    print(f"{'layout':<16}{'who':<{w}}" + "".join(f"{h:>8}" for h in heads))

    def cell(x, spec):
        return format(x, spec) if x is not None else f"{'-':>8}"

    for layout in dict.fromkeys(r[0] for r in table):
        rows = [r for r in table if r[0] == layout]
        for _, who, fwd, bwd, rest, total in rows:
            print(f"{layout:<16}{who:<{w}}{cell(fwd[0], '8.3f')}{cell(fwd[1], '8.1f')}{cell(bwd[0], '8.3f')}"
                  f"{cell(bwd[1], '8.1f')}{cell(rest[0], '8.3f')}{total:8.3f}")
        fa4 = next((r for r in rows if r[1] == "fa4"), None)
        for r in rows:
            if fa4 is None or r is fa4:
                continue
            pairs = (("fwd", fa4[2][0], r[2][0]), ("bwd", fa4[3][0], r[3][0]), ("all", fa4[5], r[5]))
            ratios = ", ".join(f"{lab} {a / b:.2f}x" for lab, a, b in pairs if a and b)
            if ratios:
                print(f"{'':<16}fa4 time / {r[1]} time: {ratios} (> 1: ours faster)")


def profile(args) -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("ncu_attention.py profiles on a CUDA GPU; none here")
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    Hq, Hkv = layout_heads(args.layout, args)
    D = args.head_dim
    lay = make_layout(args.layout, args.tokens, dev)
    T = lay.total_tokens
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(T, h, D, device=dev, dtype=dtype, generator=g).requires_grad_() for h in (Hq, Hkv, Hkv))
    do = torch.randn(T, Hq, D, device=dev, dtype=dtype, generator=g)

    if args.backend == "triton":
        from prefix_attn import triton as ta

        cfg = replace(ta.default_config(D, dtype, dev, Hq // Hkv), **SWEEP_VARIANTS[args.variant])
        what = f"triton {args.variant} (config {cfg.as_list()})"

        def attend():
            return ta.triton_prefix_attention(q, k, v, lay, config=cfg)
    else:
        from prefix_attn import prefix_attention
        from prefix_attn.fa4 import fa4_supported

        ok, why = fa4_supported(dev, dtype, D)
        if not ok:
            raise SystemExit(f"fa4 does not run here: {why}")
        what = "fa4 (FlashAttention-4 varlen causal over the per-branch decomposition)"

        def attend():
            return prefix_attention(q, k, v, lay, backend="fa4")

    def step():
        return torch.autograd.grad(attend(), (q, k, v), do)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()

    def median_ms(fn):
        times = []
        for _ in range(args.repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    fwd_ms, step_ms = median_ms(attend), median_ms(step)
    torch.cuda.cudart().cudaProfilerStart()
    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"{what} on {args.layout} (T={T}, Hq={Hq}, Hkv={Hkv}, D={D}, pairs={lay.allowed_pairs()}): "
          f"fwd {fwd_ms:.3f} ms, fwd+bwd {step_ms:.3f} ms (median of {args.repeats}, before the profiled call)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="triton", choices=("triton", "fa4"))
    ap.add_argument("--variant", default="default", choices=sorted(SWEEP_VARIANTS), help="triton config variant")
    ap.add_argument("--layout", default="p2048_r256x2", choices=sorted(LAYOUTS))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=32, help="query heads, for layouts that do not fix them")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="timed calls before the profiled one")
    ap.add_argument("--summarize", metavar="CSV", help="print one report's kernels (ncu --page raw --csv) and exit")
    ap.add_argument("--compare", metavar="CSV", nargs="+", help="print the per-layout table of these reports and exit")
    args = ap.parse_args(argv)
    if args.summarize:
        summarize(args.summarize)
    elif args.compare:
        compare(args.compare)
    else:
        profile(args)


if __name__ == "__main__":
    main()
