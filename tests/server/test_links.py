"""The store behind OpenAI's url answers: bounded in bytes (least recently used out), expiring,
in memory or in a folder, with tokens nobody can guess."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.web.clients.links import TOKEN, ImageLinks


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("on_disk", [False, True])
def test_links_expire_and_the_least_recently_used_leave_first(tmp_path: Path, on_disk: bool) -> None:
    clock = Clock()
    folder = tmp_path / "links" if on_disk else None
    links = ImageLinks(ttl_s=60, max_bytes=3000, folder=folder, clock=clock)
    first, second = links.put(b"a" * 1000), links.put(b"b" * 1000)
    assert TOKEN.fullmatch(first) and first != second
    assert links.get(first) == (b"a" * 1000, 60)  # read: now the most recently used
    third, fourth = links.put(b"c" * 1000), links.put(b"d" * 1000)  # 4000 > 3000: second leaves
    assert links.get(second) is None and links.get(first) is not None and links.stored_bytes == 3000
    if folder is not None:
        assert sorted(path.stem for path in folder.glob("*.png")) == sorted([first, third, fourth])
    clock.now = 60
    assert links.get(first) is None and len(links) == 0 and links.stored_bytes == 0
    if folder is not None:
        assert list(folder.iterdir()) == []
    with pytest.raises(ValueError, match="SD_IMAGE_LINK_MAX_BYTES"):
        links.put(b"x" * 3001)


def test_a_folder_is_emptied_of_an_earlier_runs_links(tmp_path: Path) -> None:
    old = ImageLinks(ttl_s=60, max_bytes=10_000, folder=tmp_path)
    token = old.put(b"png")
    (tmp_path / "keep.txt").write_text("not ours")
    new = ImageLinks(ttl_s=60, max_bytes=10_000, folder=tmp_path)
    assert new.get(token) is None and not (tmp_path / f"{token}.png").exists()
    assert (tmp_path / "keep.txt").exists()
