"""The errors of a bad input image. Their messages go to the client as they are, so each names the
request field, says what was wrong and what to send instead, and never repeats the client's content
(no base64, no URL: a host name from the operator's SD_FETCH_IMAGE_URLS is the most they name)."""

from __future__ import annotations

from service.runtime.errors import ContractError


class ImageInputError(ContractError):
    """A bad input image; becomes HTTP 422. ``field`` names the request field (e.g. "mask",
    "init_images[0]"), and the message starts with it ("mask: not an image (...)"): a request may
    carry several images, and the client must learn which one was wrong."""

    def __init__(self, message: str, *, field: str) -> None:
        # Callers may pass the message with or without the prefix; it is written once either way.
        prefix = f"{field}: "
        super().__init__(message if message.startswith(prefix) else prefix + message)
        self.field = field


class ImageUrlRefusedError(ImageInputError):
    """An image URL the server may not fetch (no SD_FETCH_IMAGE_URLS, a host it does not name, an
    address inside the server's network, a redirect); becomes HTTP 400: the request itself is not
    allowed, whatever image the URL would have given."""
