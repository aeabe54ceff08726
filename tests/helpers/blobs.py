"""Real blob servers on 127.0.0.1 for tests: Azurite (Azure Blob) and moto (S3).

tests/conftest.py makes them the fixtures ``azurite`` and ``moto_s3``: each server is started
once per test run on a free port and stopped afterwards; each test gets its own container or
bucket from ``new_container()`` / ``new_bucket()``.
Azurite comes from ``npm install --prefix .ci azurite``; without it the Azurite tests are skipped
locally and fail where the CI variable is set, so that a broken install cannot go unseen.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import stop_process

ROOT = Path(__file__).resolve().parents[2]
AZURITE_BIN = ROOT / ".ci" / "node_modules" / ".bin" / "azurite"
# Azurite's fixed development account (public, documented by Microsoft).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
_LISTENING = re.compile(r"Blob service is successfully listening at http://127\.0\.0\.1:(\d+)")


@dataclass
class Azurite:
    blob_url: str

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={self.blob_url}/{AZURITE_ACCOUNT};"
        )

    def env(self) -> dict[str, str]:
        """Environment under which az:// URIs reach this server."""
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string}

    def new_container(self) -> str:
        from azure.storage.blob import BlobServiceClient

        name = f"c{uuid.uuid4().hex[:12]}"
        BlobServiceClient.from_connection_string(self.connection_string).create_container(name)
        return name

    def blob_names(self, container: str) -> list[str]:
        from azure.storage.blob import BlobServiceClient

        client = BlobServiceClient.from_connection_string(self.connection_string)
        return sorted(b.name for b in client.get_container_client(container).list_blobs())


@dataclass
class MotoS3:
    endpoint_url: str

    def env(self) -> dict[str, str]:
        """Environment under which s3:// URIs reach this server (fake credentials)."""
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    def _client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def new_bucket(self) -> str:
        name = f"b{uuid.uuid4().hex[:12]}"
        self._client().create_bucket(Bucket=name)
        return name

    def object_names(self, bucket: str) -> list[str]:
        pages = self._client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def start_azurite(workspace: str) -> tuple[subprocess.Popen[str], Azurite]:
    """Start Azurite on free ports (it picks them: port 0) and wait until the blob service listens."""
    process = subprocess.Popen(
        [
            str(AZURITE_BIN),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            "0",
            "--queuePort",
            "0",
            "--tablePort",
            "0",
            "--location",
            workspace,
            "--skipApiVersionCheck",
            "--silent",
            "--disableTelemetry",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        match = _LISTENING.search(line)
        if match:
            # Keep draining its output so that a full pipe can never block it.
            threading.Thread(target=process.stdout.read, daemon=True).start()
            return process, Azurite(f"http://127.0.0.1:{match.group(1)}")
    process.kill()
    raise RuntimeError("Azurite did not start:\n" + "".join(seen))


def azurite_server() -> Iterator[Azurite]:
    if not AZURITE_BIN.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{AZURITE_BIN} is missing: run `npm install --prefix .ci azurite`")
        pytest.skip("Azurite is not installed: run `npm install --prefix .ci azurite`")
    with tempfile.TemporaryDirectory(prefix="azurite-") as workspace:
        process, server = start_azurite(workspace)
        try:
            yield server
        finally:
            stop_process(process, grace_s=10)


def moto_s3_server() -> Iterator[MotoS3]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield MotoS3(f"http://{host}:{port}")
    finally:
        server.stop()
