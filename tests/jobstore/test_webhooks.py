"""Webhooks against a real receiver on 127.0.0.1 that verifies every delivery with the standardwebhooks
library, as a user's receiver would: signing, rotation, retries, limits, and the addresses refused."""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook

from service.jobstore import addresses
from service.jobstore.webhooks import Deliveries, WebhookError, WebhookPolicy, check_url

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
NEW_SECRET = "whsec_" + base64.b64encode(b"n" * 32).decode()
FAST = {"timeout_s": 2.0, "retry_for_s": 10.0, "first_backoff_s": 0.01, "max_backoff_s": 2.0}
Action = Callable[[BaseHTTPRequestHandler], None]


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    url: str
    hits: list[Hit] = field(default_factory=list)
    plan: list[Action] = field(default_factory=list)  # one action per request, then 204s


def answer(status: int, **headers: str) -> Action:
    def act(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name.replace("_", "-"), value)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return act


def slow(seconds: float) -> Action:
    def act(handler: BaseHTTPRequestHandler) -> None:
        time.sleep(seconds)
        answer(204)(handler)

    return act


def endless(handler: BaseHTTPRequestHandler) -> None:
    """A 200 whose body never ends: a sender that read it all would never finish."""
    handler.send_response(200)
    handler.send_header("Content-Length", str(10**12))
    handler.end_headers()
    chunk = b"x" * 65536
    try:
        for _ in range(100_000):
            handler.wfile.write(chunk)
    except OSError:
        pass


def serve(tls: ssl.SSLContext | None = None) -> Iterator[Receiver]:
    receiver = Receiver("")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            headers = {name.lower(): value for name, value in self.headers.items()}
            receiver.hits.append(Hit(self.path, headers, body, time.monotonic()))
            (receiver.plan.pop(0) if receiver.plan else answer(204))(self)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    receiver.url = f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}/hook"
    yield receiver
    server.shutdown()
    server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    yield from serve()


def deliver(
    policy: WebhookPolicy,
    url: str,
    payload: dict[str, Any] | None = None,
    *,
    tls: ssl.SSLContext | None = None,
) -> tuple[bool, list[tuple[str, str]], float]:
    """Sends one message; (delivered, [(event, outcome) per attempt], seconds taken)."""
    outcomes: list[tuple[str, str]] = []

    async def run() -> bool:
        deliveries = Deliveries(policy, on_attempt=lambda e, o: outcomes.append((e, o)), tls=tls)
        try:
            return await deliveries.send(
                url, "job.completed", payload or {"id": "job_1", "state": "succeeded"}
            )
        finally:
            await deliveries.aclose()

    started = time.monotonic()
    delivered = asyncio.run(asyncio.wait_for(run(), 60))
    return delivered, outcomes, time.monotonic() - started


def local(**settings: Any) -> WebhookPolicy:
    return WebhookPolicy.parse(settings.pop("secret", SECRET), "127.0.0.1", **{**FAST, **settings})


def test_a_delivery_is_signed_as_the_standard_says_and_verifies(receiver: Receiver, caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="service.jobstore.webhooks")
    delivered, outcomes, _ = deliver(local(), receiver.url, {"id": "job_1", "prompt": "a very secret cat"})
    assert delivered and outcomes == [("job.completed", "delivered")]
    (hit,) = receiver.hits
    message = Webhook(SECRET).verify(hit.body, hit.headers)
    assert message["type"] == "job.completed" and message["data"]["id"] == "job_1"
    assert datetime.datetime.fromisoformat(message["timestamp"]).tzinfo is not None
    assert hit.path == "/hook" and hit.headers["host"] == receiver.url.split("/")[2]
    assert hit.headers["webhook-id"].startswith("msg_") and hit.headers["content-type"] == "application/json"
    logged = caplog.text
    assert "delivered" in logged and "job.completed" in logged
    assert "secret cat" not in logged and SECRET[6:] not in logged


def test_with_two_secrets_each_signs_and_a_receiver_knowing_either_verifies(receiver: Receiver) -> None:
    assert deliver(local(secret=f"{SECRET}, {NEW_SECRET}"), receiver.url)[0]
    (hit,) = receiver.hits
    assert len(hit.headers["webhook-signature"].split(" ")) == 2
    Webhook(NEW_SECRET).verify(hit.body, hit.headers)
    Webhook(SECRET).verify(hit.body, hit.headers)


def test_5xx_answers_are_retried_with_the_same_message_id_until_delivered(receiver: Receiver) -> None:
    receiver.plan = [answer(500), answer(503), answer(200)]
    delivered, outcomes, _ = deliver(local(), receiver.url)
    assert delivered and [o for _, o in outcomes] == ["retry", "retry", "delivered"]
    assert len({hit.headers["webhook-id"] for hit in receiver.hits}) == 1 and len(receiver.hits) == 3
    assert len({hit.body for hit in receiver.hits}) == 1
    for hit in receiver.hits:
        Webhook(SECRET).verify(hit.body, hit.headers)


def test_429_waits_as_long_as_retry_after_says(receiver: Receiver) -> None:
    receiver.plan = [answer(429, Retry_After="1"), answer(204)]
    delivered, outcomes, _ = deliver(local(), receiver.url)
    assert delivered and [o for _, o in outcomes] == ["retry", "delivered"]
    assert receiver.hits[1].at - receiver.hits[0].at >= 0.9


def test_a_receiver_slower_than_the_timeout_is_retried_then_given_up(receiver: Receiver) -> None:
    receiver.plan = [slow(3) for _ in range(10)]
    delivered, outcomes, took = deliver(
        local(timeout_s=0.3, retry_for_s=1.0, max_backoff_s=0.2), receiver.url
    )
    assert not delivered and outcomes[-1][1] == "failed" and len(outcomes) >= 2
    assert {o for _, o in outcomes[:-1]} == {"retry"}
    assert took < 2.5


def test_only_the_first_bytes_of_an_answer_are_read(receiver: Receiver) -> None:
    receiver.plan = [endless]
    delivered, _, took = deliver(local(max_response_bytes=1024), receiver.url)
    assert delivered and took < 5


def test_a_redirect_is_not_followed_and_fails_the_message(receiver: Receiver) -> None:
    receiver.plan = [answer(302, Location=receiver.url.replace("/hook", "/elsewhere"))]
    delivered, outcomes, _ = deliver(local(), receiver.url)
    assert not delivered and outcomes == [("job.completed", "failed")]
    assert [hit.path for hit in receiver.hits] == ["/hook"]


def test_a_4xx_answer_fails_at_once(receiver: Receiver) -> None:
    receiver.plan = [answer(410)]
    delivered, outcomes, _ = deliver(local(), receiver.url)
    assert not delivered and outcomes == [("job.completed", "failed")] and len(receiver.hits) == 1


def test_a_receiver_that_is_down_is_retried_then_given_up() -> None:
    from tests.helpers.ports import free_port

    policy = local(retry_for_s=0.5, max_backoff_s=0.1)
    delivered, outcomes, _ = deliver(policy, f"http://127.0.0.1:{free_port()}/hook")
    assert not delivered and outcomes[0][1] == "retry" and outcomes[-1][1] == "failed"


# -- which URLs ---------------------------------------------------------------------------------

REFUSED = {
    "http://127.0.0.1/hook": "127.0.0.1",
    "http://localhost:8080/hook": "localhost",
    "http://10.1.2.3/hook": "10.1.2.3",
    "http://169.254.169.254/latest/meta-data": "169.254.169.254",
    "http://[::1]:9000/hook": "::1",
    "http://[::ffff:10.0.0.1]/hook": "::ffff:10.0.0.1",
    "http://0.0.0.0/hook": "0.0.0.0",
    "https://224.0.0.1/hook": "224.0.0.1",
    "http://100.64.0.1/hook": "100.64.0.1",
}


@pytest.mark.parametrize(("url", "host"), REFUSED.items())
def test_non_public_addresses_are_refused_unless_allowed(url: str, host: str) -> None:
    with pytest.raises(WebhookError, match="SD_WEBHOOK_ALLOWED_HOSTS") as refused:
        check_url(url, WebhookPolicy.parse(SECRET, "hooks.example"))
    assert url not in str(refused.value)
    check_url(url, WebhookPolicy.parse(SECRET, f"hooks.example, {host}"))


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://user:pw@hooks.example/x", "user name or password"),
        ("http://token@hooks.example/x", "user name or password"),
        ("ftp://hooks.example/x", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("hooks.example/x", "http:// or https://"),
        ("http:///x", "host name"),
        ("http://hooks.example:99999/x", "port"),
        ("http://hooks.example/a b", "spaces"),
        ("http://hooks.example/\n", "control"),
        ("http://hooks.example/" + "x" * 3000, "characters"),
    ],
)
def test_malformed_urls_are_refused_whatever_is_allowed(url: str, why: str) -> None:
    with pytest.raises(WebhookError, match=why) as refused:
        check_url(url, WebhookPolicy.parse(SECRET, "hooks.example"))
    assert "pw" not in str(refused.value) and "etc" not in str(refused.value)


def fake_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> None:
    def resolve_now(host: str, port: int) -> list[str]:
        return answers[host]

    async def resolve(host: str, port: int) -> list[str]:
        return answers[host]

    monkeypatch.setattr(addresses, "resolve_now", resolve_now)
    monkeypatch.setattr(addresses, "resolve", resolve)


def test_a_name_that_resolves_to_a_private_address_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dns(monkeypatch, {"inside.example": ["10.0.0.7"], "mixed.example": ["93.184.216.34", "192.168.1.1"],
                           "public.example": ["93.184.216.34", "2606:2800:220:1::1"]})  # fmt: skip
    policy = WebhookPolicy.parse(SECRET, None)
    for name in ("inside", "mixed"):
        with pytest.raises(WebhookError, match="loopback, private or reserved"):
            check_url(f"https://{name}.example/x", policy)
    check_url("https://public.example/x", policy)
    check_url("https://inside.example/x", WebhookPolicy.parse(SECRET, "10.0.0.7"))  # the address is allowed
    check_url("https://inside.example/x", WebhookPolicy.parse(SECRET, "INSIDE.example."))


def test_a_name_turned_private_after_submit_is_refused_at_delivery(
    monkeypatch: pytest.MonkeyPatch, receiver: Receiver
) -> None:
    port = receiver.url.split(":")[2].split("/")[0]
    fake_dns(monkeypatch, {"rebind.example": ["93.184.216.34"]})
    policy = WebhookPolicy.parse(SECRET, None, **FAST)
    check_url(f"http://rebind.example:{port}/hook", policy)
    fake_dns(monkeypatch, {"rebind.example": ["127.0.0.1"]})
    delivered, outcomes, _ = deliver(policy, f"http://rebind.example:{port}/hook")
    assert not delivered and outcomes == [("job.completed", "refused")] and receiver.hits == []


def test_an_allowed_name_is_delivered_to_its_checked_address_with_its_own_host_header(
    monkeypatch: pytest.MonkeyPatch, receiver: Receiver
) -> None:
    port = receiver.url.split(":")[2].split("/")[0]
    fake_dns(monkeypatch, {"hooks.internal": ["127.0.0.1"]})
    policy = WebhookPolicy.parse(SECRET, "hooks.internal", **FAST)
    assert deliver(policy, f"http://hooks.internal:{port}/hook?t=1")[0]
    assert (
        receiver.hits[0].headers["host"] == f"hooks.internal:{port}" and receiver.hits[0].path == "/hook?t=1"
    )


def test_https_is_pinned_to_the_checked_address_and_verified_against_the_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    authority, server_tls = certificates(tmp_path, "hooks.test")
    for receiver in serve(server_tls):
        port = receiver.url.split(":")[2].split("/")[0]
        fake_dns(monkeypatch, {"hooks.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
        policy = WebhookPolicy.parse(SECRET, "hooks.test,other.test", **{**FAST, "retry_for_s": 0.2})
        assert deliver(policy, f"https://hooks.test:{port}/hook", tls=authority)[0]
        assert receiver.hits[0].headers["host"] == f"hooks.test:{port}"
        Webhook(SECRET).verify(receiver.hits[0].body, receiver.hits[0].headers)
        # The certificate names hooks.test only: another name on the same address is not trusted.
        delivered, outcomes, _ = deliver(policy, f"https://other.test:{port}/hook", tls=authority)
        assert not delivered and outcomes[-1][1] == "failed" and len(receiver.hits) == 1


def certificates(folder: Path, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A throwaway authority and a server certificate for ``name``: (client context, server context)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now, hour = datetime.datetime.now(datetime.timezone.utc), datetime.timedelta(hours=1)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test authority")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - hour)
        .not_valid_after(now + hour)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    leaf = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - hour).not_valid_after(now + hour)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    (folder / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(folder / "leaf.pem", folder / "key.pem")
    client = ssl.create_default_context(cadata=ca.public_bytes(serialization.Encoding.PEM).decode())
    return client, server


# -- secrets ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("secret", "why"),
    [
        ("k" * 40, "does not start with whsec_"),
        ("whsec_not*base64!", "not base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "holds 5 bytes"),
        (f"{SECRET},whsec_%%%", "secret #2 is not base64"),
    ],
)
def test_bad_secrets_are_refused_without_being_repeated(secret: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as refused:
        WebhookPolicy.parse(secret, None)
    assert SECRET[6:] not in str(refused.value) and "not*base64" not in str(refused.value)


def test_secrets_and_allowed_hosts_parse_and_stay_out_of_the_repr() -> None:
    policy = WebhookPolicy.parse(f" {SECRET} ,{NEW_SECRET},", " Hooks.Example., [::1] ,", timeout_s=3)
    assert policy.secrets == (SECRET, NEW_SECRET) and policy.timeout_s == 3
    assert policy.allowed_hosts == ("::1", "hooks.example")
    assert SECRET[6:] not in repr(policy)
    # Unpadded base64, as some generators write it, is accepted.
    assert WebhookPolicy.parse(SECRET.rstrip("="), None).enabled


def test_without_a_secret_webhooks_are_off(receiver: Receiver) -> None:
    policy = WebhookPolicy.parse(None, "127.0.0.1", **FAST)
    assert not policy.enabled
    with pytest.raises(WebhookError, match="SD_WEBHOOK_SECRET"):
        check_url(receiver.url, policy)
    delivered, outcomes, _ = deliver(policy, receiver.url)
    assert not delivered and outcomes == [("job.completed", "refused")] and receiver.hits == []


def test_the_attempt_hook_failing_does_not_stop_the_delivery(receiver: Receiver) -> None:
    def broken(event: str, outcome: str) -> None:
        raise RuntimeError("metrics are down")

    async def run() -> bool:
        deliveries = Deliveries(local(), on_attempt=broken)
        try:
            return await deliveries.send(receiver.url, "job.start", {"id": "job_1"})
        finally:
            await deliveries.aclose()

    assert asyncio.run(run())
    assert json.loads(receiver.hits[0].body)["type"] == "job.start"


def test_a_name_that_does_not_resolve_is_refused_at_submit_and_retried_at_delivery(
    monkeypatch: pytest.MonkeyPatch, receiver: Receiver
) -> None:
    port = receiver.url.split(":")[2].split("/")[0]
    answers: list[list[str]] = [[], ["127.0.0.1"]]  # DNS is down, then back

    def resolve_now(host: str, port: int) -> list[str]:
        raise addresses.UnresolvedHost("the webhook's host name does not resolve; check the name")

    async def resolve(host: str, port: int) -> list[str]:
        return answers.pop(0)  # [] is "no address": the same as a failed look-up

    monkeypatch.setattr(addresses, "resolve_now", resolve_now)
    monkeypatch.setattr(addresses, "resolve", resolve)
    policy = WebhookPolicy.parse(SECRET, "flaky.internal", **FAST)
    with pytest.raises(WebhookError, match="does not resolve"):
        check_url(f"http://flaky.internal:{port}/hook", policy)
    delivered, outcomes, _ = deliver(policy, f"http://flaky.internal:{port}/hook")
    assert delivered and [o for _, o in outcomes] == ["retry", "delivered"]
