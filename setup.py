"""Builds the optional Cython alignment search; a failed build never fails the install.

Without the extension, ``vits_fast.monotonic_align`` falls back to NumPy (with one warning).
"""

import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that reports a failed compile and carries on."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # compiler missing, headers missing, ...
            print(f"WARNING: vits_fast Cython extension not built ({exc}); using the NumPy fallback",
                  file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            print(f"WARNING: could not build {ext.name} ({exc}); using the NumPy fallback", file=sys.stderr)


def extensions():
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("WARNING: Cython not available; the alignment search will use the NumPy fallback",
              file=sys.stderr)
        return []
    from setuptools import Extension

    ext = Extension(
        "vits_fast.monotonic_align.core",
        ["vits_fast/monotonic_align/core.pyx"],
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )
    try:
        return cythonize([ext], language_level=3, quiet=True)
    except Exception as exc:
        print(f"WARNING: cythonize failed ({exc}); using the NumPy fallback", file=sys.stderr)
        return []


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
