"""The package's metadata is in setup.cfg; this file adds the optional C extension, etl.native.

etl.native holds the per-message loops in C (etl/native.c): the record reader, the parser of the
usual message, the COPY row layout. It is optional: where no C compiler
or Python headers are found, the build goes on without it and the package uses its pure-Python
loops, which give the same results more slowly (docs/performance.md).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "etl.native",
            ["etl/native.c"],
            optional=True,
            extra_compile_args=["-O2", "-std=c99", "-Wall", "-Wextra"],
        )
    ]
)
