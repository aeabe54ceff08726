"""From a URI to a Storage: local paths, file://, az:// (adlfs) and s3:// (s3fs).

Credentials come from where each cloud's own tools look for them, so a job runs with the same
environment as ``az storage`` or ``aws s3``:
- az://container/prefix: AZURE_STORAGE_CONNECTION_STRING; or AZURE_STORAGE_ACCOUNT_NAME with
  AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN; or the account name alone, signing in
  with DefaultAzureCredential (managed identity, workload identity, ``az login``). adlfs reads them.
- s3://bucket/prefix: botocore's chain (AWS_ACCESS_KEY_ID..., profiles, instance roles); the
  endpoint of an S3-compatible store from ``StorageOptions.s3_endpoint_url`` or AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from service.storage.store import Storage, StorageError

AZURE_SCHEMES = ("az", "abfs", "abfss")
_AZURE_CREDENTIALS_HELP = (
    "set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY "
    "or AZURE_STORAGE_SAS_TOKEN, or AZURE_STORAGE_ACCOUNT_NAME alone to sign in with DefaultAzureCredential"
)


# Bounded retries, so that an unreachable store is reported in about 20-30 s (each operation of
# planning gives up after a few seconds of backoff), not minutes.
AZURE_RETRY = {
    "total_retries": 2,
    "connect_retries": 2,
    "read_retries": 2,
    "status_retries": 2,
    "initial_backoff": 0.5,
    "increment_base": 2,
    "random_jitter_range": 0.5,
}
S3_CONFIG = {"connect_timeout": 10, "read_timeout": 60, "retries": {"max_attempts": 4, "mode": "standard"}}


@dataclass(frozen=True)
class StorageOptions:
    """What a URI alone cannot say."""

    s3_endpoint_url: str | None = None


def open_storage(uri: str, options: StorageOptions | None = None) -> Storage:
    """A Storage rooted at ``uri``. Raises StorageError for an unknown scheme or missing credentials."""
    options = options or StorageOptions()
    scheme, _, rest = uri.partition("://") if "://" in uri else ("", "", uri)
    scheme = scheme.lower()
    if scheme in ("", "file"):
        path = os.path.abspath(os.path.expanduser(rest))
        return Storage(LocalFileSystem(), path, uri)
    if not rest.strip("/"):
        raise StorageError(f"{uri} names no container or bucket; write {scheme}://NAME/prefix")
    if scheme in AZURE_SCHEMES:
        return Storage(_azure_filesystem(uri), rest.strip("/"), uri)
    if scheme == "s3":
        return Storage(_s3_filesystem(uri, options), rest.strip("/"), uri)
    raise StorageError(
        f"unsupported URI scheme {scheme!r} in {uri}; use a local path, file://, az://container/prefix "
        "or s3://bucket/prefix"
    )


def _azure_filesystem(uri: str) -> AbstractFileSystem:
    from adlfs import AzureBlobFileSystem

    # Azure's SDK logs every request and response, headers and all, at INFO: many lines per retry.
    logging.getLogger("azure.core.pipeline.policies.http_logging_policy").setLevel(logging.WARNING)
    try:
        # skip_instance_cache: fsspec would otherwise hand back a client built for other credentials.
        fs: AbstractFileSystem = AzureBlobFileSystem(skip_instance_cache=True, use_listings_cache=False)
    except ValueError as error:
        raise StorageError(f"no Azure Storage credentials for {uri}: {_AZURE_CREDENTIALS_HELP}") from error
    _bound_azure_retries(fs)
    return fs


def _bound_azure_retries(fs: AbstractFileSystem) -> None:
    """Retries that give up within seconds: the storage SDK's defaults (15 s, then 18, 24, 42...
    per request) made an unreachable account take four minutes to report. adlfs passes no retry
    settings to the client it builds, so its policy (shared by every container client made from
    it) is changed in place (this is azure-core's own RetryPolicy, not a loop of ours); the runner
    retries each row's writes on top of this."""
    policy = getattr(getattr(getattr(fs, "service_client", None), "_config", None), "retry_policy", None)
    if policy is None:
        return
    for name, value in AZURE_RETRY.items():
        if hasattr(policy, name):
            setattr(policy, name, value)


def _s3_filesystem(uri: str, options: StorageOptions) -> AbstractFileSystem:
    from s3fs import S3FileSystem

    client_kwargs = {"endpoint_url": options.s3_endpoint_url} if options.s3_endpoint_url else None
    try:
        fs: AbstractFileSystem = S3FileSystem(
            client_kwargs=client_kwargs,
            config_kwargs=S3_CONFIG,
            skip_instance_cache=True,
            use_listings_cache=False,
        )
    except Exception as error:
        raise StorageError(f"cannot set up S3 access for {uri}: {error}") from error
    return fs
