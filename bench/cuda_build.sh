#!/bin/bash
# Build kernel variants in parallel (on the device machine: 16 cores) into .devbuild/libs.
# Usage: bash bench/cuda_build.sh NAME:SRC_DIR:FLAGS ...   (SRC_DIR holds select.cu, bucketmul.cu;
# FLAGS comma-separated), e.g. a_base:.devbuild/base_src/src/cuda:-DPE_BENCH_ONLY
#   c_rel:src/cuda:-DPE_BENCH_ONLY,-DPE_SIG_RELEASE
# Each build's log: .devbuild/libs/NAME.log; prints NAME rc seconds.
mkdir -p .devbuild/libs
for v in "$@"; do
  IFS=: read -r name src flags <<<"$v"
  flags=${flags//,/ }
  (
    t0=$(date +%s)
    nvcc -O3 -std=c++17 -shared -Xcompiler -fPIC -gencode=arch=compute_90,code=sm_90 $flags \
      -Xptxas -v -o ".devbuild/libs/$name.so" "$src/select.cu" "$src/bucketmul.cu" \
      >".devbuild/libs/$name.log" 2>&1
    echo "$name rc=$? $(($(date +%s) - t0))s"
  ) &
done
wait
