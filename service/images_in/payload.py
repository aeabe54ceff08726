"""What a client sent as an image -> the encoded file's bytes (base64, a data: URL, or an http URL).

Clients write base64 in every dialect: standard or URL-safe alphabet, with or without padding, with
line breaks (Azure's samples use ``base64.encodebytes``: a newline every 76 characters), behind a
``data:image/png;base64,`` prefix. All of them are taken; anything else is refused before a byte
is decoded, and the size is checked on the encoded text, before decoding allocates it.
"""

from __future__ import annotations

import base64
import binascii
import re

from service.images_in.errors import ImageInputError
from service.images_in.fetch import fetch_image
from service.images_in.policy import UrlPolicy

MAX_IMAGE_BYTES = 20 * 1024 * 1024
_MIB = 1024 * 1024

_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_DATA_URL = re.compile(r"data:image/[A-Za-z0-9.+-]+(?:;[A-Za-z0-9=._+-]+)*;base64,", re.IGNORECASE)
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]*")
_URL_SAFE = bytes.maketrans(b"-_", b"+/")
_SEND = "send a PNG, JPEG or WEBP file, base64-encoded"


def too_large(field: str, limit: int) -> ImageInputError:
    """The 413-like refusal (still a 422: the request is well-formed, the image is not)."""
    return ImageInputError(
        f"the image is too large: over {limit / _MIB:g} MiB; send a smaller or more compressed image "
        "(a JPEG or WEBP of the size you ask for)",
        field=field,
    )


def image_bytes(value: str | bytes, field: str, urls: UrlPolicy | None) -> bytes:
    """The encoded image file the client sent, checked for size but not yet for content."""
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        if len(data) > MAX_IMAGE_BYTES:
            raise too_large(field, MAX_IMAGE_BYTES)
    elif isinstance(value, str):
        text = value.strip()
        if _URL_SCHEME.match(text):
            data = fetch_image(text, field, urls)
            if urls is not None and len(data) > urls.max_bytes:  # fetch stops at it; kept as a guard
                raise too_large(field, urls.max_bytes)
        else:
            data = decode_base64(text, field)
    else:
        raise ImageInputError(
            f"expected the image as a base64 string, not {type(value).__name__}; {_SEND}", field=field
        )
    if not data:
        raise ImageInputError(f"the image is empty; {_SEND}", field=field)
    return data


def decode_base64(text: str, field: str) -> bytes:
    """Base64 in any of the usual dialects -> bytes; ImageInputError if it is not base64 at all."""
    if text[:5].lower() == "data:":
        prefix = _DATA_URL.match(text)
        if prefix is None:
            raise ImageInputError(
                "a data: URL must read data:image/<type>;base64,<base64 of the file>; "
                f"{_SEND} (the data: prefix is optional)",
                field=field,
            )
        text = text[prefix.end() :]
    # A string far longer than any accepted image is refused before the copies below are made.
    # Whitespace is allowed for, generously: one line break (two characters) every 76.
    longest = (MAX_IMAGE_BYTES + 2) // 3 * 4
    if len(text) > longest + longest // 38 + 64:
        raise too_large(field, MAX_IMAGE_BYTES)
    compact = "".join(text.split())
    if not compact.isascii() or not _BASE64.fullmatch(compact.rstrip("=")):
        raise ImageInputError(
            f"not base64 (it has characters base64 does not use); {_SEND}, or an http(s) URL if the "
            "server fetches them",
            field=field,
        )
    digits = compact.rstrip("=").encode("ascii").translate(_URL_SAFE)
    if len(digits) * 3 // 4 > MAX_IMAGE_BYTES:
        raise too_large(field, MAX_IMAGE_BYTES)
    if len(digits) % 4 == 1:
        raise ImageInputError(f"not base64 (its length is not that of any base64 text); {_SEND}", field=field)
    try:
        return base64.b64decode(digits + b"=" * (-len(digits) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError(f"not base64; {_SEND}", field=field) from None
