"""API keys and the HTTP gate without Ray: parsing, constant-time matching, namespacing, limits."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI, Request

from deployments.auth import (
    HANDLE_PRINCIPAL,
    KeyRing,
    bearer_token,
    key_id,
    load_keys,
    namespaced_user,
    parse_keys,
)
from deployments.config import AuthConfig, ConfigError, parse_app_args
from deployments.gate import PRINCIPAL_SCOPE_KEY, Gate, GateSettings


def test_key_file_format_and_env_keys(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# comment\nk1\n\n  k2  # trailing comment\n")
    assert parse_keys(path.read_text()) == ["k1", "k2"]
    ring = load_keys(
        AuthConfig(api_keys_file=str(path), api_keys_env="KEYS"), environ={"KEYS": "k3, k4\nk5"}
    )
    assert len(ring) == 5 and ring.enabled
    assert ring.match("k4") == key_id("k4") and ring.match("k6") is None
    assert ring.match(None) is None and ring.match("") is None


def test_a_configured_key_source_without_keys_refuses_to_start(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(ConfigError, match=r"auth\.api_keys_file"):
        load_keys(AuthConfig(api_keys_file=str(empty)))
    with pytest.raises(ConfigError, match=r"auth\.api_keys_file"):
        load_keys(AuthConfig(api_keys_file=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match=r"auth\.api_keys_env"):
        load_keys(AuthConfig(api_keys_env="NOT_SET_ANYWHERE"), environ={})
    assert not load_keys(AuthConfig()).enabled  # no source: auth off
    with pytest.raises(ConfigError, match=r"auth\.api_keys_env"):
        parse_app_args({"auth": {"api_keys_env": "not a name"}})


def test_bearer_parsing():
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    for bad in (None, "", "Basic abc", "Bearer", "abc"):
        assert bearer_token(bad) is None


def test_namespaces_keep_keys_apart():
    a, b = key_id("key-a"), key_id("key-b")
    assert namespaced_user(None, "alice") == "alice"  # auth off: unchanged
    assert namespaced_user(a, None) is None
    assert namespaced_user(a, "alice") != namespaced_user(b, "alice")
    # No user id under one key can spell another key's user.
    assert namespaced_user(b, namespaced_user(a, "alice")) != namespaced_user(a, "alice")
    assert namespaced_user(HANDLE_PRINCIPAL, "alice") not in {
        namespaced_user(a, "alice"),
        namespaced_user(b, "alice"),
    }


def make_app(keys=(), max_body=100, rejects=None) -> FastAPI:
    app = FastAPI()
    app.add_middleware(Gate)
    app.state.gate = GateSettings(
        KeyRing(keys), max_body, (rejects.append if rejects is not None else lambda r: None)
    )

    @app.post("/v1/echo")
    async def echo(request: Request) -> dict:
        return {
            "size": len(await request.body()),
            "principal": request.scope.get(PRINCIPAL_SCOPE_KEY),
        }

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True}

    return app


async def call(app, method, path, **kwargs):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.request(method, path, **kwargs)


@pytest.mark.anyio
async def test_gate_checks_keys_except_on_open_paths():
    rejects: list[str] = []
    app = make_app(keys=["secret"], rejects=rejects)
    denied = await call(app, "POST", "/v1/echo", content=b"{}")
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    ok = await call(
        app, "POST", "/v1/echo", content=b"{}", headers={"Authorization": "Bearer secret"}
    )
    assert ok.json() == {"size": 2, "principal": key_id("secret")}
    assert (await call(app, "GET", "/health")).status_code == 200
    assert rejects == ["invalid_api_key"]


@pytest.mark.anyio
async def test_gate_bounds_the_body_declared_or_streamed():
    app = make_app(max_body=100)
    assert (await call(app, "POST", "/v1/echo", content=b"x" * 100)).json()["size"] == 100
    declared = await call(app, "POST", "/v1/echo", content=b"x" * 101)
    assert declared.status_code == 413
    assert declared.json()["error"]["code"] == "request_too_large"

    async def stream():
        for _ in range(5):
            yield b"y" * 30

    streamed = await call(app, "POST", "/v1/echo", content=stream())
    assert streamed.status_code == 413


@pytest.fixture
def anyio_backend():
    return "asyncio"
