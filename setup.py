"""Build the optional C helper; everything else is declared in pyproject.toml.

``sockserve._speedups`` batches UDP I/O with recvmmsg/sendmmsg (Linux only). It is
optional: without a compiler, or off Linux, the install still succeeds and the
server uses its recvfrom/sendto loop instead.
"""

import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux") and sys.implementation.name == "cpython":
    ext_modules.append(
        Extension(
            "sockserve._speedups",
            ["src/sockserve/_speedups.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        )
    )

setup(ext_modules=ext_modules)
