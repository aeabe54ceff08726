"""The model library (SD_MODELS): its entries, checked without loading weights, and their hashes."""

from __future__ import annotations

from model.library.catalog import LibraryProblem, ModelEntry, inspect_entry, scan_library

__all__ = ["LibraryProblem", "ModelEntry", "inspect_entry", "scan_library"]
