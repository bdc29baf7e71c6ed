"""Who may talk to ``voxtext web``: the token (query, cookie or bearer header), the Host and the Origin.

The same rules as ``voxtext serve``: loopback by default; any other bind address needs a token, compared in
constant time. The page is opened once as ``/?token=...``; the answer sets an HttpOnly, SameSite=Strict cookie
so the page's own requests (scripts, the websocket, uploads, downloads) carry it. Without a token the server
only answers requests addressed to a loopback host name (no DNS rebinding), and never a foreign Origin.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web

from ..access import is_loopback, token_matches

COOKIE = "voxtext_web_token"


def _host_name(host_header: str) -> str:
    return urlsplit(f"//{host_header}").hostname or ""


def supplied_token(request: web.Request) -> str:
    auth = request.headers.get("Authorization", "")
    scheme, _, credential = auth.partition(" ")
    if scheme.lower() == "bearer" and credential.strip():
        return credential.strip()
    return request.query.get("token") or request.cookies.get(COOKIE, "")


def make_guard(token: str | None):
    """aiohttp middleware enforcing the rules above on every HTTP request and websocket upgrade."""

    @web.middleware
    async def guard(request: web.Request, handler):
        origin = request.headers.get("Origin")
        if origin and origin != "null" and urlsplit(origin).netloc.lower() != request.host.lower():
            return web.Response(status=403, text="voxtext web: cross-origin requests are refused\n")
        if token is None:
            if not is_loopback(_host_name(request.host)):
                return web.Response(status=403, text="voxtext web: this server only answers to a loopback address\n")
            return await handler(request)
        if not token_matches(supplied_token(request), token):
            return web.Response(status=401, text="voxtext web: missing or wrong token; open the URL printed at "
                                                 "start (it ends with ?token=...)\n")
        response = await handler(request)
        if request.query.get("token") and isinstance(response, web.StreamResponse) and not response.prepared \
                and not isinstance(response, web.WebSocketResponse):
            response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/")
        return response

    return guard
