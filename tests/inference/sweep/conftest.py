"""Fixtures of the sweep tests."""

import pytest

from sweep_helpers import TINY


@pytest.fixture
def tiny():
    """Keyword options of ``sweep`` for tiny, fast tasks."""
    return {key: dict(value) if isinstance(value, dict) else value for key, value in TINY.items()}
