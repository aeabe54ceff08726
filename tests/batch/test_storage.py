"""The storage interface behaves the same on a local folder, Azure Blob (Azurite) and S3 (moto)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.storage import MissingFileError, StorageError, StorageOptions, open_storage
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


def test_write_read_list_exists(root: str) -> None:
    store = open_storage(root)
    assert store.list() == [] and not store.exists("a/1.json")
    store.write("a/1.json", b"first")
    store.write("a/1.json", b"second")  # a rewrite replaces the whole file
    store.write("a/b/2.png", b"\x89PNG")
    store.write("c.txt", b"c")
    assert store.read("a/1.json") == b"second"
    assert store.read("a/1.json", limit=3) == b"sec"
    assert store.exists("a/1.json") and store.exists()
    assert store.list() == ["a/1.json", "a/b/2.png", "c.txt"]
    assert store.list("a") == ["a/1.json", "a/b/2.png"]
    assert store.list("missing") == []
    many = store.read_many(["a/1.json", "c.txt", "nope"])
    assert many["a/1.json"] == b"second" and many["c.txt"] == b"c"
    assert isinstance(many["nope"], StorageError)
    with pytest.raises(MissingFileError, match="nope does not exist"):
        store.read("nope")


def test_a_root_that_is_a_file(root: str) -> None:
    open_storage(root).write("prompts.csv", b"prompt\nx\n")
    single = open_storage(f"{root}/prompts.csv")
    assert single.is_file()
    folder, name = single.as_folder_of_file()
    assert name == "prompts.csv" and folder.read(name) == b"prompt\nx\n"
    assert not open_storage(root).is_file()


def test_local_writes_leave_no_partial_file_and_leftovers_are_removable(tmp_path: Path) -> None:
    store = open_storage(f"file://{tmp_path}")
    store.write("images/a/0.png", b"png")
    assert sorted(p.name for p in (tmp_path / "images/a").iterdir()) == ["0.png"]
    (tmp_path / "images/a/.1.png.partial-0123456789ab").write_bytes(b"half")
    assert store.list("images") == ["images/a/0.png"]
    assert store.discard_partial_writes("images") == 1
    assert sorted(p.name for p in (tmp_path / "images/a").iterdir()) == ["0.png"]


def test_unknown_schemes_and_unwritable_places_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="unsupported URI scheme 'gs'"):
        open_storage("gs://bucket/x")
    with pytest.raises(StorageError, match="names no container or bucket"):
        open_storage("s3://", StorageOptions(s3_endpoint_url="http://127.0.0.1:9"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="cannot write"):
        open_storage(str(tmp_path / "file" / "below")).write("a", b"1")
