"""Jobs' webhooks, signed as the Standard Webhooks spec says (standardwebhooks.com): headers
``webhook-id`` (one per message, the same on every retry of it, so that a receiver can drop
duplicates), ``webhook-timestamp`` and ``webhook-signature`` (``v1,<base64 HMAC-SHA256>``, one per
secret while secrets rotate).

Every attempt resolves the host again, checks every address (addresses.py) and connects to the
checked address itself, so a name that resolved to a public address at submit cannot be turned to
a private one later (DNS rebinding). Redirects are not followed (each would need the same checks,
and a receiver has no reason to move), answers are read only up to a limit, and nothing is reused
between attempts or hosts (a kept-alive connection opened for one name could otherwise carry a
request for another name on the same address, past its certificate check).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import logging
import random
import secrets as tokens
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from standardwebhooks import Webhook

from service.jobstore import addresses
from service.jobstore.addresses import (
    Target,
    UnresolvedHost,
    WebhookError,
    checked,
    parse_allowed,
    parse_target,
)

__all__ = ["Deliveries", "WebhookError", "WebhookPolicy", "check_url"]

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
# The spec asks for secrets of 24 to 64 bytes; shorter keys make the HMAC guessable.
SECRET_BYTES = (24, 64)
_MAKE_ONE = "python -c \"import base64,os; print('whsec_' + base64.b64encode(os.urandom(32)).decode())\""
# At most this many of a host's addresses are tried within one attempt.
_ADDRESSES_PER_ATTEMPT = 3


def _parse_secret(text: str, position: int) -> str:
    # Messages name the secret by position only: a secret never reaches a log or an error.
    if not text.startswith(SECRET_PREFIX):
        raise ValueError(
            f"SD_WEBHOOK_SECRET's secret #{position} does not start with {SECRET_PREFIX}; "
            f"make one with {_MAKE_ONE}"
        )
    encoded = text[len(SECRET_PREFIX) :]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            f"SD_WEBHOOK_SECRET's secret #{position} is not base64 after {SECRET_PREFIX}; "
            f"make one with {_MAKE_ONE}"
        ) from None
    if not SECRET_BYTES[0] <= len(key) <= SECRET_BYTES[1]:
        raise ValueError(
            f"SD_WEBHOOK_SECRET's secret #{position} holds {len(key)} bytes; it must hold "
            f"{SECRET_BYTES[0]} to {SECRET_BYTES[1]}: make one with {_MAKE_ONE}"
        )
    return text


@dataclass(frozen=True)
class WebhookPolicy:
    secrets: tuple[str, ...]  # whsec_<base64>; every message is signed with each (rotation)
    allowed_hosts: tuple[str, ...]  # names and IPs that may be (or resolve to) non-public addresses
    timeout_s: float = 10.0  # per attempt, the whole exchange
    max_response_bytes: int = 64 * 1024
    retry_for_s: float = 3600.0
    first_backoff_s: float = 1.0
    max_backoff_s: float = 300.0

    @classmethod
    def parse(cls, secret: str | None, allowed: str | None, **settings: Any) -> WebhookPolicy:
        """From SD_WEBHOOK_SECRET (comma-separated secrets; none: webhooks are off) and
        SD_WEBHOOK_ALLOWED_HOSTS (comma-separated). A ValueError says which secret is wrong."""
        items = [item.strip() for item in (secret or "").split(",") if item.strip()]
        parsed = tuple(_parse_secret(item, n) for n, item in enumerate(items, start=1))
        return cls(parsed, parse_allowed(allowed), **settings)

    @property
    def enabled(self) -> bool:
        return bool(self.secrets)

    def __repr__(self) -> str:  # the secrets stay out of any log or traceback
        return f"WebhookPolicy(secrets=<{len(self.secrets)}>, allowed_hosts={self.allowed_hosts!r})"


def _literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _refuse_off(policy: WebhookPolicy) -> None:
    if not policy.enabled:
        raise WebhookError(
            "this server sends no webhooks (it has no SD_WEBHOOK_SECRET to sign them with); "
            "submit without a webhook and poll the job instead"
        )


def check_url(url: str, policy: WebhookPolicy) -> None:
    """At submit (blocking: it resolves the host; call it in a thread from async code): raises
    WebhookError unless the URL is http(s), without user info, and its host is allowed or all its
    addresses are public."""
    _refuse_off(policy)
    target = parse_target(url)
    resolved = [target.host] if _literal(target.host) else addresses.resolve_now(target.host, target.port)
    checked(target.host, resolved, policy.allowed_hosts)


def signature(secrets: tuple[str, ...], msg_id: str, at: datetime, body: bytes) -> str:
    return " ".join(Webhook(secret).sign(msg_id, at, body) for secret in secrets)


def _retry_after(value: str | None, ceiling: float) -> float | None:
    """Retry-After in seconds (a number of seconds or an HTTP date), within 0..ceiling."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value) if value.isdigit() else parsedate_to_datetime(value).timestamp() - time.time()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return min(max(seconds, 0.0), ceiling)


@dataclass
class _Outcome:
    outcome: str  # "delivered" | "retry" | "failed" | "refused"
    status: int | None = None
    wait_s: float | None = None  # Retry-After
    why: str = ""


class Deliveries:
    """Sends webhooks; one per server. ``tls`` replaces the system's certificate store (tests)."""

    def __init__(
        self,
        policy: WebhookPolicy,
        on_attempt: Callable[[str, str], None] | None = None,
        *,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.policy = policy
        self._on_attempt = on_attempt
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,  # a proxy from the environment would connect by name, past the checks
            verify=tls if tls is not None else True,
            timeout=httpx.Timeout(policy.timeout_s),
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    async def send(self, url: str, event: str, payload: dict[str, Any]) -> bool:
        """One message, retried until delivered (2xx: True) or given up (False): connection errors,
        timeouts, 429 and 5xx are retried with backoff until retry_for_s has passed; other answers
        fail at once; a URL that may not be used (now) is refused."""
        msg_id = "msg_" + tokens.token_urlsafe(18)
        sent_at = datetime.now(timezone.utc)
        body = json.dumps({"type": event, "timestamp": sent_at.isoformat(), "data": payload}).encode()
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            result = await self._attempt(url, msg_id, body)
            delay = 0.0
            if result.outcome == "retry":
                backoff = min(self.policy.max_backoff_s, self.policy.first_backoff_s * 2 ** (attempt - 1))
                delay = result.wait_s if result.wait_s is not None else backoff * random.uniform(0.5, 1.0)
                if time.monotonic() - started + delay > self.policy.retry_for_s:
                    result.outcome = "failed"
            self._report(event, msg_id, attempt, result)
            if result.outcome != "retry":
                return result.outcome == "delivered"
            await asyncio.sleep(delay)

    def _report(self, event: str, msg_id: str, attempt: int, result: _Outcome) -> None:
        level = logging.INFO if result.outcome in ("delivered", "retry") else logging.WARNING
        log.log(
            level, "webhook %s %s attempt %d: %s (status %s)%s", event, msg_id, attempt, result.outcome,
            result.status if result.status is not None else "-", f": {result.why}" if result.why else "",
        )  # fmt: skip
        if self._on_attempt is not None:
            try:
                self._on_attempt(event, result.outcome)
            except Exception:  # a metrics hook must not stop a delivery
                log.exception("the webhook attempt hook failed")

    async def _attempt(self, url: str, msg_id: str, body: bytes) -> _Outcome:
        try:
            _refuse_off(self.policy)
            target = parse_target(url)
            literal = _literal(target.host)
            resolved = [target.host] if literal else await addresses.resolve(target.host, target.port)
            usable = checked(target.host, resolved, self.policy.allowed_hosts)
        except UnresolvedHost as error:
            return _Outcome("retry", why=str(error))
        except WebhookError as error:
            return _Outcome("refused", why=str(error))
        at = datetime.now(timezone.utc)
        headers = {
            "host": target.host_header,
            "content-type": "application/json",
            "accept-encoding": "identity",  # the answer is never decompressed, so never a bomb
            "user-agent": "sd-endpoint-webhooks",
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": signature(self.policy.secrets, msg_id, at, body),
        }
        last = _Outcome("retry", why="no address could be reached")
        for address in usable[:_ADDRESSES_PER_ATTEMPT]:
            try:
                return await asyncio.wait_for(
                    self._post(target, address, literal, headers, body), timeout=self.policy.timeout_s
                )
            except httpx.ConnectError:
                last = _Outcome("retry", why="connection refused or failed")  # the next address may answer
            except (httpx.TimeoutException, asyncio.TimeoutError):
                return _Outcome("retry", why=f"no answer within {self.policy.timeout_s:g} s")
            except httpx.TransportError as error:
                return _Outcome("retry", why=f"the connection broke ({type(error).__name__})")
        return last

    async def _post(
        self, target: Target, address: str, literal: bool, headers: dict[str, str], body: bytes
    ) -> _Outcome:
        # The URL names the checked address; Host and (for https) SNI and the certificate check
        # name the host, so the receiver and its certificate see what the caller asked for.
        url = httpx.URL(scheme=target.scheme, host=address, port=target.port, raw_path=target.target.encode())
        extensions = {"sni_hostname": target.host} if target.scheme == "https" and not literal else {}
        request = self._client.build_request(
            "POST", url, content=body, headers=headers, extensions=extensions
        )
        response = await self._client.send(request, stream=True)
        try:
            read = 0
            async for chunk in response.aiter_raw():
                read += len(chunk)
                if read >= self.policy.max_response_bytes:
                    break  # the rest is never read: closing drops the connection
        finally:
            await response.aclose()
        status = response.status_code
        if 200 <= status < 300:
            return _Outcome("delivered", status)
        if status == 429 or status >= 500:
            return _Outcome(
                "retry", status, _retry_after(response.headers.get("retry-after"), self.policy.max_backoff_s)
            )
        if 300 <= status < 400:
            return _Outcome("failed", status, why="the receiver redirected; webhooks do not follow redirects")
        return _Outcome("failed", status, why="the receiver refused the message")

    async def aclose(self) -> None:
        await self._client.aclose()
