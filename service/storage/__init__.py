"""Blob storage behind one small interface: list, read, write atomically, exists.

``open_storage("az://container/prefix")`` (or s3://, file://, a local path) returns a Storage whose
methods take paths relative to that root.
"""

from service.storage.backends import StorageOptions, open_storage
from service.storage.store import MissingFileError, Storage, StorageError

__all__ = ["MissingFileError", "Storage", "StorageError", "StorageOptions", "open_storage"]
