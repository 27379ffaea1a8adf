#!/bin/bash
# One device call: build, check and time the CUDA backend. Usage: bash experiments/cuda/cuda_run.sh [stage...]
# stages: env smoke tests quick build variants libs ct256 bench model modelng model2 (default: env smoke tests quick model).
# Logs go to $OUT. A prebuilt pyeffort/_pe_cuda.so (carried) is used if it loads, else nvcc.
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1 PYEFFORT_CUDA_CACHE=/tmp/pecache PYEFFORT_REAL_NPZ=.devbuild/real.npz
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
stages=${*:-env smoke tests quick model}
for s in $stages; do
  echo "=== $s $(date +%T)"
  case $s in
    env)
      nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
      python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
      nvcc --version | tail -1
      python3 setup.py build_ext --inplace -q > "$OUT/build_ext.log" 2>&1 || echo "C core build FAILED"
      python3 -c "from pyeffort import cuda; cuda._lib(); print('prebuilt cuda lib ok')" 2>&1 | tail -1 |
        grep -q ok || { echo "prebuilt lib unusable: compiling"; rm -f pyeffort/_pe_cuda.so; }
      python3 -c "import time; t=time.time(); from pyeffort import cuda; cuda._lib(); print('cuda lib ok', round(time.time()-t,1), 's')"
      ;;
    smoke)
      timeout 120 python3 experiments/cuda/cuda_smoke.py 2>&1 | tee "$OUT/smoke.log"
      best=$(grep '^BEST_ENV=' "$OUT/smoke.log" | cut -d= -f2-)
      [ -n "$best" ] && export $best && echo "using $best"
      ;;
    tests) timeout 300 python3 -m pytest tests/test_cuda.py -q -rA --timeout 120 2>&1 | tail -40 | tee "$OUT/tests.log" ;;
    build)  # VARIANTS="name:srcdir:flags ..." built in parallel into .devbuild/libs (cuda_build.sh)
      bash experiments/cuda/cuda_build.sh $VARIANTS 2>&1 | tee "$OUT/build.txt"
      tar czf "$OUT/buildlogs.tgz" .devbuild/libs/*.log ;;
    quick) timeout 200 python3 experiments/cuda/cuda_bench.py --quick --shapes 4096x14336,4096x4096 --json "$OUT/quick.json" ;;
    ct256) timeout 150 python3 experiments/cuda/cuda_bench.py --quick --ct 256 --shapes 4096x14336,14336x4096 --json "$OUT/ct256.json" ;;
    modelng) timeout 300 python3 experiments/cuda/cuda_model.py --no-groups --json "$OUT/model_nogroups.json" ;;
    variants)  # other builds carried in .devbuild/libs (e.g. profiling.sh's): the quick kernel bench
      for lib in .devbuild/libs/*.so; do
        echo "--- $lib"
        PYEFFORT_CUDA_LIB=$lib timeout 150 python3 experiments/cuda/cuda_bench.py --quick --no-groups \
          --shapes 4096x14336,4096x4096,14336x4096 --json "$OUT/variant_$(basename $lib .so).json"
      done ;;
    libs)  # the builds in .devbuild/libs side by side in one process (experiments/cuda/cuda_variants.py)
      timeout 480 python3 experiments/cuda/cuda_variants.py .devbuild/libs/*.so --shapes "${SHAPES:-4096x14336,4096x4096}" \
        --json "$OUT/libs.json" 2>&1 |
        tee "$OUT/libs.log" ;;
    bench) timeout 400 python3 experiments/cuda/cuda_bench.py --json "$OUT/bench.json" ;;
    model) timeout 300 python3 experiments/cuda/cuda_model.py --json "$OUT/model.json" ;;
    model2) timeout 300 python3 experiments/cuda/cuda_model.py --streams --json "$OUT/model_streams.json" ;;
  esac
done
echo "=== done $(date +%T)"
