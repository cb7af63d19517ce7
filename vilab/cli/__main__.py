"""The command line, run with ``python -m`` on this package."""

from vilab.cli.main import main

__all__: list[str] = []

if __name__ == "__main__":
    raise SystemExit(main())
