"""Who a request belongs to, and the opaque key that stands for them everywhere else.

Replicas report resident users only as keys, routers compare keys, and logs never see raw ids.
Imports nothing of ours and nothing heavy, so the router and ingress can use it.
"""

from __future__ import annotations

import hashlib
import hmac

USER_HEADER = "x-user-id"
MAX_USER_ID_LENGTH = 256


def user_key(user_id: str, secret: bytes = b"") -> str:
    """The stable opaque key (16 hex digits) for a user id: SHA-256 of it, or with a `secret`
    (the deployment's, the same in every ingress) HMAC-SHA-256, so that without the secret
    nobody can compute a given user's key to look for it among resident users."""
    if secret:
        return hmac.new(secret, user_id.encode("utf-8"), hashlib.sha256).hexdigest()[:16]
    return hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:16]


def resolve_user_id(header_value: str | None, body_user: str | None) -> str | None:
    """The user of a request: the X-User-Id header, else the body's `user`, else None.

    None means the request's KV cache is not kept after it ends. Blank values count as absent.
    """
    for candidate in (header_value, body_user):
        if candidate is not None and candidate.strip():
            return candidate.strip()
    return None
