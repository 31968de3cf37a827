"""Build the optional C helper; everything else is declared in pyproject.toml.

``sockserve._speedups`` batches UDP I/O with recvmmsg/sendmmsg (Linux only). It is
optional: without a compiler, or off Linux, the install still succeeds and the
server uses its recvfrom/sendto loop instead.
"""

import sys
from glob import glob
from os.path import dirname

from setuptools import Extension, setup

# The helper's C units and its private header, all in one folder (not named
# _speedups: a folder of that name would import as an empty namespace package
# wherever the extension was not built). Globbed, so that a new unit cannot be left
# out of the build, and relative to this file, as setuptools wants them.
SPEEDUPS = "src/sockserve/_speedups_c"
here = dirname(__file__) or "."

ext_modules = []
if sys.platform.startswith("linux") and sys.implementation.name == "cpython":
    ext_modules.append(
        Extension(
            "sockserve._speedups",
            sorted(glob(f"{SPEEDUPS}/*.c", root_dir=here)),
            depends=sorted(glob(f"{SPEEDUPS}/*.h", root_dir=here)),
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        )
    )

setup(ext_modules=ext_modules)
