#!/usr/bin/env bash
# Nsight Compute on our attention kernels: one forward (fwd_kernel), one KV-major backward
# (bwd_kv_kernel) and one dq kernel (bwd_dq_kernel) launch of a 16K-token row, after warm-up
# (scripts/ncu_attention.py brackets the profiled call with cudaProfilerStart/Stop). About a minute on an H100.
#
#   PYTHONPATH=kernels OUT=/tmp/ncu bash scripts/ncu_attention.sh [VARIANT ...]     (variants: SWEEP_VARIANTS names)
#
# Collected per kernel: tensor-pipe utilization (sm__pipe_tensor_cycles_active; wgmma runs on it on Hopper), L2 hit
# rate (lts__t_sector_hit_rate.pct), DRAM bytes read/written, achieved occupancy (sm__warps_active), registers per
# thread and the occupancy limiters (LaunchStats, Occupancy), and the warp stall reasons (WarpStateStats). Writes
# $OUT/ncu_<variant>_<layout>.ncu-rep and a .csv of the raw page, and prints a short summary.
# Needs a GPU whose hardware counters ncu can read (on some virtualized machines it fails with LibraryNotLoaded).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
LAYOUT=${LAYOUT:-p2048_r256x2}
PY=${PYTHON:-python3}
NCU=${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1 || true)}
[ -n "$NCU" ] || { echo "ncu not found (set NCU=/path/to/ncu)"; exit 2; }
export PYTHONPATH="$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

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

for VARIANT in "${@:-default}"; do
  REP="$OUT/ncu_${VARIANT}_${LAYOUT}"
  "$NCU" --clock-control none --profile-from-start off \
    --kernel-name regex:'^(fwd|bwd_kv|bwd_dq)_kernel$' --launch-skip 0 --launch-count 3 \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis \
    --section WarpStateStats --metrics "$METRICS" \
    --export "$REP" --force-overwrite \
    "$PY" scripts/ncu_attention.py --variant "$VARIANT" --layout "$LAYOUT"
  "$NCU" --import "$REP.ncu-rep" --page raw --csv > "$REP.csv"
  "$PY" - "$REP.csv" <<'PYEOF'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
hdr, units, data = rows[0], rows[1], rows[2:]
want = ["Kernel Name", "gpu__time_duration.sum", "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
        "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active", "lts__t_sector_hit_rate.pct",
        "dram__bytes_read.sum", "dram__bytes_write.sum", "sm__warps_active.avg.pct_of_peak_sustained_active",
        "launch__registers_per_thread", "launch__occupancy_limit_registers", "launch__occupancy_limit_shared_mem"]
stall = [i for i, h in enumerate(hdr) if h.startswith("smsp__average_warp_latency_issue_stalled_")
         or h.startswith("smsp__pcsamp_warps_issue_stalled_")]
for r in data:
    print("  ".join(f"{h.split('.')[0].replace('sm__pipe_', '')}={r[hdr.index(h)]}{units[hdr.index(h)]}"
                    for h in want if h in hdr))
    vals = []
    for i in stall:
        try:
            vals.append((float(r[i].replace(",", "")), hdr[i]))
        except ValueError:
            pass
    top = sorted(vals, reverse=True)[:6]
    print("    top stalls:", ", ".join(f"{n.split('stalled_')[-1].split('.')[0]}={v:.2f}" for v, n in top))
PYEOF
done
