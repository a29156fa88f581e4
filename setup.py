"""The one C extension: the fan-out's batch writer (optional; without a C compiler the server
writes one connection at a time)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "perps_indexer.server._sendeach",
            ["src/perps_indexer/server/_sendeach.c"],
            optional=True,
        )
    ]
)
