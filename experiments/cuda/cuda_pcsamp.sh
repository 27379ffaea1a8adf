#!/bin/bash
# Warp-state PC sampling of one effort call under Nsight Compute (on the device machine).
# Usage: bash experiments/cuda/cuda_pcsamp.sh LIB NAME [SHAPE] [EFFORT]  -> $OUT/pcs_NAME.{ncu-rep,txt,csv}
#   txt: the sections' details and the raw pcsamp metrics; csv: the source page (SASS lines,
#   stall samples and executed instructions per address). The 9th call of experiments/cuda/cuda_ncu.py
#   (weight sets rotated, the earlier calls warm) is the one profiled; clocks and caches are
#   left as they are (--clock-control none --cache-control none).
lib=$1 name=$2 shape=${3:-4096x14336} eff=${4:-0.25}
OUT=${OUT:-/tmp/out}
rep=$OUT/pcs_$name
PYEFFORT_CUDA_LIB=$lib timeout 240 ncu --clock-control none --cache-control none \
  --section WarpStateStats --section SourceCounters -k regex:k_effort -s 8 -c 1 -f -o "$rep" \
  python3 experiments/cuda/cuda_ncu.py "$shape" "$eff" 12 >"$rep.log" 2>&1 || { tail -20 "$rep.log"; exit 1; }
{
  ncu -i "$rep.ncu-rep" --page details
  ncu -i "$rep.ncu-rep" --page raw --csv
} >"$rep.txt" 2>&1
ncu -i "$rep.ncu-rep" --page source --csv --print-source sass >"$rep.csv" 2>&1
grep -E "Stall|stall|Warp Cycles|Issued|Eligible" "$rep.txt" | head -40
