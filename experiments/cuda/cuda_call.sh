#!/bin/bash
# One device call: kernel builds (in parallel), tests of one full build, the builds side by side
# (cuda_variants.py), the model with several builds (cuda_model.py --libs). Run from the repo root,
# or set CLEAN to a clean export of it (README_cuda.md, update (6), ran in .devbuild/h15/clean).
# env: BUILDS (cuda_build.sh specs), TESTLIB, LIBS, MODELLIBS, SHAPES, EFFORTS, PROF
set -o pipefail
cd "${CLEAN:-$(dirname "$0")/..}"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PYEFFORT_CUDA_CACHE=/tmp/pecache
OUT=${OUT:-/tmp/out}; L=.devbuild/libs
date +%T; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch; print(torch.__version__, torch.version.cuda)"; nvcc --version | tail -1
bash experiments/cuda/cuda_build.sh $BUILDS 2>&1 | tee $OUT/build.txt
grep -h "spill" $L/*.log | sort | uniq -c
date +%T
python3 -c "import sys; sys.path.insert(0, 'experiments/cuda'); import cuda_bench as c; print('copy GB/s (read+write):', round(c.copy_bandwidth()), round(c.copy_bandwidth()))"
if [ -n "$TESTLIB" ]; then
  PYEFFORT_BACKEND=numpy PYEFFORT_CUDA_LIB=$L/$TESTLIB.so timeout ${TTEST:-240} python3 -m pytest tests/test_cuda.py -q -x 2>&1 | tail -6 | tee $OUT/tests.log
  date +%T
fi
if [ -n "$LIBS" ]; then
  timeout ${TLIBS:-300} python3 experiments/cuda/cuda_variants.py $(for l in $LIBS; do echo $L/$l.so; done) --groups \
    --shapes ${SHAPES:-4096x14336,14336x4096,4096x4096,4096x1024} --efforts ${EFFORTS:-1.0,0.5,0.25,0.1} \
    --profile ${PROF:-0.25} --json $OUT/libs.json 2>&1 | tee $OUT/libs.log | grep -v phases
  date +%T
fi
if [ -n "$MODELLIBS" ]; then
  timeout ${TMODEL:-200} python3 experiments/cuda/cuda_model.py --libs $(echo $MODELLIBS | sed "s#\([^ ]*\)#$L/\1.so#g; s/ /,/g") --json $OUT/model.json 2>&1 | tail -12
  date +%T
fi
grep phases $OUT/libs.log | grep -v "w1w3 ct256" | head -14
