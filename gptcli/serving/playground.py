"""The playground page ``gptcli serve`` answers ``GET /`` with: one HTML file shipped in the package
(``gptcli/serving/static/playground.html``, its CSS and JavaScript inline), so it works offline and needs no
build step. The page talks only to the server that sent it (its API, with the key the user types)."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

PAGE = "playground.html"

# The page loads nothing from anywhere (no CDN, no fonts, no images but data: URLs) and calls only its
# own server; the policy makes the browser hold it to that.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@lru_cache(maxsize=1)
def playground_html() -> str:
    """The page's HTML, read once from the package."""
    return resources.files("gptcli.serving").joinpath("static").joinpath(PAGE).read_text(encoding="utf-8")
