"""Builds pyeffort._core from the C sources in src/cpu (each ISA file with its own flags)."""

from Cython.Build import cythonize
from setuptools import Extension, setup

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

setup(ext_modules=cythonize([core], language_level=3))
