#!/usr/bin/env bash
# Builds bench/kernel_harness.c against src/cpu (no Python) and runs it:
#   bash bench/kernel_harness.sh N_IN N_OUT KERNEL THREADS
set -euo pipefail
cd "$(dirname "$0")/.."
S=src/cpu; B=$(mktemp -d); F="-O3 -std=c11 -I$S ${EXTRA:-}"
A2="-mavx2 -mfma -mf16c"; A5="$A2 -mavx512f -mavx512bw -mavx512vl -mavx512dq"
for f in build select pack tiers perm dispatch cpuinfo threads bucketmul_scalar; do gcc $F -c $S/$f.c -o $B/$f.o; done
gcc $F -mavx2 -c $S/select_avx2.c -o $B/select_avx2.o
for f in bucketmul_avx2 dense_avx2 permmul_avx2; do gcc $F $A2 -c $S/$f.c -o $B/$f.o; done
for f in bucketmul_avx512 dense_avx512; do gcc $F $A5 -c $S/$f.c -o $B/$f.o; done
gcc $F $A5 -mavx512vbmi2 -mbmi2 -c $S/tiermul_avx512.c -o $B/tiermul_avx512.o
gcc $F -mf16c -c bench/kernel_harness.c -o $B/h.o
gcc -o $B/harness $B/*.o -lm -pthread
cp "$B/harness" /tmp/pe_harness 2>/dev/null || true
"$B/harness" "$@"
