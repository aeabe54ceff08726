"""Image URLs: fetched only from hosts SD_FETCH_IMAGE_URLS names, never into the server's own
network, from the address that was checked, without redirects, within the time and size limits.
A real HTTP server on 127.0.0.1 stands in for the image host; nothing else is reached."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.images_in import ImageInputError, ImageUrlRefusedError, UrlPolicy, read_image
from service.images_in.fetch import is_internal
from service.images_in.policy import parse_ip

FIELD = "image"
PICTURE = Image.fromarray(np.arange(16 * 24 * 3, dtype=np.uint8).reshape(16, 24, 3))


def _png() -> bytes:
    buffer = io.BytesIO()
    PICTURE.save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()


class ImageHost(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, str]] = []  # (path, Host header)
        self.stop = threading.Event()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"


class _Handler(BaseHTTPRequestHandler):
    server: ImageHost

    def do_GET(self) -> None:
        self.server.requests.append((self.path, self.headers.get("Host", "")))
        if self.path == "/image.png":
            self._send(200, PNG)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/image.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/big-declared":
            self._send(200, b"\0" * 5000)
        elif self.path == "/big-undeclared":  # no Content-Length: the body ends when the connection does
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"\0" * 5000)
        elif self.path == "/slow":
            self.server.stop.wait(5)
            self._send(200, PNG)
        elif self.path == "/text":
            self._send(200, b"<html>not an image</html>")
        else:
            self._send(404, b"not found")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def host() -> Iterator[ImageHost]:
    server = ImageHost()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any lookup or connection: a refusal must come before either."""

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the URL was looked up or connected to before it was refused")

    monkeypatch.setattr(socket, "getaddrinfo", forbidden)
    monkeypatch.setattr(socket, "create_connection", forbidden)


def refused(url: str, policy: UrlPolicy | None, kind: type[ImageInputError]) -> ImageInputError:
    with pytest.raises(ImageInputError) as caught:
        read_image(url, FIELD, urls=policy)
    error = caught.value
    assert type(error) is kind, f"{type(error).__name__}: {error}"
    message = str(error)
    assert message.startswith(f"{FIELD}: ") and error.field == FIELD
    assert url not in message and "://" not in message, "the message repeats the URL"
    return error


def test_no_url_is_fetched_without_a_policy(host: ImageHost) -> None:
    for policy in (None, UrlPolicy.parse(None), UrlPolicy.parse("  ")):
        error = refused(host.url("/image.png"), policy, ImageUrlRefusedError)
        assert "SD_FETCH_IMAGE_URLS" in str(error) and "base64" in str(error)
    assert host.requests == []


def test_an_allowed_ip_literal_is_fetched(host: ImageHost) -> None:
    image = read_image(host.url("/image.png"), FIELD, urls=UrlPolicy.parse("127.0.0.1"))
    assert np.array_equal(np.asarray(image), np.asarray(PICTURE))
    assert host.requests == [("/image.png", f"127.0.0.1:{host.port}")]


def test_a_host_name_resolving_to_loopback_is_refused(host: ImageHost) -> None:
    error = refused(
        host.url("/image.png", host="localhost"), UrlPolicy.parse("localhost"), ImageUrlRefusedError
    )
    assert "inside the server's network" in str(error) and "localhost" in str(error)
    assert host.requests == []


def test_a_redirect_is_not_followed(host: ImageHost) -> None:
    error = refused(host.url("/redirect"), UrlPolicy.parse("127.0.0.1"), ImageUrlRefusedError)
    assert "redirect" in str(error)
    assert [path for path, _ in host.requests] == ["/redirect"]


@pytest.mark.parametrize("path", ["/big-declared", "/big-undeclared"])
def test_a_body_over_max_bytes_is_cut_off(host: ImageHost, path: str) -> None:
    policy = UrlPolicy(hosts=("127.0.0.1",), max_bytes=1000)
    assert "too large" in str(refused(host.url(path), policy, ImageInputError))


def test_a_slow_host_times_out(host: ImageHost) -> None:
    policy = UrlPolicy(hosts=("127.0.0.1",), timeout_s=0.5)
    started = time.monotonic()
    error = refused(host.url("/slow"), policy, ImageInputError)
    assert time.monotonic() - started < 2.5
    assert "did not answer within 0.5 s" in str(error)


def test_an_error_status_is_named(host: ImageHost) -> None:
    error = refused(host.url("/missing.png"), UrlPolicy.parse("127.0.0.1"), ImageInputError)
    assert "HTTP 404" in str(error)


def test_a_fetched_file_is_checked_like_any_other(host: ImageHost) -> None:
    error = refused(host.url("/text"), UrlPolicy.parse("127.0.0.1"), ImageInputError)
    assert "accepted format" in str(error)


def test_tls_to_a_host_that_does_not_speak_it_is_an_input_error(host: ImageHost) -> None:
    refused(host.url("/image.png", scheme="https"), UrlPolicy.parse("127.0.0.1"), ImageInputError)


def test_nothing_listening_is_an_input_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    error = refused(f"http://127.0.0.1:{port}/image.png", UrlPolicy.parse("127.0.0.1"), ImageInputError)
    assert "could not connect" in str(error)


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize(
    ("url", "policy"),
    [
        ("http://10.0.0.1/image.png", "127.0.0.1"),  # a private literal the policy does not name
        ("http://169.254.169.254/latest/meta-data/", "*.example.com"),  # cloud metadata
        ("http://[::1]/image.png", "127.0.0.1"),
        ("http://[::ffff:127.0.0.1]/image.png", "127.0.0.1"),  # another spelling is another entry
        ("http://example.com/image.png", "*.example.com"),  # the pattern is for names under it
        ("http://evilexample.com/image.png", "*.example.com"),
        ("http://images.example.com.evil.net/image.png", "images.example.com"),
        ("http://2130706433/image.png", "127.0.0.1"),  # 127.0.0.1 as a number
        ("ftp://images.example.com/image.png", "images.example.com"),
        ("file:///etc/passwd", "images.example.com"),
        ("http://user:secret@images.example.com/image.png", "images.example.com"),
        ("http://images.example.com:99999/image.png", "images.example.com"),
        ("http://images.example.com/a b.png", "images.example.com"),
        ("http:///image.png", "images.example.com"),
    ],
)
def test_urls_outside_the_policy_are_refused_before_any_lookup(url: str, policy: str) -> None:
    refused(url, UrlPolicy.parse(policy), ImageUrlRefusedError)


def _resolving(monkeypatch: pytest.MonkeyPatch, *addresses: str) -> list[str]:
    """Make every name resolve to ``addresses``; return the list of names looked up."""
    looked_up: list[str] = []

    def getaddrinfo(name: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        looked_up.append(name)
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in addresses
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return looked_up


@pytest.mark.parametrize(
    "addresses",
    [
        ("10.0.0.5",),
        ("93.184.216.34", "192.168.1.1"),
        ("::ffff:127.0.0.1",),
        ("fe80::1%eth0",),
        ("100.64.0.1",),
    ],
)
def test_a_name_with_any_internal_address_is_refused(monkeypatch: pytest.MonkeyPatch, addresses: Any) -> None:
    _resolving(monkeypatch, *addresses)

    def connect(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("connected to a name with an internal address")

    monkeypatch.setattr(socket, "create_connection", connect)
    refused("http://img.example.com/a.png", UrlPolicy.parse("*.example.com"), ImageUrlRefusedError)


def test_the_connection_goes_to_the_checked_address(monkeypatch: pytest.MonkeyPatch, host: ImageHost) -> None:
    """DNS rebinding: the name is looked up once, and that (public) address is the one connected to;
    the Host header still names the host."""
    looked_up = _resolving(monkeypatch, "93.184.216.34")
    connected: list[tuple[str, int]] = []

    def create_connection(
        address: tuple[str, int], timeout: float | None = None, *args: Any
    ) -> socket.socket:
        connected.append(address)
        sock = socket.socket()  # to the stand-in for that address (no lookup: getaddrinfo is patched)
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", host.port))
        return sock

    monkeypatch.setattr(socket, "create_connection", create_connection)
    url = f"http://img.example.com:{host.port}/image.png"
    image = read_image(url, FIELD, urls=UrlPolicy.parse("*.example.com"))
    assert np.array_equal(np.asarray(image), np.asarray(PICTURE))
    assert looked_up == ["img.example.com"]
    assert connected == [("93.184.216.34", host.port)]
    assert host.requests == [("/image.png", f"img.example.com:{host.port}")]


@pytest.mark.parametrize(
    ("address", "internal"),
    [
        ("8.8.8.8", False),
        ("2606:4700:4700::1111", False),
        ("127.0.0.1", True),
        ("10.1.2.3", True),
        ("172.16.0.1", True),
        ("192.168.0.1", True),
        ("169.254.169.254", True),
        ("100.64.0.1", True),
        ("0.0.0.0", True),
        ("224.0.0.1", True),
        ("240.0.0.1", True),
        ("255.255.255.255", True),
        ("::1", True),
        ("::", True),
        ("fe80::1", True),
        ("fc00::1", True),
        ("ff02::1", True),
        ("::ffff:10.0.0.1", True),
        ("::ffff:8.8.8.8", False),
    ],
)
def test_internal_addresses(address: str, internal: bool) -> None:
    parsed = parse_ip(address)
    assert parsed is not None and is_internal(parsed) is internal


def test_the_policy_parses_hosts_patterns_and_literals() -> None:
    policy = UrlPolicy.parse(" Images.Example.com. , *.CDN.example.org,127.0.0.1, [::1], images.example.com ")
    assert policy.hosts == ("images.example.com", "*.cdn.example.org", "127.0.0.1", "::1")
    assert policy.max_bytes == 20 * 1024 * 1024 and policy.timeout_s == 10.0
    assert policy.match("images.example.com") == "images.example.com"
    assert policy.match("a.b.cdn.example.org") == "*.cdn.example.org"
    assert policy.match("cdn.example.org") is None
    assert policy.match("::1") == "::1" and policy.match("127.0.0.1") == "127.0.0.1"
    assert UrlPolicy.parse("localhost").match("127.0.0.1") is None
    assert UrlPolicy.parse(None).hosts == () and UrlPolicy.parse("").hosts == ()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://images.example.com", "bare host"),
        ("images.example.com/path", "bare host"),
        ("user@images.example.com", "bare host"),
        ("a.example.com,,b.example.com", "empty entry"),
        ("a.example.com,", "empty entry"),
        ("images.example.com:8080", "port"),
        ("*", "not a host name"),
        ("*.com", "top-level domain"),
        ("images.*.com", "not a host name"),
        ("bad_host!", "not a host name"),
        ("-leading.example.com", "not a host name"),
        ("bücher.example", "not a host name"),
    ],
)
def test_a_malformed_policy_is_a_clear_value_error(value: str, expected: str) -> None:
    with pytest.raises(ValueError, match="SD_FETCH_IMAGE_URLS") as caught:
        UrlPolicy.parse(value)
    assert expected in str(caught.value)


def test_the_policy_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        UrlPolicy(hosts=("a.example.com",), max_bytes=0)
    with pytest.raises(ValueError):
        UrlPolicy(hosts=("a.example.com",), timeout_s=0)
