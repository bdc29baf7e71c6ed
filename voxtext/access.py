"""Who may reach a voxtext service (``voxtext serve``, ``voxtext web``): loopback by default, a token otherwise."""

from __future__ import annotations

import hmac
import ipaddress


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP address (``[::1]`` brackets allowed)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_refusal(program: str, host: str, token: str | None) -> str | None:
    """Why ``program`` must not listen on ``host`` (any non-loopback address needs a token), or None."""
    if is_loopback(host) or token:
        return None
    return f"{program}: refusing to listen on {host} without a token: pass --token or set VOXTEXT_TOKEN"


def token_matches(supplied: str, token: str) -> bool:
    """Constant-time comparison of a client's token with the service's."""
    return hmac.compare_digest(supplied.encode(), token.encode())
