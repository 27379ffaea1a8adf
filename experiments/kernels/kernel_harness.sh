#!/usr/bin/env bash
# Builds experiments/kernels/kernel_harness.c against src/cpu (no Python) and runs it:
#   bash experiments/kernels/kernel_harness.sh N_IN N_OUT KERNEL THREADS
set -euo pipefail
cd "$(dirname "$0")/../.."
S=src/cpu; B=$(mktemp -d); F="-O3 -std=c11 -fno-fast-math -I$S ${EXTRA:-}"
trap 'rm -rf "$B"' EXIT
A2="-mavx2 -mfma -mf16c"; A5="$A2 -mavx512f -mavx512bw -mavx512vl -mavx512dq"
for f in $S/*.c $S/generic/*.c $S/layout/*.c; do o=$(echo "${f#$S/}" | tr / _); gcc $F -c "$f" -o "$B/${o%.c}.o"; done
gcc $F -mavx2 -DPE_SELECT_FN=pe_select_items_avx2 -c $S/generic/select.c -o $B/select_avx2.o
gcc $F -c $S/arch/x86/cpu_x86.c -o $B/cpu_x86.o
for f in dense_avx2 dense_q8_avx2 perm_avx2 tiers_q8_avx2; do gcc $F $A2 -c $S/arch/x86/$f.c -o $B/$f.o; done
for f in dense_avx512 dense_q8_avx512; do gcc $F $A5 -c $S/arch/x86/$f.c -o $B/$f.o; done
for f in tiers_avx512vbmi2 tiers_q8_avx512vbmi2; do gcc $F $A5 -mavx512vbmi2 -mbmi2 -c $S/arch/x86/$f.c -o $B/$f.o; done
gcc $F -mf16c -c experiments/kernels/kernel_harness.c -o $B/h.o
gcc -o $B/harness $B/*.o -lm -pthread
"$B/harness" "$@"
