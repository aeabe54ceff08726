"""The browser playground: one self-contained page at GET /ui.

The page, its style sheet and its script are separate files in static/ (open index.html from the
folder to work on them); the server sends them as one document with the style and script inlined.
One document means one open path: with SD_API_KEYS set, /ui is the only playground URL the key
check has to let through, and the page can load before it asks for the key.
"""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

STATIC_DIR = Path(__file__).parent / "static"
STYLE_TAG = '<link rel="stylesheet" href="style.css">'
SCRIPT_TAG = '<script src="app.js" defer></script>'

router = APIRouter()


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


@lru_cache(maxsize=1)
def page() -> tuple[str, str]:
    """index.html with style.css and app.js inlined in place of the tags that load them, and the
    Content-Security-Policy that runs exactly those (by hash), talks to this server only, shows
    the images it receives as data: URLs, and may not be framed."""
    html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    style = (STATIC_DIR / "style.css").read_text(encoding="utf-8")
    script = (STATIC_DIR / "app.js").read_text(encoding="utf-8")
    for tag in (STYLE_TAG, SCRIPT_TAG):
        if html.count(tag) != 1:
            raise RuntimeError(f"static/index.html needs {tag} exactly once (it is inlined when served)")
    if "</script" in script.lower() or "</style" in style.lower():
        raise RuntimeError("app.js and style.css must not contain a closing </script> or </style> tag")
    # app.js waits for DOMContentLoaded itself, so running it inline in <head> is what `defer` did.
    style, script = f"\n{style}", f"\n{script}"
    html = html.replace(STYLE_TAG, f"<style>{style}</style>").replace(
        SCRIPT_TAG, f"<script>{script}</script>"
    )
    policy = (
        f"default-src 'none'; script-src {_sha256(script)}; style-src {_sha256(style)}; "
        "img-src data: blob:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    )
    return html, policy


@router.get("/ui", include_in_schema=False)
def playground() -> HTMLResponse:
    # no-cache: revalidated on each visit, so a browser never shows an old page against a new server.
    html, policy = page()
    return HTMLResponse(html, headers={"Cache-Control": "no-cache", "Content-Security-Policy": policy})
