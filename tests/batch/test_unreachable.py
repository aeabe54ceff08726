"""An unreachable store fails fast: bounded retries on every backend, then one line that names the
URL and what to check, never a credential, and no SDK dumps."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from service.cli.main import main
from service.storage import StorageError
from service.storage.store import _reason

pytestmark = pytest.mark.slow

SIGNATURE = "c2VjcmV0LXNpZ25hdHVyZQ%3D%3D"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def closed_port() -> int:
    """A local port nothing listens on (connections are refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_credentials_never_reach_a_message() -> None:
    for text in [
        f"GET https://acct.blob.core.windows.net/c/x?sv=2022&sig={SIGNATURE}&se=2030 failed",
        f"bad connection string AccountKey={ACCOUNT_KEY};BlobEndpoint=x",
        f"SharedAccessSignature={SIGNATURE};",
        f"https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA/x&X-Amz-Signature={SIGNATURE} refused",
    ]:
        line = _reason(StorageError(text))
        assert SIGNATURE not in line and ACCOUNT_KEY not in line and "***" in line, line


@pytest.mark.parametrize("backend", ["azure-key", "azure-sas", "s3"])
def test_an_unreachable_store_is_one_line_within_half_a_minute(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    endpoint = f"http://127.0.0.1:{closed_port()}"
    if backend.startswith("azure"):
        secret = (
            f"AccountKey={ACCOUNT_KEY}"
            if backend == "azure-key"
            else f"SharedAccessSignature=sv=2022-11-02&sig={SIGNATURE}"
        )
        monkeypatch.setenv(
            "AZURE_STORAGE_CONNECTION_STRING",
            f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;{secret};"
            f"BlobEndpoint={endpoint}/devstoreaccount1;",
        )
        uri, extra = "az://prompts/june", []
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ACCOUNT_KEY)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        uri, extra = "s3://prompts/june", ["--s3-endpoint-url", endpoint]
    started = time.monotonic()
    output = str(tmp_path / "out")
    code = main(["batch", "--input", uri, "--output", output, "--model", "random:tiny", *extra])
    seconds = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2
    assert seconds < 35, f"{seconds:.0f} s of retries"
    errors = [line for line in err.splitlines() if line.startswith("sd-endpoint batch: error:")]
    assert len(errors) == 1 and uri in errors[0] and "check the URI" in errors[0], err
    assert "Traceback" not in err and "Request URL" not in err and "Request headers" not in err, err
    assert ACCOUNT_KEY not in err and SIGNATURE not in err
