"""Builds pyeffort._core from the C sources in src/cpu (each ISA file with its own flags)."""

import glob
import os
import platform
import subprocess
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

CPU = "src/cpu/"
# src/cpu: the drivers, the table and the pool; generic/: the C-level spec (build, selection,
# scalar kernels, decode ops); layout/: the index and the in-memory copies with their scalar
# kernels. All portable, compiled with CFLAGS alone.
PORTABLE = sorted(f for d in ("", "generic/", "layout/") for f in glob.glob(CPU + d + "*.c"))
SOURCES = ["pyeffort/_core.pyx"] + PORTABLE
# arch/: per-ISA files, each compiled with its own flags (never -march=native) and chosen at
# run time (dispatch.c); (source, flags, object folder) per object.
X86 = platform.machine().lower() in ("x86_64", "amd64")
ARM64 = platform.machine().lower() in ("aarch64", "arm64")
AVX2 = ["-mavx2", "-mfma", "-mf16c"]
AVX512 = AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
X86_FILES = {
    "cpu_x86.c": [],
    "dense_avx2.c": AVX2,
    "perm_avx2.c": AVX2,
    "tiers_q8_avx2.c": AVX2,
    "dense_avx512.c": AVX512,
    "dense_q8_avx2.c": AVX2,
    "dense_q8_avx512.c": AVX512,
    "tiers_avx512vbmi2.c": AVX512 + ["-mavx512vbmi2", "-mbmi2"],
    "tiers_q8_avx512vbmi2.c": AVX512 + ["-mavx512vbmi2", "-mbmi2"],
}
ISA_OBJECTS = (
    [(CPU + "arch/x86/" + f, flags, "isa") for f, flags in X86_FILES.items()]
    # the selection again with AVX2, as pe_select_items_avx2 (its own object folder)
    + [(CPU + "generic/select.c", ["-mavx2", "-DPE_SELECT_FN=pe_select_items_avx2"], "avx2")]
    if X86
    else [(f, [], "isa") for f in sorted(glob.glob(CPU + "arch/arm/*.c"))]
    if ARM64
    else []
)
CFLAGS = ["-O3", "-std=c11", "-fno-fast-math"]

core = Extension(
    "pyeffort._core",
    sources=SOURCES,
    # rebuilt when a header or an ISA file changes too
    depends=sorted(glob.glob(CPU + "**/*.h", recursive=True) + [s for s, _, _ in ISA_OBJECTS]),
    include_dirs=[CPU],
    extra_compile_args=CFLAGS,
    extra_link_args=["-pthread"],
)


class build_ext_isa(build_ext):
    """Compiles each ISA object with its own flags and links them into pyeffort._core."""

    def build_extension(self, ext):
        if ext.name == "pyeffort._core" and ISA_OBJECTS:
            objects = []
            for source, flags, folder in ISA_OBJECTS:
                objects += self.compiler.compile(
                    [source],
                    output_dir=os.path.join(self.build_temp, folder),
                    include_dirs=[CPU],
                    extra_postargs=CFLAGS + ["-fPIC"] + flags,
                )
            ext.extra_objects = objects
        super().build_extension(ext)


# ---------------------------------------------------------------- CUDA (pyeffort/cuda.py)

CUDA_SRC = "src/cuda/"
CUDA_UNITS = ("status.cu", "bucketmul.cu", "cluster.cu", "dense_q8.cu", "channel_skip.cu")  # cuda.SOURCES


def cuda_sources() -> list[str]:
    """The CUDA sources and headers, as file names in src/cuda."""
    return sorted(f for f in os.listdir(CUDA_SRC) if f.endswith((".cu", ".cuh", ".h")))


class build_ext_cuda(build_ext_isa):
    """PYEFFORT_CUDA=1: also build pyeffort/_pe_cuda.so from src/cuda with nvcc (otherwise
    pyeffort.cuda compiles it at first use; a CPU-only install needs neither nvcc nor torch)."""

    def run(self):
        super().run()
        archs = os.environ.get("PYEFFORT_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
        out = os.path.join(os.path.dirname(self.get_ext_fullpath("pyeffort._core")), "_pe_cuda.so")
        cmd = [os.environ.get("NVCC", "nvcc"), "-O3", "-std=c++17", "-shared", "-Xcompiler"]
        cmd += ["-fPIC", *[f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs], "-o", out]
        subprocess.run(cmd + [CUDA_SRC + f for f in CUDA_UNITS], check=True)


class build_py_cuda(build_py):
    """Also copies the CUDA sources into the package as pyeffort/_cuda_src, where an installed
    pyeffort.cuda finds them to compile the kernels at first use (cuda.source_dir)."""

    def run(self):
        super().run()
        dest = os.path.join(self.build_lib, "pyeffort", "_cuda_src")
        self.mkpath(dest)
        for name in cuda_sources():
            self.copy_file(CUDA_SRC + name, os.path.join(dest, name))


class sdist_cuda(sdist):
    """Also puts src/cuda in the source distribution (a wheel built from it ships them)."""

    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        self.mkpath(os.path.join(base_dir, CUDA_SRC))
        for name in cuda_sources():
            self.copy_file(CUDA_SRC + name, os.path.join(base_dir, CUDA_SRC, name))


# ---------------------------------------------------------------- Metal (pyeffort/metal.py), macOS only

METAL_SRC = "src/metal/"
MACOS = sys.platform == "darwin"
metal = Extension(
    "pyeffort._metal",  # the Objective-C host; pyeffort.metal calls it through ctypes
    sources=[METAL_SRC + "pe_metal.m"],
    depends=sorted(glob.glob(METAL_SRC + "*.h")),
    include_dirs=[METAL_SRC],
    extra_compile_args=["-O2", "-fobjc-arc"],
    extra_link_args=["-framework", "Metal", "-framework", "Foundation"],
)


def metal_sources() -> list[str]:
    """The kernel sources and their header, as file names in src/metal (pyeffort.metal.SOURCES)."""
    return sorted(f for f in os.listdir(METAL_SRC) if f.endswith((".metal", ".h")))


class build_ext_metal(build_ext_isa):
    """macOS: also compiles the kernels into pyeffort/_metal.metallib with xcrun when the Metal
    compiler is installed (Xcode); without it the host compiles them at first use."""

    def run(self):
        super().run()
        lib_dir = os.path.dirname(self.get_ext_fullpath("pyeffort._metal"))
        xcrun = ["xcrun", "-sdk", "macosx"]
        if subprocess.run(xcrun + ["-f", "metal"], capture_output=True, check=False).returncode:
            print("pyeffort: no Metal compiler (xcrun metal): the kernels compile at first use")
            return
        airs = []
        self.mkpath(self.build_temp)
        for name in (f for f in metal_sources() if f.endswith(".metal")):
            airs.append(os.path.join(self.build_temp, name + ".air"))
            cmd = xcrun + ["metal", "-c", "-fno-fast-math", "-I", METAL_SRC, METAL_SRC + name]
            subprocess.run(cmd + ["-o", airs[-1]], check=True)
        out = os.path.join(lib_dir, "_metal.metallib")
        subprocess.run(xcrun + ["metallib", *airs, "-o", out], check=True)


class build_py_metal(build_py_cuda):
    """macOS: also copies the Metal sources into the package as pyeffort/_metal_src (compiled
    at first use where no .metallib was built: metal.source_dir)."""

    def run(self):
        super().run()
        dest = os.path.join(self.build_lib, "pyeffort", "_metal_src")
        self.mkpath(dest)
        for name in metal_sources():
            self.copy_file(METAL_SRC + name, os.path.join(dest, name))


class sdist_metal(sdist_cuda):
    """Also puts src/metal in the source distribution (a macOS build from it needs it)."""

    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        self.mkpath(os.path.join(base_dir, METAL_SRC))
        for name in os.listdir(METAL_SRC):
            self.copy_file(METAL_SRC + name, os.path.join(base_dir, METAL_SRC, name))


cuda = os.environ.get("PYEFFORT_CUDA") == "1"
cuda_cmd = {
    "build_ext": build_ext_cuda if cuda else build_ext_metal if MACOS else build_ext_isa,
    "build_py": build_py_metal if MACOS else build_py_cuda,
    "sdist": sdist_metal,
}
extensions = cythonize([core], language_level=3) + ([metal] if MACOS else [])
setup(ext_modules=extensions, cmdclass=cuda_cmd)
