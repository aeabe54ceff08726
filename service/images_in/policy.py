"""Which image URLs the server may fetch: SD_FETCH_IMAGE_URLS, parsed once into a ``UrlPolicy``.

Fetching a URL a client names makes the server a proxy into its own network (SSRF: cloud metadata
at 169.254.169.254, admin ports on localhost, private services). So nothing is fetched unless the
operator names the hosts, and a named DNS host must still resolve to public addresses only: only
an IP literal the operator wrote explicitly may be a private or loopback address.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ENVIRONMENT_NAME = "SD_FETCH_IMAGE_URLS"
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_TIMEOUT_S = 10.0

# One DNS label: letters, digits and inner hyphens, 1 to 63 characters (RFC 1123). Host names are
# compared in lower case and without a trailing dot; internationalised names must be given in
# their ASCII (punycode) form, as they travel on the wire.
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_MAX_HOST_CHARS = 253


def parse_ip(text: str) -> IpAddress | None:
    """The address if ``text`` is an IPv4 or IPv6 literal (brackets allowed), else None."""
    try:
        return ipaddress.ip_address(text[1:-1] if text.startswith("[") and text.endswith("]") else text)
    except ValueError:
        return None


def is_host_name(text: str) -> bool:
    """Whether ``text`` (lower case, no trailing dot) is a well-formed DNS host name."""
    if not text or len(text) > _MAX_HOST_CHARS:
        return False
    return all(_LABEL.fullmatch(label) for label in text.split("."))


def normalise_host(host: str) -> str:
    """Lower case, without the trailing dot of a fully qualified name."""
    host = host.lower()
    return host[:-1] if host.endswith(".") else host


def _parse_entry(entry: str) -> str:
    """One entry of SD_FETCH_IMAGE_URLS in its canonical form, or ValueError saying what is wrong."""
    if not entry:
        raise ValueError(
            f"{ENVIRONMENT_NAME} has an empty entry (two commas in a row, or one at an end); "
            "give comma-separated host names such as images.example.com or *.example.com"
        )
    if "://" in entry or "/" in entry or "?" in entry or "#" in entry or "@" in entry:
        raise ValueError(
            f"{ENVIRONMENT_NAME} entry {entry!r} is not a bare host: give the host name alone "
            "(images.example.com), with no scheme, path, user or port"
        )
    address = parse_ip(entry)
    if address is not None:
        return str(address)
    host = normalise_host(entry)
    pattern = host[2:] if host.startswith("*.") else host
    if ":" in host:
        raise ValueError(
            f"{ENVIRONMENT_NAME} entry {entry!r} has a port: give the host name alone; "
            "the port in an image URL is not restricted"
        )
    if not is_host_name(pattern) or "*" in pattern:
        raise ValueError(
            f"{ENVIRONMENT_NAME} entry {entry!r} is not a host name, an IP address or a pattern "
            "*.example.com (a wildcard only as the whole first label; non-ASCII names in punycode)"
        )
    if host.startswith("*.") and "." not in pattern:
        raise ValueError(
            f"{ENVIRONMENT_NAME} entry {entry!r} would allow a whole top-level domain; "
            "name the domain under it (*.example.com)"
        )
    return host


@dataclass(frozen=True)
class UrlPolicy:
    """The hosts image URLs may name, and the limits of one download.

    ``hosts``: exact host names or IP literals, and "*.example.com" patterns (any name under
    example.com, not example.com itself); empty means no URL is ever fetched. ``timeout_s`` bounds
    connecting and each read; ``max_bytes`` the body.
    """

    hosts: tuple[str, ...]
    max_bytes: int = DEFAULT_MAX_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S

    @classmethod
    def parse(cls, value: str | None) -> UrlPolicy:
        """SD_FETCH_IMAGE_URLS (comma-separated) -> the policy; unset or blank allows no URL.

        Raises ValueError naming the malformed entry: the value is the operator's, not a client's,
        so it may be repeated, and a mistake here must stop the server rather than be ignored.
        """
        if value is None or not value.strip():
            return cls(hosts=())
        hosts = tuple(_parse_entry(entry.strip()) for entry in value.split(","))
        return cls(hosts=tuple(dict.fromkeys(hosts)))

    def __post_init__(self) -> None:
        if self.max_bytes <= 0:
            raise ValueError(f"UrlPolicy.max_bytes must be positive, not {self.max_bytes}")
        if not self.timeout_s > 0:
            raise ValueError(f"UrlPolicy.timeout_s must be positive, not {self.timeout_s}")

    def match(self, host: str) -> str | None:
        """The entry that allows ``host`` (an IP literal or a normalised host name), or None.

        An IP literal matches only the same address written as a literal entry, and a host name
        only a name entry: "*.example.com" never lets through an address, nor "localhost" 127.0.0.1.
        """
        address = parse_ip(host)
        for entry in self.hosts:
            entry_address = parse_ip(entry)
            if address is not None or entry_address is not None:
                if address is not None and address == entry_address:
                    return entry
            elif entry.startswith("*."):
                if host.endswith(entry[1:]):
                    return entry
            elif host == entry:
                return entry
        return None
