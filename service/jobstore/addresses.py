"""Which addresses a webhook may reach: a URL's parts, its host's addresses, and whether each is a
public one. A webhook URL is the caller's, so without these checks it would let any caller make the
server call its own admin ports, the cloud's metadata service (169.254.169.254) or the private
network."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_URL_CHARS = 2048
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class WebhookError(ValueError):
    """A webhook URL that may not be used; the message says why and never repeats the URL (it may
    carry a token)."""


class UnresolvedHost(WebhookError):
    """The host did not resolve (now): at submit a refusal, at delivery a retry (DNS may be down)."""


@dataclass(frozen=True)
class Target:
    scheme: str  # "http" or "https"
    host: str  # lower case, IPv6 without brackets
    port: int
    target: str  # path and query, as sent ("/" at least)

    @property
    def host_header(self) -> str:
        name = f"[{self.host}]" if ":" in self.host else self.host
        default = {"http": 80, "https": 443}[self.scheme]
        return name if self.port == default else f"{name}:{self.port}"


def parse_target(url: str) -> Target:
    if not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS:
        raise WebhookError(f"a webhook URL must be 1 to {MAX_URL_CHARS} characters")
    if not url.isascii() or not url.isprintable() or " " in url:
        raise WebhookError(
            "a webhook URL must be ASCII without spaces or control characters (percent-encode them)"
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise WebhookError("a webhook URL must start with http:// or https://")
    if "@" in parts.netloc:
        raise WebhookError(
            "a webhook URL may not carry a user name or password; put a token in its path instead"
        )
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise WebhookError("a webhook URL needs a host name")
    try:
        port = parts.port or {"http": 80, "https": 443}[parts.scheme]
    except ValueError:
        raise WebhookError("a webhook URL's port must be a number from 1 to 65535") from None
    if port == 0:
        raise WebhookError("a webhook URL's port must be a number from 1 to 65535")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.scheme, host.lower(), port, target)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, Teredo, NAT64), which is where it goes."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in ipaddress.IPv6Network("64:ff9b::/96"):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public(address: Address) -> bool:
    """Not loopback, private, link-local, multicast, reserved, unspecified or shared (CGNAT), and,
    for IPv6, not carrying an IPv4 address that is any of these."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            return False
        inner = _embedded_ipv4(address)
        if inner is not None and not is_public(inner):
            return False
    return address.is_global and not (
        address.is_multicast or address.is_reserved or address.is_loopback or address.is_link_local
    )


def parse_allowed(text: str | None) -> tuple[str, ...]:
    """SD_WEBHOOK_ALLOWED_HOSTS (comma-separated names or IPs) in the form hosts are compared in."""
    return tuple(
        sorted(
            {item.strip().strip("[]").rstrip(".").lower() for item in (text or "").split(",") if item.strip()}
        )
    )


def _address(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0] if "%" in text else text)
    except ValueError:
        return None


def checked(host: str, resolved: list[str], allowed: tuple[str, ...]) -> list[str]:
    """The addresses of ``resolved`` the webhook may use, in order. An allowed host may resolve to
    anything; otherwise every address must be public or itself allowed (one bad address refuses
    all: a name with one public and one private address could be made to reach the private one)."""
    if not resolved:
        raise UnresolvedHost("the webhook's host name does not resolve to any address; check the name")
    if host in allowed:
        return resolved
    for text in resolved:
        address = _address(text)
        if address is None or not (is_public(address) or str(address) in allowed):
            raise WebhookError(
                "the webhook's host is (or resolves to) a loopback, private or reserved address; use a "
                "public host, or have the operator name it in SD_WEBHOOK_ALLOWED_HOSTS"
            )
    return resolved


def _unique(infos: list[tuple[object, ...]]) -> list[str]:
    seen: list[str] = []
    for info in infos:
        text = str(info[4][0])  # type: ignore[index]
        if text not in seen:
            seen.append(text)
    return seen


def resolve_now(host: str, port: int) -> list[str]:
    """The host's addresses (blocking: run it in a thread from async code)."""
    try:
        return _unique(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))  # type: ignore[arg-type]
    except (OSError, UnicodeError):
        raise UnresolvedHost("the webhook's host name does not resolve; check the name") from None


async def resolve(host: str, port: int) -> list[str]:
    """The host's addresses, through the event loop's resolver (tests replace this function)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise UnresolvedHost("the webhook's host name does not resolve; check the name") from None
    return _unique(infos)  # type: ignore[arg-type]
