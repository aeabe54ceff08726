"""Which rows have a record, kept as one bit per row of each input file.

A set of (file key, row) tuples costs about 190 bytes a row (a million rows: 190 MB); a bitmap
costs one bit (a million rows: 125 kB), and gives the rows of a file in order for free, which is
the order the predictions files are written in.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from service.batch.files.formats import MAX_JOB_ROWS

# Rows numbered past the job cap cannot be a job's rows; a record with such a number (someone
# else's file, say) is kept in a plain set so that a name cannot make a bitmap huge.
BITMAP_ROWS = MAX_JOB_ROWS


class FinishedRows:
    """(file key, row) pairs: ``add``, ``discard``, ``in``; per key, the rows in order."""

    def __init__(self, pairs: Iterable[tuple[str, int]] = ()) -> None:
        self._bits: dict[str, bytearray] = {}
        self._beyond: set[tuple[str, int]] = set()
        for key, row in pairs:
            self.add(key, row)

    def add(self, key: str, row: int) -> None:
        if row >= BITMAP_ROWS:
            self._beyond.add((key, row))
            return
        bits = self._bits.setdefault(key, bytearray())
        if len(bits) <= row >> 3:
            bits.extend(bytes((row >> 3) + 1 - len(bits)))
        bits[row >> 3] |= 1 << (row & 7)

    def discard(self, key: str, row: int) -> None:
        self._beyond.discard((key, row))
        bits = self._bits.get(key)
        if bits is not None and row < BITMAP_ROWS and len(bits) > row >> 3:
            bits[row >> 3] &= ~(1 << (row & 7)) & 0xFF

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, tuple) or len(item) != 2:
            return False
        key, row = item
        if not isinstance(row, int) or row < 0:
            return False
        if row >= BITMAP_ROWS:
            return item in self._beyond
        return has_row(self._bits.get(key, b""), row)

    def __len__(self) -> int:
        return sum(count_rows(bits) for bits in self._bits.values()) + len(self._beyond)

    def keys(self) -> list[str]:
        """The file keys with at least one row, sorted."""
        found = {key for key, bits in self._bits.items() if any(bits)}
        return sorted(found | {key for key, _ in self._beyond})

    def rows(self, key: str) -> Iterator[int]:
        """The rows of ``key``, ascending."""
        bits = self._bits.get(key, b"")
        for index, byte in enumerate(bits):
            if byte:
                yield from (index * 8 + bit for bit in range(8) if byte >> bit & 1)
        yield from sorted(row for k, row in self._beyond if k == key)

    def count_below(self, key: str, limit: int) -> int:
        """How many rows of ``key`` are numbered below ``limit``."""
        bits = self._bits.get(key, b"")
        whole, rest = divmod(min(limit, BITMAP_ROWS), 8)
        count = count_rows(bits[:whole])
        if rest and whole < len(bits):
            count += (bits[whole] & ((1 << rest) - 1)).bit_count()
        return count + sum(1 for k, row in self._beyond if k == key and row < limit)

    def bitmap(self, key: str) -> bytes:
        """The rows of ``key`` below the job cap as bytes, for ``has_row`` elsewhere (a Ray task)."""
        return bytes(self._bits.get(key, b""))


def has_row(bitmap: bytes | bytearray, row: int) -> bool:
    """Whether ``bitmap`` (from ``FinishedRows.bitmap``) holds ``row``."""
    return 0 <= row >> 3 < len(bitmap) and bool(bitmap[row >> 3] >> (row & 7) & 1)


def count_rows(bitmap: bytes | bytearray) -> int:
    return int.from_bytes(bitmap, "little").bit_count()
