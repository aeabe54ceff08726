"""Fixtures of the batch tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.blobs import Azurite, MotoS3


@pytest.fixture(params=["local", "azure", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh, empty root URI on each backend."""
    if request.param == "local":
        yield str(tmp_path / "root")
    elif request.param == "azure":
        azurite: Azurite = request.getfixturevalue("azurite")
        for name, value in azurite.env().items():
            monkeypatch.setenv(name, value)
        yield f"az://{azurite.new_container()}/root"
    else:
        moto: MotoS3 = request.getfixturevalue("moto_s3")
        for name, value in moto.env().items():
            monkeypatch.setenv(name, value)
        yield f"s3://{moto.new_bucket()}/root"
