"""The browser front end: ``/`` (the chat page), ``/static/{app.js,app.css}`` and the two
vendored libraries ``/static/vendor/{marked.umd.js,purify.min.js}`` (see
``gateway/static/vendor/README.md``).

No authentication for the page itself: it holds no data, and every API call it makes carries
the user's key. Only these files of ``gateway/static`` are served (an allowlist, no directory
listing, no path handling), each with a strict Content-Security-Policy: the page loads nothing
from anywhere but this gateway and runs no inline script or style. Answers are Markdown,
rendered by marked and cleaned by DOMPurify to an allowlist of text elements (no images, no
script, no event handlers), so an answer cannot inject script or make the page fetch anything.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from gateway.core.errors import APIError
from shared.errors import ErrorCode

STATIC_DIR = Path(__file__).resolve().parents[2] / "static"  # gateway/static

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; "
    "object-src 'none'"
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Revalidate on every load (FileResponse sends an ETag), so an upgrade is seen at once.
    "Cache-Control": "no-cache",
}

_ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
_VENDOR = {
    "marked.umd.js": "text/javascript; charset=utf-8",
    "purify.min.js": "text/javascript; charset=utf-8",
}

router = APIRouter(tags=["page"], include_in_schema=False)


def _file(name: str, media_type: str) -> FileResponse:
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=SECURITY_HEADERS)


def _not_found(name: str) -> APIError:
    return APIError(404, ErrorCode.NOT_FOUND, f"No static file {name!r}.")


@router.get("/")
async def index() -> FileResponse:
    return _file("index.html", "text/html; charset=utf-8")


@router.get("/static/{name}")
async def asset(name: str) -> FileResponse:
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise _not_found(name)
    return _file(name, media_type)


@router.get("/static/vendor/{name}")
async def vendor_asset(name: str) -> FileResponse:
    media_type = _VENDOR.get(name)
    if media_type is None:
        raise _not_found("vendor/" + name)
    return _file("vendor/" + name, media_type)
