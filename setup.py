"""Builds pyeffort._core from the C sources in src/cpu (each ISA file with its own flags)."""

import os
import subprocess

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CPU = "src/cpu/"
SOURCES = ["pyeffort/_core.pyx"] + [
    CPU + f for f in ("build.c", "select.c", "dispatch.c", "bucketmul_scalar.c")
]

core = Extension(
    "pyeffort._core",
    sources=SOURCES,
    include_dirs=[CPU],
    extra_compile_args=["-O3", "-std=c11", "-fno-fast-math"],
)


class build_ext_cuda(build_ext):
    """PYEFFORT_CUDA=1: also build pyeffort/_pe_cuda.so from src/cuda with nvcc (otherwise
    pyeffort.cuda compiles it at first use; a CPU-only install needs neither nvcc nor torch)."""

    def run(self):
        super().run()
        archs = os.environ.get("PYEFFORT_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
        out = os.path.join(os.path.dirname(self.get_ext_fullpath("pyeffort._core")), "_pe_cuda.so")
        cmd = [os.environ.get("NVCC", "nvcc"), "-O3", "-std=c++17", "-shared", "-Xcompiler"]
        cmd += ["-fPIC", *[f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs], "-o", out]
        subprocess.run(cmd + ["src/cuda/select.cu", "src/cuda/bucketmul.cu"], check=True)


cuda_cmd = {"build_ext": build_ext_cuda} if os.environ.get("PYEFFORT_CUDA") == "1" else {}
setup(ext_modules=cythonize([core], language_level=3), cmdclass=cuda_cmd)
