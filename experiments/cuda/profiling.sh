#!/bin/bash
# The profiling build (on the device machine): src/cuda with profiling.patch applied, built by
# cuda_build.sh into .devbuild/libs/prof.so. Then PE_PROFILE_LIB=.devbuild/libs/prof.so.
set -e
rm -rf .devbuild/prof_src && mkdir -p .devbuild && cp -r src/cuda .devbuild/prof_src
patch -s -p1 -d .devbuild/prof_src < experiments/cuda/profiling.patch
bash experiments/cuda/cuda_build.sh prof:.devbuild/prof_src:
