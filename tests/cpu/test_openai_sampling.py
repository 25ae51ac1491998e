"""The OpenAI sampling fields through the real service: logprobs' shapes, logit rules,
response_format, and 400s naming the field for values out of range."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from deployments.model_files import resolve_model_dir
from deployments.tokenizer import TextTokenizer

MODEL = "tiny-llama"
TOKENIZER = TextTokenizer.load(resolve_model_dir("builtin:tiny-llama", weights=False))
MESSAGES = [{"role": "user", "content": "Tell me about unified memory."}]


def post(url, path, **body):
    return httpx.post(f"{url}/v1/{path}", json={"model": MODEL, **body}, timeout=60)


def ok(response):
    assert response.status_code == 200, response.text
    return response.json()


def sse_chunks(url, path, **body):
    with httpx.stream(
        "POST", f"{url}/v1/{path}", json={"model": MODEL, "stream": True, **body}, timeout=60
    ) as response:
        assert response.status_code == 200
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_chat_logprobs_cover_every_token_and_spell_the_answer(llm_url):
    body = ok(
        post(
            llm_url,
            "chat/completions",
            messages=MESSAGES,
            max_tokens=10,
            temperature=0,
            logprobs=True,
            top_logprobs=3,
            user="lp-chat",
        )
    )
    choice = body["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    spelled = b"".join(bytes(e["bytes"]) for e in content).decode(errors="replace")
    assert spelled == choice["message"]["content"]
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        top = entry["top_logprobs"]
        assert len(top) == 3 and all(set(t) == {"token", "logprob", "bytes"} for t in top)
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        # greedy: the drawn token is the most likely one of the raw distribution
        assert entry["logprob"] == pytest.approx(top[0]["logprob"])
        assert entry["logprob"] <= 0


def test_streamed_chat_logprobs_arrive_with_their_chunks(llm_url):
    chunks = sse_chunks(
        llm_url,
        "chat/completions",
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        ignore_eos=True,
        logprobs=True,
        stream_options={"include_usage": True},
    )
    entries = [
        e
        for c in chunks
        if c["choices"] and c["choices"][0]["logprobs"]
        for e in c["choices"][0]["logprobs"]["content"]
    ]
    assert len(entries) == chunks[-1]["usage"]["completion_tokens"] == 8
    assert all(e["top_logprobs"] == [] for e in entries)  # logprobs without top_logprobs


def test_chat_without_logprobs_has_null_logprobs(llm_url):
    body = ok(post(llm_url, "chat/completions", messages=MESSAGES, max_tokens=3))
    assert body["choices"][0]["logprobs"] is None


def test_completion_logprobs_have_tokens_offsets_and_top_maps(llm_url):
    for stream in (False, True):
        request = {
            "prompt": "Unified memory is",
            "max_tokens": 6,
            "temperature": 0,
            "ignore_eos": True,
            "logprobs": 2,
        }
        if stream:
            chunks = sse_chunks(llm_url, "completions", **request)
            parts = [
                c["choices"][0]["logprobs"]
                for c in chunks
                if c["choices"] and c["choices"][0]["logprobs"]
            ]
            lp = {k: [v for p in parts for v in p[k]] for k in parts[0]}
            text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        else:
            choice = ok(post(llm_url, "completions", **request))["choices"][0]
            lp, text = choice["logprobs"], choice["text"]
        assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
        assert "".join(lp["tokens"]) == text
        assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(6)]
        assert all(
            len(top) <= 2 and max(top.values()) == pytest.approx(chosen)
            for top, chosen in zip(lp["top_logprobs"], lp["token_logprobs"], strict=True)
        )


def test_logit_bias_and_repetition_penalty_steer_greedy_output(llm_url):
    token = TOKENIZER.encode_text("e")[0]
    base = {"prompt": "eee", "max_tokens": 5, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    biased = ok(post(llm_url, "completions", logit_bias={str(token): 100}, **base))
    assert biased["choices"][0]["text"] == "e" * 5
    # The same bias divided by a huge repetition penalty: "e" is in the prompt, so it loses.
    penalized = ok(
        post(llm_url, "completions", logit_bias={str(token): 100}, repetition_penalty=1e6, **base)
    )
    assert "e" not in penalized["choices"][0]["logprobs"]["tokens"]


def test_json_schema_output_validates(llm_url):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}},
        "required": ["name", "n"],
        "additionalProperties": False,
    }
    body = ok(
        post(
            llm_url,
            "chat/completions",
            messages=MESSAGES,
            max_tokens=120,
            seed=1,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "thing", "schema": schema},
            },
        )
    )
    assert body["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), schema)
    ok(
        post(
            llm_url,
            "chat/completions",
            messages=MESSAGES,
            max_tokens=4,
            response_format={"type": "text"},
        )
    )


@pytest.mark.parametrize(
    "field, value, param",
    [
        ("presence_penalty", 2.5, "presence_penalty"),
        ("frequency_penalty", -3, "frequency_penalty"),
        ("repetition_penalty", 0, "repetition_penalty"),
        ("logit_bias", {"5": 101}, "logit_bias"),
        ("logit_bias", {"five": 1}, "logit_bias"),
        ("logit_bias", {"99999999": 1}, "logit_bias"),
        ("top_logprobs", 3, "top_logprobs"),  # without logprobs: true
        ("top_logprobs", 21, "top_logprobs"),
        ("response_format", {"type": "yaml"}, "response_format"),
        ("response_format", {"type": "json_schema"}, "response_format"),
        (
            "response_format",
            {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}},
            "response_format",
        ),
        ("min_p", 1.5, "min_p"),
        ("top_k", -2, "top_k"),
    ],
)
def test_out_of_range_sampling_values_are_400s_naming_the_field(llm_url, field, value, param):
    response = post(llm_url, "chat/completions", messages=MESSAGES, max_tokens=2, **{field: value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"] or "").startswith(param or field) or field in error["message"]


def test_completion_logprobs_above_the_limit_are_a_400(llm_url):
    response = post(llm_url, "completions", prompt="x", max_tokens=2, logprobs=21)
    assert response.status_code == 400 and response.json()["error"]["param"] == "logprobs"


def test_top_k_1_and_min_p_1_make_sampling_greedy(llm_url):
    base = {"prompt": "Unified memory is", "max_tokens": 8, "ignore_eos": True}
    greedy = ok(post(llm_url, "completions", temperature=0, **base))["choices"][0]["text"]
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        texts = {
            ok(post(llm_url, "completions", temperature=1.5, seed=s, **extra, **base))["choices"][
                0
            ]["text"]
            for s in range(3)
        }
        assert texts == {greedy}, extra
    # and without them, temperature 1.5 does draw something else
    assert any(
        ok(post(llm_url, "completions", temperature=1.5, seed=s, **base))["choices"][0]["text"]
        != greedy
        for s in range(3)
    )
