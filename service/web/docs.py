"""The API documentation pages, GET /docs (Swagger UI) and GET /redoc (ReDoc), from the pinned copy
of their assets that the fastapi-offline package ships: no CDN, so they work with no network (this
server is often run offline) and load no script whose version floats.

Each page sends a Content-Security-Policy that lets it run its own scripts (the inline one by its
hash) and talk to this server only.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

OPENAPI_URL = "/swagger.json"
TITLE = "Stable Diffusion endpoint"
ASSETS_URL = "/docs/assets"
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
# Swagger UI and ReDoc set styles inline and ReDoc runs its search in a blob: worker.
_POLICY = (
    "default-src 'none'; script-src 'self'{hashes}; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src blob:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)

router = APIRouter(include_in_schema=False)


def assets_dir() -> Path:
    return Path(str(files("fastapi_offline") / "static"))


def script_hashes(html: str) -> str:
    """The CSP sources that allow exactly the inline scripts of ``html``."""
    return "".join(
        f" 'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
        for body in _INLINE_SCRIPT.findall(html)
    )


@lru_cache(maxsize=2)
def _page(kind: str) -> tuple[bytes, str]:
    favicon = f"{ASSETS_URL}/favicon.png"
    if kind == "swagger":
        page = get_swagger_ui_html(
            openapi_url=OPENAPI_URL, title=f"{TITLE} - Swagger UI", swagger_favicon_url=favicon,
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
        )  # fmt: skip
    else:
        page = get_redoc_html(
            openapi_url=OPENAPI_URL, title=f"{TITLE} - ReDoc", redoc_favicon_url=favicon,
            redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js", with_google_fonts=False,
        )  # fmt: skip
    body = bytes(page.body)
    return body, _POLICY.format(hashes=script_hashes(body.decode()))


def _html(kind: str) -> HTMLResponse:
    body, policy = _page(kind)
    return HTMLResponse(body, headers={"Content-Security-Policy": policy, "Cache-Control": "no-cache"})


@router.get("/docs")
def swagger_ui() -> HTMLResponse:
    return _html("swagger")


@router.get("/redoc")
def redoc() -> HTMLResponse:
    return _html("redoc")


@router.get(f"{ASSETS_URL}/{{name}}")
def asset(name: str) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:  # only the listed files: never a path the client composes
        raise HTTPException(404, f"no documentation asset {name[:60]!r}")
    return FileResponse(assets_dir() / name, media_type=media_type, headers={"Cache-Control": "max-age=3600"})


@router.get("/openapi.json")
def openapi_document(request: Request) -> JSONResponse:
    """The document of /swagger.json under FastAPI's default name too, where client generators and
    fuzzers look first."""
    return JSONResponse(request.app.openapi())
