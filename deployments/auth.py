"""Optional API keys: who is calling, checked in constant time, and users namespaced per key.

Keys come from a file (one a line) and/or an environment variable (comma- or space-separated),
named in the app's `auth` settings. With no source configured, auth is off. A presented key is
hashed and compared with every known key's hash by `hmac.compare_digest`, without stopping at
the first match, so timing says nothing about which key, or how much of one, matched. Keys are
never logged; a key is known inside the service only by its `key_id` (a hash prefix).

With auth on, a user id is namespaced by the caller's key id before anything else sees it, so
the same `user` under two keys is two users with two caches. Imports only `config`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from deployments.config import AuthConfig, ConfigError

HANDLE_PRINCIPAL = "handle"  # Python DeploymentHandle callers (inside the cluster)
_SEPARATORS = re.compile(r"[\s,]+")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def key_id(key: str) -> str:
    """What stands for a key in namespaces and logs: 12 hex digits of its SHA-256."""
    return _digest(key).hex()[:12]


class KeyRing:
    """The accepted API keys, held only as SHA-256 digests."""

    def __init__(self, keys: Iterable[str] = (), admin_keys: Iterable[str] = ()) -> None:
        admin = [k for k in dict.fromkeys(admin_keys) if k]
        self._digests = [_digest(k) for k in dict.fromkeys([*keys, *admin]) if k]
        self._admin_ids = frozenset(key_id(k) for k in admin)

    def is_admin(self, principal: str | None) -> bool:
        """Whether the key id `principal` (from `match`) is an admin key's."""
        return principal is not None and principal in self._admin_ids

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def match(self, presented: str | None) -> str | None:
        """The key id of `presented` if it is an accepted key, else None (constant time)."""
        if presented is None or not self._digests:
            return None
        digest = _digest(presented)
        found: bytes | None = None
        for known in self._digests:  # no early exit: every key is compared every time
            if hmac.compare_digest(digest, known):
                found = known
        return found.hex()[:12] if found is not None else None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def parse_keys(text: str) -> list[str]:
    """Keys from a file's text: one a line; blank lines and `#` comments ignored."""
    keys = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            keys.append(line)
    return keys


def load_keys(cfg: AuthConfig, environ: Mapping[str, str] = os.environ) -> KeyRing:
    """Read the configured key sources; a configured source that yields no key is an error.

    Refusing to start beats silently serving without auth because a file or variable is empty.
    """
    keys: list[str] = []
    if cfg.api_keys_file:
        path = Path(cfg.api_keys_file).expanduser()
        try:
            found = parse_keys(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"auth.api_keys_file: cannot read {path}: {exc.strerror}") from None
        if not found:
            raise ConfigError(f"auth.api_keys_file: {path} holds no keys")
        keys += found
    if cfg.api_keys_env:
        found = [k for k in _SEPARATORS.split(environ.get(cfg.api_keys_env, "")) if k]
        if not found:
            raise ConfigError(
                f"auth.api_keys_env: environment variable {cfg.api_keys_env} is unset or empty "
                "in the ingress process"
            )
        keys += found
    admin: list[str] = []
    if cfg.admin_keys_env:
        admin = [k for k in _SEPARATORS.split(environ.get(cfg.admin_keys_env, "")) if k]
        if not admin:
            raise ConfigError(
                f"auth.admin_keys_env: environment variable {cfg.admin_keys_env} "
                "is unset or empty in the ingress process"
            )
    return KeyRing(keys, admin)


def user_secret(cfg: AuthConfig, environ: Mapping[str, str] = os.environ) -> bytes:
    """The secret keying user hashes (`auth.user_key_secret_env`), or b"" when none is set."""
    if not cfg.user_key_secret_env:
        return b""
    secret = environ.get(cfg.user_key_secret_env, "")
    if not secret:
        raise ConfigError(
            f"auth.user_key_secret_env: environment variable "
            f"{cfg.user_key_secret_env} is unset or empty in the ingress process"
        )
    return secret.encode("utf-8")


_NAMESPACE = "\x1f"  # cannot occur in a key id


def namespaced_user(principal: str | None, user: str | None) -> str | None:
    """The user id the rest of the service sees: `user` scoped to its caller's key.

    `principal` is the caller's key id (or HANDLE_PRINCIPAL), or None when auth is off, in
    which case the id is unchanged. The separator cannot occur in a key id, so no choice of
    `user` under one key can name a user of another.
    """
    if user is None or principal is None:
        return user
    return f"{principal}{_NAMESPACE}{user}"


def tenant_of(user: str | None) -> str:
    """The key id a `namespaced_user` id belongs to: its tenant ("" with auth off)."""
    if user is None or _NAMESPACE not in user:
        return ""
    return user.split(_NAMESPACE, 1)[0]
