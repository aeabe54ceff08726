"""Download an input image from an http(s) URL, under the operator's ``UrlPolicy``.

The defences, in order: only http and https; the host must be one SD_FETCH_IMAGE_URLS names; every
address its name resolves to must be public (unless the operator named that very IP literal); the
connection goes to the address that was checked (pinned: no second lookup a DNS server could answer
differently, "DNS rebinding"), with the right Host header and, for https, SNI and a certificate
checked against the host name; no redirect is followed (it could point anywhere); connecting and
each read time out; the body stops at ``max_bytes``; the whole download has a deadline.

No message repeats the URL: it is the client's content. The matching policy entry is named instead.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass

from service.images_in.errors import ImageInputError, ImageUrlRefusedError
from service.images_in.policy import (
    ENVIRONMENT_NAME,
    IpAddress,
    UrlPolicy,
    is_host_name,
    normalise_host,
    parse_ip,
)

# A host that answers each read just within the timeout could hold a worker for ever: no read starts
# after this many timeouts (30 s by default: 20 MiB needs ~0.7 MB/s), so one more read ends it.
DEADLINE_TIMEOUTS = 3
_CHUNK_BYTES = 64 * 1024
_SEND_BASE64 = "send the image itself as base64"


@dataclass(frozen=True)
class _Target:
    """A URL that passed the policy: where to connect and what to ask for."""

    scheme: str
    host: str  # normalised host name or IP literal, for the Host header, SNI and the certificate
    port: int
    path: str  # path and query, as sent in the request line
    entry: str  # the policy entry that allowed the host: safe to name in messages


def fetch_image(url: str, field: str, policy: UrlPolicy | None) -> bytes:
    """The body at ``url``, or ImageUrlRefusedError (400: not allowed) / ImageInputError (422)."""
    if policy is None or not policy.hosts:
        raise ImageUrlRefusedError(
            f"this server does not fetch image URLs unless {ENVIRONMENT_NAME} names the host; "
            + _SEND_BASE64,
            field=field,
        )
    target = _check_url(url, field, policy)
    address = _resolve(target, field)
    return _download(target, address, field, policy)


def _check_url(url: str, field: str, policy: UrlPolicy) -> _Target:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise ImageUrlRefusedError(f"the image URL is malformed; {_SEND_BASE64}", field=field) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ImageUrlRefusedError(
            f"only http and https image URLs can be fetched; {_SEND_BASE64}", field=field
        )
    if parts.username is not None or parts.password is not None:
        raise ImageUrlRefusedError(
            f"image URLs with a user name or password are not fetched; {_SEND_BASE64}", field=field
        )
    host = normalise_host(parts.hostname or "")
    if parse_ip(host) is None and not is_host_name(host):
        raise ImageUrlRefusedError(f"the image URL has no valid host name; {_SEND_BASE64}", field=field)
    entry = policy.match(host)
    if entry is None:
        raise ImageUrlRefusedError(
            f"the image URL's host is not one {ENVIRONMENT_NAME} allows; {_SEND_BASE64}, "
            "or ask the server's operator to allow the host",
            field=field,
        )
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    if any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in path):
        # http.client would refuse it too (header injection); say so before connecting.
        raise ImageUrlRefusedError(
            "the image URL's path has spaces, control or non-ASCII characters; percent-encode them, "
            f"or {_SEND_BASE64}",
            field=field,
        )
    default_port = 443 if scheme == "https" else 80
    return _Target(scheme, host, port if port is not None else default_port, path, entry)


def is_internal(address: IpAddress) -> bool:
    """Whether an address is inside the server's own network or otherwise not a public host.

    An IPv4-mapped IPv6 address (::ffff:10.0.0.1) reaches the IPv4 address it carries, so that is
    the one checked; ``is_global`` also covers the shared (100.64/10) and documentation ranges.
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (
        address.is_loopback
        or address.is_link_local
        or address.is_private
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or not address.is_global
    )


def _resolve(target: _Target, field: str) -> str:
    """The one address to connect to: every address of the name must be public, so that which one
    the connection would have picked does not matter."""
    literal = parse_ip(target.host)
    if literal is not None and parse_ip(target.entry) == literal:
        return str(literal)  # the operator named this very address: it is allowed, public or not
    try:
        infos = socket.getaddrinfo(
            target.host, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    except (OSError, UnicodeError):
        raise ImageInputError(
            f"the image host (allowed by {target.entry}) could not be resolved; "
            f"check the URL, or {_SEND_BASE64}",
            field=field,
        ) from None
    addresses = [str(info[4][0]).split("%", 1)[0] for info in infos]
    parsed = [parse_ip(a) for a in addresses]
    if not parsed or any(a is None or is_internal(a) for a in parsed):
        raise ImageUrlRefusedError(
            f"the image host (allowed by {target.entry}) resolves to an address inside the server's "
            f"network, which is never fetched; {_SEND_BASE64}",
            field=field,
        )
    return addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to a fixed address, whatever ``host`` (sent as the Host header) resolves to."""

    def __init__(self, host: str, port: int, *, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """As ``_PinnedHTTPConnection``, with TLS: SNI and the certificate check use the host name."""

    def __init__(self, host: str, port: int, *, address: str, timeout: float) -> None:
        context = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = address
        self._tls = context

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        try:
            self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


def _download(target: _Target, address: str, field: str, policy: UrlPolicy) -> bytes:
    connection_type = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
    connection = connection_type(target.host, target.port, address=address, timeout=policy.timeout_s)
    host = f"the image host (allowed by {target.entry})"
    try:
        return _request(connection, target, field, policy)
    except TimeoutError:  # socket.timeout is its alias
        raise ImageInputError(
            f"{host} did not answer within {policy.timeout_s:g} s; retry later, or {_SEND_BASE64}",
            field=field,
        ) from None
    except ssl.SSLError:
        raise ImageInputError(
            f"{host} failed the TLS handshake or its certificate is not valid for it; {_SEND_BASE64}",
            field=field,
        ) from None
    except (http.client.HTTPException, ValueError):
        raise ImageInputError(f"{host} sent a malformed HTTP response; {_SEND_BASE64}", field=field) from None
    except OSError:
        raise ImageInputError(
            f"could not connect to {host} or the connection broke; retry later, or {_SEND_BASE64}",
            field=field,
        ) from None
    finally:
        connection.close()


def _request(connection: http.client.HTTPConnection, target: _Target, field: str, policy: UrlPolicy) -> bytes:
    deadline = time.monotonic() + DEADLINE_TIMEOUTS * policy.timeout_s
    connection.request("GET", target.path, headers={"Accept": "image/*", "User-Agent": "sd-endpoint"})
    response = connection.getresponse()
    if 300 <= response.status < 400:
        raise ImageUrlRefusedError(
            f"the image host answered with a redirect (HTTP {response.status}), and redirects are not "
            f"followed; give the image's final URL, or {_SEND_BASE64}",
            field=field,
        )
    if not 200 <= response.status < 300:
        raise ImageInputError(
            f"the image host answered HTTP {response.status}, not the image; "
            f"check the URL, or {_SEND_BASE64}",
            field=field,
        )
    too_large = ImageInputError(
        f"the image at the URL is too large: over {policy.max_bytes} bytes; send a smaller image",
        field=field,
    )
    declared = response.getheader("Content-Length")
    if declared is not None and declared.strip().isdigit() and int(declared) > policy.max_bytes:
        raise too_large
    chunks: list[bytes] = []
    received = 0
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError
        chunk = response.read(min(_CHUNK_BYTES, policy.max_bytes + 1 - received))
        if not chunk:
            return b"".join(chunks)
        received += len(chunk)
        if received > policy.max_bytes:
            raise too_large
        chunks.append(chunk)
