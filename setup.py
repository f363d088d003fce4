"""The observer's compiled core (issue 11): C extensions built where a compiler is.

Everything else of the package is declared in pyproject.toml. Each extension is
optional: where no C compiler (or no Python headers) is present the build warns and
goes on, and the package runs its pure-Python observer instead
(`exporter.native`, reported by `step_runner_exporter_build_info{observer_core}`).
"""

from pathlib import Path

from setuptools import Extension, setup

# (module, C source): the compiled twins of exporter.hpack_cache's decoder and of
# exporter.h2.FrameReader. A source not in this checkout is simply not built.
_CORE = (
    ("exporter._hpack_core", "exporter/_hpack_core.c", ["exporter/_hpack_huffman.h"]),
    ("exporter._h2_core", "exporter/_h2_core.c", []),
)

setup(
    ext_modules=[
        Extension(
            name, [source], depends=depends, optional=True, extra_compile_args=["-O2", "-std=c11"]
        )
        for name, source, depends in _CORE
        if Path(__file__).with_name("exporter").joinpath(Path(source).name).exists()
    ]
)
