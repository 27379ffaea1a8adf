#!/usr/bin/env bash
# Cross-compiles the NEON kernels with aarch64-linux-gnu-gcc and runs tests/neon/neon_check.c
# under qemu-aarch64. Installs the two tools with apt-get when they are missing and it can
# (CI); exits 77 (skipped) when they are missing and cannot be installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null && apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user >/dev/null
    else
        echo "aarch64-linux-gnu-gcc or qemu-aarch64 missing" >&2
        exit 77
    fi
fi
S=src/cpu
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
for f in $S/*.c $S/generic/*.c $S/layout/*.c $S/arch/arm/*.c; do
    o=$(echo "${f#$S/}" | tr / _)
    aarch64-linux-gnu-gcc -O2 -std=c11 -Wall -Wextra -Werror -I$S -c "$f" -o "$OUT/${o%.c}.o"
done
aarch64-linux-gnu-gcc -O2 -std=c11 -Wall -Werror -I$S -c tests/neon/neon_check.c -o "$OUT/check.o"
aarch64-linux-gnu-gcc -static -pthread -o "$OUT/neon_check" "$OUT"/*.o -lm
qemu-aarch64 "$OUT/neon_check"
