"""The storage interface behaves the same on a local folder, Azure Blob (Azurite) and S3 (moto)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.storage import MissingFileError, StorageError, StorageOptions, open_storage


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


def test_iter_list_gives_what_list_gives_a_page_at_a_time(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import service.storage.streams as streams

    monkeypatch.setattr(streams, "PAGE", 3)  # several pages of our own paging on every backend
    store = open_storage(root)
    assert list(store.iter_list()) == [] and list(store.iter_list("missing")) == []
    names = [f"records/k/{i}.json" for i in range(11)]
    names += ["records/k/sub/0.json", "records/kk/1.json", "top.txt"]
    for name in names:
        store.write(name, b"{}")
    listed = store.iter_list("records")
    assert isinstance(listed, Iterator)
    assert sorted(listed) == store.list("records") == sorted(n for n in names if n.startswith("records/"))
    assert sorted(store.iter_list("records/k")) == store.list("records/k")  # not records/kk
    assert sorted(store.iter_list()) == sorted(names)


def test_a_streamed_write_is_committed_whole_or_not_at_all(root: str) -> None:
    store = open_storage(root)
    store.write("out/predictions.csv", b"old")
    # 11 MiB in 1 MiB chunks: several S3 parts and Azure blocks of 5 MiB; readers see the old file
    # until the block ends, then the whole new one.
    chunks = [bytes([65 + i]) * 2**20 for i in range(11)]
    with store.writing("out/predictions.csv") as out:
        for chunk in chunks:
            out.write(chunk)
        assert store.read("out/predictions.csv") == b"old"
    assert store.read("out/predictions.csv") == b"".join(chunks)
    # An error part-way (here the caller's own, after a part was uploaded) leaves the old file
    # whole and no partial file behind; the caller's error comes through as it is.
    with pytest.raises(ValueError, match="the records ran out"), store.writing("out/predictions.csv") as out:
        for chunk in chunks[:7]:
            out.write(chunk)
        raise ValueError("the records ran out")
    assert store.read("out/predictions.csv") == b"".join(chunks)
    with pytest.raises(StorageError, match="cannot read"), store.writing("out/new.csv") as out:
        out.write(b"a line\n")
        raise StorageError("cannot read a record")
    assert store.list("out") == ["out/predictions.csv"]
    if "://" not in root:  # locally, no hidden temporary file either
        assert [p.name for p in (Path(root) / "out").iterdir()] == ["predictions.csv"]
    # Empty and small files too.
    for data in (b"", b"one line\n"):
        with store.writing("out/small.csv") as out:
            out.write(data)
        assert store.read("out/small.csv") == data


def test_a_streamed_write_to_a_place_that_cannot_be_written_is_one_storage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    store = open_storage(str(tmp_path / "file" / "below"))
    with pytest.raises(StorageError, match=r"cannot write .*below/a"), store.writing("a") as out:
        out.write(b"1")
