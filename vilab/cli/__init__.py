"""The ``vilab`` command line."""

from vilab.cli.main import (  # noqa: F401 -- the package's public names
    main,
    build_parser,
)

__all__ = ["main", "build_parser"]
