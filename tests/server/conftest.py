"""Fixtures of the server tier."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPoolExecutor]:
    """Threads for concurrent blocking HTTP clients."""
    with ThreadPoolExecutor(8) as executor:
        yield executor
