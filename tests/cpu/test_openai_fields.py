"""Every field of OpenAI's chat and completions request schemas is honoured or refused.

The field lists are the OpenAI API reference's (POST /v1/chat/completions and
/v1/completions request bodies). Each field is sent: a refused one gets a 400 whose `param`
names it and whose code is `unsupported_parameter` (and passes at the value that asks for
nothing); an honoured one has an effect the test observes. The sampling fields (logprobs,
penalties, logit_bias, response_format: SAMPLER) are only checked to be accepted here; their
effects are tests/cpu/test_openai_sampling.py's.

The app serves the built-in model's weights under the real Qwen2.5-Instruct chat template, so
tools and tool turns reach a template that writes them; prompt token counts are compared with
the template rendered and tokenized in this process (the reference).
"""

from __future__ import annotations

import json

import httpx
import pytest

from deployments.tokenizer import TextTokenizer
from tests.cpu.chat_models import QWEN25_INSTRUCT, builtin_with_template
from tests.cpu.conftest import wait_healthy

MODEL = "tiny-qwen-template"
CONTEXT = 1024
CHAT_FIELDS = {
    "messages",
    "model",
    "audio",
    "frequency_penalty",
    "function_call",
    "functions",
    "logit_bias",
    "logprobs",
    "max_completion_tokens",
    "max_tokens",
    "metadata",
    "modalities",
    "n",
    "parallel_tool_calls",
    "prediction",
    "presence_penalty",
    "prompt_cache_key",
    "reasoning_effort",
    "response_format",
    "safety_identifier",
    "seed",
    "service_tier",
    "stop",
    "store",
    "stream",
    "stream_options",
    "temperature",
    "tool_choice",
    "tools",
    "top_logprobs",
    "top_p",
    "user",
    "verbosity",
    "web_search_options",
}
COMPLETION_FIELDS = {
    "model",
    "prompt",
    "best_of",
    "echo",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "max_tokens",
    "n",
    "presence_penalty",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "suffix",
    "temperature",
    "top_p",
    "user",
}
# field -> (a value asking for what we lack, the value asking for nothing)
REFUSED_CHAT = {
    "audio": ({"voice": "alloy", "format": "wav"}, None),
    "function_call": ("auto", None),
    "functions": ([{"name": "f", "parameters": {}}], None),
    "metadata": ({"k": "v"}, None),
    "modalities": (["text", "audio"], ["text"]),
    "n": (2, 1),
    "prediction": ({"type": "content", "content": "x"}, None),
    "prompt_cache_key": ("k", None),
    "reasoning_effort": ("high", None),
    "safety_identifier": ("s", None),
    "service_tier": ("flex", "auto"),
    "store": (True, False),
    "verbosity": ("low", None),
    "web_search_options": ({}, None),
}
REFUSED_COMPLETION = {
    "best_of": (2, 1),
    "echo": (True, False),
    "n": (2, 1),
    "suffix": ("tail", None),
}
SAMPLER = {
    "frequency_penalty": 0.5,
    "logit_bias": {"5": 1},
    "logprobs": True,
    "presence_penalty": 0.5,
    "response_format": {"type": "json_object"},
    "top_logprobs": 2,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
HI = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return builtin_with_template(tmp_path_factory.mktemp("qwen") / "model", QWEN25_INSTRUCT)


@pytest.fixture(scope="module")
def url(serve_url, model_dir):
    from ray import serve

    from deployments.app import build_app

    serve.run(
        build_app(
            {
                "model": {
                    "model_id": str(model_dir),
                    "served_model_name": MODEL,
                    "max_model_len": CONTEXT,
                },
                "memory": {"cpu_memory_budget_bytes": "64MiB"},
                "kv_cache": {"budget_bytes": "16MiB"},
                "engine": {"default_max_tokens": 8, "cpu_threads": 1},
                "replica": {"num_replicas": 1, "num_cpus": 0, "max_replicas_per_node": None},
                "ingress": {"num_replicas": 1, "num_cpus": 0},
            }
        ),
        name="fields",
        route_prefix="/fields",
    )
    base = f"{serve_url}/fields"
    wait_healthy(base)
    yield base
    serve.delete("fields")


@pytest.fixture(scope="module")
def reference(model_dir):
    return TextTokenizer.load(model_dir)


def post(url: str, path: str, **body) -> httpx.Response:
    body.setdefault("model", MODEL)
    return httpx.post(f"{url}{path}", json=body, timeout=120)


def chat(url: str, **body) -> dict:
    body.setdefault("messages", HI)
    response = post(url, "/v1/chat/completions", **body)
    assert response.status_code == 200, response.text
    return response.json()


def complete(url: str, **body) -> dict:
    body.setdefault("prompt", "Once upon a time")
    response = post(url, "/v1/completions", **body)
    assert response.status_code == 200, response.text
    return response.json()


def text_of(answer: dict) -> str:
    choice = answer["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def sse(url: str, path: str, **body) -> list[dict]:
    body.update(model=MODEL, stream=True)
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=120) as response:
        assert response.status_code == 200
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_every_reference_field_is_classified():
    honoured_chat = set(CHAT_HONOURED) | {"n"}
    assert set(REFUSED_CHAT) | honoured_chat | set(SAMPLER) == CHAT_FIELDS
    assert (
        set(REFUSED_COMPLETION) | set(COMPLETION_HONOURED) | (set(SAMPLER) & COMPLETION_FIELDS)
        == COMPLETION_FIELDS
    )


@pytest.mark.parametrize(
    ("path", "field"),
    [("/v1/chat/completions", f) for f in REFUSED_CHAT]
    + [("/v1/completions", f) for f in REFUSED_COMPLETION],
)
def test_refused_fields_are_a_400_naming_them(url, path, field):
    table = REFUSED_CHAT if path.startswith("/v1/chat") else REFUSED_COMPLETION
    asks, nothing = table[field]
    base = {"messages": HI} if path.startswith("/v1/chat") else {"prompt": "Once"}
    refused = post(url, path, **base, **{field: asks}, max_tokens=2)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert (error["param"], error["code"]) == (field, "unsupported_parameter")
    assert post(url, path, **base, **{field: nothing}, max_tokens=2).status_code == 200


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_unknown_fields_are_refused_by_name(url, path):
    base = {"messages": HI} if path.startswith("/v1/chat") else {"prompt": "Once"}
    response = post(url, path, **base, max_token=3)  # a typo of max_tokens
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "max_token"
    assert response.json()["error"]["code"] == "unsupported_parameter"


@pytest.mark.parametrize("field", sorted(SAMPLER))
def test_sampling_fields_are_accepted_here_and_tested_for_effect_elsewhere(url, field):
    needs = {"logprobs": True} if field == "top_logprobs" else {}
    assert chat(url, **needs, **{field: SAMPLER[field]}, max_tokens=2)["choices"]


# ---- honoured fields: each check observes the field's effect -----------------------------


def check_model(url):
    assert post(url, "/v1/chat/completions", messages=HI, model="gpt-4o").status_code == 404
    assert chat(url, max_tokens=2)["model"] == MODEL


def check_messages(url, reference):
    """Assistant tool calls and tool results reach the template (none is dropped)."""
    history = [
        *HI,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ]
    got = chat(url, messages=history, tools=TOOLS, tool_choice="none", max_tokens=2)
    template_view = [
        *HI,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ]
    expected = reference.encode_chat(template_view, TOOLS)
    assert got["usage"]["prompt_tokens"] == len(expected)
    assert "<tool_response>" in reference.render_chat(template_view, TOOLS)


def check_tools(url, reference):
    with_tools = chat(url, tools=TOOLS, tool_choice="none", max_tokens=2)
    assert with_tools["usage"]["prompt_tokens"] == len(reference.encode_chat(HI, TOOLS))
    assert chat(url, max_tokens=2)["usage"]["prompt_tokens"] == len(reference.encode_chat(HI))


def check_tool_choice(url, reference):
    """none: no calls read; auto: the answer is read for calls (this random model writes
    none, so content and stop/length); named and required force a call, and a model that
    does not make it is an error, never a silent content answer."""
    for choice in ("none", "auto"):
        answer = chat(url, tools=TOOLS, tool_choice=choice, max_tokens=4, temperature=0)
        assert answer["choices"][0]["finish_reason"] in ("stop", "length")
        assert "tool_calls" not in answer["choices"][0]["message"]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        response = post(
            url,
            "/v1/chat/completions",
            messages=HI,
            tools=TOOLS,
            tool_choice=choice,
            max_tokens=4,
            temperature=0,
        )
        assert response.status_code == 500, response.text
        assert response.json()["error"]["code"] == "tool_call_not_produced"
    streamed = sse(
        url,
        "/v1/chat/completions",
        messages=HI,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=4,
        temperature=0,
    )
    assert streamed[-1]["error"]["code"] == "tool_call_not_produced"  # after the 200
    assert not any(
        c.get("choices") and c["choices"][0]["delta"].get("content") for c in streamed
    )  # no silent content answer either
    unknown = post(
        url,
        "/v1/chat/completions",
        messages=HI,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "nope"}},
    )
    assert (unknown.status_code, unknown.json()["error"]["param"]) == (400, "tool_choice")


def check_parallel_tool_calls(url, reference):
    # Its effect (one call at most) is on parsed calls, which this random model never
    # writes: test_tool_calls.py::test_parallel_tool_calls_false_keeps_the_first_call.
    assert chat(url, tools=TOOLS, parallel_tool_calls=False, max_tokens=2)["choices"]
    bad = post(url, "/v1/chat/completions", messages=HI, parallel_tool_calls="maybe")
    assert (bad.status_code, bad.json()["error"]["param"]) == (400, "parallel_tool_calls")


def check_length(field):
    def check(url, reference=None, complete_=False):
        call = complete if complete_ else chat
        got = call(url, **{field: 5}, ignore_eos=True)
        assert got["usage"]["completion_tokens"] == 5
        body = {"prompt": "Once"} if complete_ else {"messages": HI}
        path = "/v1/completions" if complete_ else "/v1/chat/completions"
        beyond = post(url, path, **body, **{field: CONTEXT})  # prompt + CONTEXT > CONTEXT
        assert beyond.status_code == 400
        assert (beyond.json()["error"]["param"], beyond.json()["error"]["code"]) == (
            field,
            "context_length_exceeded",
        )

    return check


def check_sampling(call):
    """temperature, top_p and seed, each by its effect on drawn text."""

    def texts(**kw):
        return [text_of(call(**kw, max_tokens=12, ignore_eos=True, seed=s)) for s in (1, 2, 3)]

    greedy = texts(temperature=0)
    assert len(set(greedy)) == 1  # temperature 0: the seed does not matter
    assert len(set(texts(temperature=1.5))) > 1  # temperature > 0: it does
    assert texts(temperature=1.5, top_p=1e-9) == greedy  # a tiny nucleus is the top token
    again = [
        text_of(call(temperature=1.5, max_tokens=12, ignore_eos=True, seed=s)) for s in (1, 2, 3)
    ]
    assert again == texts(temperature=1.5)  # the same seed draws the same tokens


def check_stop(call):
    text = text_of(call(temperature=0, max_tokens=12, ignore_eos=True))
    cut = text[3:6]
    assert cut and text.index(cut) > 0
    stopped = call(temperature=0, max_tokens=12, ignore_eos=True, stop=[cut])
    assert text_of(stopped) == text[: text.index(cut)]
    assert stopped["choices"][0]["finish_reason"] == "stop"


def check_stream(url, path, **body):
    chunks = sse(url, path, **body, max_tokens=3)
    assert all(not c.get("usage") for c in chunks)
    with_usage = sse(url, path, **body, max_tokens=3, stream_options={"include_usage": True})
    assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"]["completion_tokens"]
    no_stream = post(url, path, **body, stream_options={"include_usage": True})
    assert (no_stream.status_code, no_stream.json()["error"]["param"]) == (400, "stream_options")


def check_user(call):
    first = call(user="field-user", max_tokens=2)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    again = call(user="field-user", max_tokens=2)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def check_completion_prompt(url):
    longer = complete(url, prompt="Once upon a time", max_tokens=1)["usage"]["prompt_tokens"]
    assert longer > complete(url, prompt="Once", max_tokens=1)["usage"]["prompt_tokens"]


def check_completion_model(url):
    assert post(url, "/v1/completions", prompt="x", model="gpt-4o").status_code == 404


# (fields, check): one check may observe several fields (a seed matters only when sampling)
CHAT_CHECKS = {
    "model": (("model",), lambda url, ref: check_model(url)),
    "history": (("messages",), check_messages),
    "tools": (("tools",), check_tools),
    "tool_choice": (("tool_choice",), check_tool_choice),
    "parallel": (("parallel_tool_calls",), check_parallel_tool_calls),
    "max_tokens": (("max_tokens",), check_length("max_tokens")),
    "max_completion_tokens": (("max_completion_tokens",), check_length("max_completion_tokens")),
    "sampling": (
        ("temperature", "top_p", "seed"),
        lambda url, ref: check_sampling(lambda **kw: chat(url, **kw)),
    ),
    "stop": (("stop",), lambda url, ref: check_stop(lambda **kw: chat(url, **kw))),
    "stream": (
        ("stream", "stream_options"),
        lambda url, ref: check_stream(url, "/v1/chat/completions", messages=HI),
    ),
    "user": (("user",), lambda url, ref: check_user(lambda **kw: chat(url, **kw))),
}
COMPLETION_CHECKS = {
    "model": (("model",), check_completion_model),
    "prompt": (("prompt",), check_completion_prompt),
    "max_tokens": (("max_tokens",), lambda url: check_length("max_tokens")(url, complete_=True)),
    "sampling": (
        ("temperature", "top_p", "seed"),
        lambda url: check_sampling(lambda **kw: complete(url, **kw)),
    ),
    "stop": (("stop",), lambda url: check_stop(lambda **kw: complete(url, **kw))),
    "stream": (
        ("stream", "stream_options"),
        lambda url: check_stream(url, "/v1/completions", prompt="Once"),
    ),
    "user": (("user",), lambda url: check_user(lambda **kw: complete(url, **kw))),
}
CHAT_HONOURED = {f for fields, _ in CHAT_CHECKS.values() for f in fields}
COMPLETION_HONOURED = {f for fields, _ in COMPLETION_CHECKS.values() for f in fields}


@pytest.mark.parametrize("check", sorted(CHAT_CHECKS))
def test_honoured_chat_fields_have_their_effect(url, reference, check):
    CHAT_CHECKS[check][1](url, reference)


@pytest.mark.parametrize("check", sorted(COMPLETION_CHECKS))
def test_honoured_completion_fields_have_their_effect(url, check):
    COMPLETION_CHECKS[check][1](url)


def test_a_model_is_found_by_its_id_and_an_unknown_id_is_an_openai_404(url):
    card = httpx.get(f"{url}/v1/models/{MODEL}", timeout=30).json()
    assert card == {
        "id": MODEL,
        "object": "model",
        "created": 0,
        "owned_by": "grace-serve",
        "max_model_len": CONTEXT,
    }
    long_id = "x" * 5000
    missing = httpx.get(f"{url}/v1/models/org/{long_id}", timeout=30)
    assert missing.status_code == 404
    error = missing.json()["error"]
    assert error["code"] == "model_not_found" and long_id not in error["message"]


def test_only_a_length_the_client_set_is_held_to_the_context():
    from deployments.protocol import ChatCompletionRequest, CompletionRequest

    def param(cls, **body):
        return cls.model_validate({"model": MODEL, **body}).token_limit_param

    assert param(CompletionRequest, prompt="x") is None  # OpenAI's default 16: cut to fit
    assert param(CompletionRequest, prompt="x", max_tokens=None) is None
    assert param(CompletionRequest, prompt="x", max_tokens=9) == "max_tokens"
    assert param(ChatCompletionRequest, messages=HI) is None
    assert (
        param(ChatCompletionRequest, messages=HI, max_tokens=9, max_completion_tokens=9)
        == "max_completion_tokens"
    )


def test_stream_obfuscation_is_refused_by_its_nested_name():
    from pydantic import ValidationError

    from deployments.errors import validation_error
    from deployments.protocol import ChatCompletionRequest

    body = {
        "model": MODEL,
        "messages": HI,
        "stream": True,
        "stream_options": {"include_usage": True, "include_obfuscation": True},
    }
    with pytest.raises(ValidationError) as err:
        ChatCompletionRequest.model_validate(body)
    error = validation_error(list(err.value.errors())).body["error"]
    assert (error["param"], error["code"]) == (
        "stream_options.include_obfuscation",
        "unsupported_parameter",
    )
    body["stream_options"]["include_obfuscation"] = False
    assert ChatCompletionRequest.model_validate(body).include_usage
