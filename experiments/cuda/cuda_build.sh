#!/bin/bash
# Build kernel variants in parallel (on the device machine: 16 cores) into .devbuild/libs.
# Usage: bash experiments/cuda/cuda_build.sh NAME:SRC_DIR:FLAGS ...   (SRC_DIR holds status.cu, bucketmul.cu;
# FLAGS comma-separated extra nvcc flags), e.g. base:src/cuda: prof:.devbuild/prof_src:
# The product sources take no tuning macros: a variant is a patched copy of src/cuda (as the
# profiling build, profiling.sh).
# Each build's log: .devbuild/libs/NAME.log; prints NAME rc seconds.
mkdir -p .devbuild/libs
for v in "$@"; do
  IFS=: read -r name src flags <<<"$v"
  flags=${flags//,/ }
  (
    t0=$(date +%s)
    nvcc -O3 -std=c++17 -shared -Xcompiler -fPIC -gencode=arch=compute_90,code=sm_90 $flags \
      -Xptxas -v -o ".devbuild/libs/$name.so" "$src/status.cu" "$src/bucketmul.cu" \
      >".devbuild/libs/$name.log" 2>&1
    echo "$name rc=$? $(($(date +%s) - t0))s"
  ) &
done
wait
