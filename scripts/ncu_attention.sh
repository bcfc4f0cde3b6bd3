#!/usr/bin/env bash
# Nsight Compute on one forward + backward of a 16K-token row, after warm-up (scripts/ncu_attention.py brackets the
# profiled call with cudaProfilerStart/Stop), for each layout in LAYOUTS and each backend in BACKENDS:
#   triton: our kernels, fwd_kernel, bwd_delta_kernel, bwd_kv_kernel (KV-major) and bwd_dq_kernel, one launch each,
#           once per config variant named on the command line (SWEEP_VARIANTS names; default: default);
#   fa4:    the fa4 backend's FlashAttention-4 CuTe-DSL varlen kernels: forward, backward preprocess, main backward
#           and the fp32-accumulator postprocesses (dq; dk and dv too under GQA). The filter is any kernel whose
#           name holds "flash"/"Flash": CuTe names carry the module path and class, while the torch kernels of the
#           decomposition (the K/V gather and its backward, the accumulator zeroing) are left out. FA4_FILTER=regex:.
#           profiles those too (they show as "other").
#
#   OUT=/tmp/ncu LAYOUTS="p2048_r256x2 p700_r300x2_g7" bash scripts/ncu_attention.sh [VARIANT ...]
#
# About a minute per triton report and two to three per fa4 report on an H100 / H200 (FA4's kernels compile during
# the warm-up; FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 keeps them on disk for the next run).
#
# Collected per kernel: tensor-pipe utilization (sm__pipe_tensor_cycles_active; wgmma runs on it on Hopper), L2 hit
# rate (lts__t_sector_hit_rate.pct), DRAM bytes read/written, achieved occupancy (sm__warps_active), registers per
# thread and the occupancy limiters (LaunchStats, Occupancy), and the warp stall reasons (WarpStateStats). Writes
# $OUT/ncu_<variant>_<layout>.ncu-rep (ours) and $OUT/ncu_fa4_<layout>.ncu-rep, each with a .csv of its raw page,
# prints a short summary per report and, at the end, one table comparing the backends per layout.
# Needs a GPU whose hardware counters ncu can read (on some virtualized machines it fails with LibraryNotLoaded).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
LAYOUTS=${LAYOUTS:-p2048_r256x2}
BACKENDS=${BACKENDS:-triton fa4}
FA4_FILTER=${FA4_FILTER:-regex:[Ff]lash}
PY=${PYTHON:-python3}
NCU=${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1 \
  || true)}
[ -n "$NCU" ] || { echo "ncu not found (set NCU=/path/to/ncu)"; exit 2; }
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
for B in $BACKENDS; do
  case $B in triton|fa4) ;; *) echo "unknown backend $B in BACKENDS (triton, fa4)"; exit 2 ;; esac
done

WANT="sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active
sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active
sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
sm__inst_executed_pipe_tensor_op_gmma.sum
lts__t_sector_hit_rate.pct
dram__bytes_read.sum
dram__bytes_write.sum
sm__warps_active.avg.pct_of_peak_sustained_active
launch__registers_per_thread
launch__shared_mem_per_block_dynamic
launch__occupancy_limit_registers
launch__occupancy_limit_shared_mem
gpu__time_duration.sum
sm__throughput.avg.pct_of_peak_sustained_elapsed
smsp__inst_executed.sum"
# Keep only the metrics this ncu knows for the H100 (an unknown name makes ncu fail the whole run).
KNOWN=$("$NCU" --query-metrics --chip gh100 2>/dev/null | awk '{print $1}' || true)
METRICS=""
for m in $WANT; do
  if [ -z "$KNOWN" ] || grep -qx "${m%%.*}" <<<"$KNOWN"; then METRICS="${METRICS:+$METRICS,}$m"; fi
done
echo "# $NCU; metrics: $METRICS"

REPORTS=()
# profile NAME FILTER LAUNCHES ARGS...: one ncu run of scripts/ncu_attention.py ARGS, kernels matching FILTER, at most
# LAUNCHES of them. A run that fails (say fa4 not installed) is reported and skipped, so the other reports still come.
profile() {
  local rep="$OUT/$1" filter=$2 count=$3
  shift 3
  rm -f "$rep.ncu-rep" "$rep.csv"  # a failed run must not leave an older report to be summarized
  echo "## $rep: $*"
  "$NCU" --clock-control none --profile-from-start off \
    --kernel-name "$filter" --launch-skip 0 --launch-count "$count" \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis \
    --section WarpStateStats --metrics "$METRICS" \
    --export "$rep" --force-overwrite \
    "$PY" scripts/ncu_attention.py "$@" || echo "# ncu exited with $? for $rep"
  if [ ! -f "$rep.ncu-rep" ]; then
    echo "# no report for $rep: skipped"
    return 0
  fi
  "$NCU" --import "$rep.ncu-rep" --page raw --csv > "$rep.csv"
  "$PY" scripts/ncu_attention.py --summarize "$rep.csv"
  REPORTS+=("$rep.csv")
}

for LAYOUT in $LAYOUTS; do
  for B in $BACKENDS; do
    if [ "$B" = triton ]; then
      for VARIANT in "${@:-default}"; do
        profile "ncu_${VARIANT}_${LAYOUT}" 'regex:^(fwd|bwd_delta|bwd_kv|bwd_dq)_kernel(_gluon)?$' 4 \
          --backend triton --variant "$VARIANT" --layout "$LAYOUT"
      done
    else
      # 64 only bounds the count: the profiled range holds one call (six FA4 kernels under GQA, about 20 launches
      # in all with FA4_FILTER=regex:.).
      profile "ncu_fa4_${LAYOUT}" "$FA4_FILTER" 64 --backend fa4 --layout "$LAYOUT"
    fi
  done
done

if [ ${#REPORTS[@]} -gt 0 ]; then
  echo
  "$PY" scripts/ncu_attention.py --compare "${REPORTS[@]}"
fi
