"""A mixture-of-experts model served end to end on real Ray Serve (CPU), on the paged engine.

A tiny random Qwen3-MoE checkpoint (float32, one dense layer among routed ones) with the
built-in tokenizer, deployed as its own app ("moe", one model replica, deleted after) from a
local directory: the OpenAI API answers from the paged engine, greedy completions give
transformers' own greedy tokens, and a returning user's next turn comes from its kept cache.
"""

from __future__ import annotations

import random

import httpx
import openai
import pytest
import torch

from deployments.engine.builtin_tokenizer import write_tokenizer
from deployments.tokenizer import TextTokenizer
from tests.cpu.conftest import SERVICE_ARGS, wait_healthy
from tests.cpu.test_paged_engine import hf_greedy
from tests.cpu.test_paged_moe import ARCHS, SMALL

APP, MODEL = "moe", "tiny-moe"


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    import transformers

    config_name, model_name, extra = ARCHS["qwen3_moe"]
    torch.manual_seed(11)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**SMALL, **extra))
    path = tmp_path_factory.mktemp("tiny-moe")
    model.eval().save_pretrained(path)
    write_tokenizer(path)
    return str(path), model


@pytest.fixture(scope="module")
def moe_url(serve_url, moe_model):
    from ray import serve

    from deployments.app import build_app

    args = {
        **SERVICE_ARGS,
        "model": {"model_id": moe_model[0], "served_model_name": MODEL, "max_model_len": 512},
        "replica": {**SERVICE_ARGS["replica"], "num_replicas": 1},
    }
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
    url = f"{serve_url}/{APP}"
    wait_healthy(url)
    yield url
    serve.delete(APP)


def test_the_moe_model_is_served_by_the_paged_engine(moe_url):
    (row,) = httpx.get(f"{moe_url}/admin/replicas", timeout=30).json()
    assert row["engine"] == "PagedEngine" and row["model"] == MODEL
    client = openai.OpenAI(base_url=f"{moe_url}/v1", api_key="unused")
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Which experts will you pick?"}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens >= 1
    assert any(c.choices and c.choices[0].delta.content for c in chunks)


def test_greedy_completions_give_transformers_greedy_tokens(moe_url, moe_model):
    path, model = moe_model
    tokenizer = TextTokenizer.load(path)
    rng = random.Random(5)
    for i in range(3):
        prompt = [rng.randrange(3, 380) for _ in range(20 + 17 * i)]
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 10, "temperature": 0}
        response = httpx.post(f"{moe_url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        expected = hf_greedy(model, prompt, 10)
        assert expected and tokenizer.decode(expected)  # text to compare, not an instant EOS
        assert response.json()["choices"][0]["text"] == tokenizer.decode(expected), (i, expected)


def test_a_returning_users_next_turn_comes_from_its_kept_cache(moe_url):
    messages = [{"role": "user", "content": "Tell me about routed experts and kept caches."}]
    headers = {"X-User-Id": "moe-user"}
    body = {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0}
    first = httpx.post(f"{moe_url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert first.status_code == 200, first.text
    answer = first.json()["choices"][0]["message"]["content"]
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "More?"}]
    again = httpx.post(
        f"{moe_url}/v1/chat/completions", json={**body, "messages": messages}, headers=headers,
        timeout=60,
    )  # fmt: skip
    assert again.status_code == 200, again.text
    usage = again.json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= first.json()["usage"]["prompt_tokens"]
