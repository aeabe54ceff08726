"""Session-wide test setup and the fixtures several tiers share.

Fixtures: ``tiny_engine`` (random:tiny on the CPU, built once per test run), ``azurite`` and
``moto_s3`` (real blob servers on 127.0.0.1, one each per run; every test makes its own container
or bucket). Helpers are imported from the ``tests.helpers`` package.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import blobs
from tests.helpers.servers import tiny_engine as _shared_tiny_engine

# Ray: clusters started by `ray start` require a token, and Ray reads its authentication mode once
# per process. Give the whole run (this process and every cluster it starts, which inherit the
# environment) a fresh token of its own, before any test imports Ray, so that nothing depends on
# a token an earlier run left in the home directory.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
os.environ.pop("RAY_AUTH_TOKEN_PATH", None)


@pytest.fixture(scope="session")
def tiny_engine() -> Any:
    """random:tiny on the CPU, shared by every test that only reads it. Tests that change an
    engine's components (the safety tests) load their own."""
    return _shared_tiny_engine()


@pytest.fixture(scope="session")
def azurite() -> Iterator[blobs.Azurite]:
    yield from blobs.azurite_server()


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[blobs.MotoS3]:
    yield from blobs.moto_s3_server()
