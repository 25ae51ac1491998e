"""Tool calls read from model output, in the formats the real Llama 3.1 and Qwen2.5 Instruct
chat templates write (tests/cpu/templates/*_instruct.jinja, as the hub ships them).

The reference for each answer is the template itself: an assistant turn with `tool_calls` is
rendered by the model's real template, and the parser must recover exactly those calls from
that text, whole or cut into random stream pieces; streamed deltas, put together as an OpenAI
client does, must equal the collected answer.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from deployments import chat_template
from deployments.errors import APIError
from deployments.protocol import ChatCompletionRequest
from deployments.streaming import chat_events, collect
from deployments.tool_calls import ToolCallStream, detect_parser, parse_llama3_json
from deployments.tool_choice import plan_tools, tool_events

TEMPLATES = Path(__file__).parent / "templates"
LLAMA = (TEMPLATES / "llama31_instruct.jinja").read_text(encoding="utf-8")
QWEN = (TEMPLATES / "qwen25_instruct.jinja").read_text(encoding="utf-8")
WORDS = ["Paris", "unified memory", "ü", "日本", 'a "quote"', "back\\slash", "}{", "</x>"]


def random_arguments(rng: random.Random) -> dict:
    args = {}
    for i in range(rng.randint(0, 4)):
        value = rng.choice(
            [
                rng.choice(WORDS),
                rng.randint(-99, 99),
                rng.random() < 0.5,
                None,
                [rng.choice(WORDS), 1.5],
                {"k": rng.choice(WORDS)},
            ]
        )
        args[f"arg_{i}"] = value
    return args


def random_calls(rng: random.Random, n: int) -> list[dict]:
    return [
        {"name": rng.choice(["get_weather", "search", "sum_2"]), "arguments": random_arguments(rng)}
        for _ in range(n)
    ]


def rendered_answer(template: str, calls: list[dict], content: str = "") -> str:
    """The assistant turn the real template writes for `calls` (its text, no headers)."""
    history = [{"role": "user", "content": "hi"}]
    before = chat_template.render(
        template, history, add_generation_prompt=True, bos_token="<|begin_of_text|>"
    )
    turn = {
        "role": "assistant",
        "content": content,
        "tool_calls": [
            {"id": f"c{i}", "type": "function", "function": c} for i, c in enumerate(calls)
        ],
    }
    whole = chat_template.render(template, [*history, turn], bos_token="<|begin_of_text|>")
    assert whole.startswith(before)
    answer = whole[len(before) :]
    for end in ("<|im_end|>\n", "<|eot_id|>"):
        answer = answer.removesuffix(end)
    return answer


def as_reference(calls) -> list[tuple[str, dict]]:
    return [(c["name"], c["arguments"]) for c in calls]


def parsed(items) -> tuple[str, list[tuple[str, dict]]]:
    content = "".join(v for k, v in items if k == "content")
    calls = [(v.name, json.loads(v.arguments)) for k, v in items if k == "call"]
    return content, calls


def streamed(parser: str, text: str, rng: random.Random) -> list:
    stream, items, at = ToolCallStream(parser), [], 0
    while at < len(text):
        step = rng.randint(1, 7)
        items += stream.feed(text[at : at + step])
        at += step
    return items + stream.finish()


def test_templates_name_their_formats():
    assert detect_parser(QWEN) == "hermes"
    assert detect_parser(LLAMA) == "llama3_json"
    assert detect_parser("{% for m in messages %}{{ m.content }}{% endfor %}") is None


@pytest.mark.parametrize("seed", range(20))
def test_qwen_calls_written_by_its_template_parse_back_whole_and_streamed(seed):
    rng = random.Random(seed)
    calls = random_calls(rng, rng.randint(1, 3))
    content = rng.choice(["", "Let me check.", "Sure: <b>bold</b> < tag"])
    text = rendered_answer(QWEN, calls, content)
    assert "<tool_call>" in text
    for items in (streamed("hermes", text, rng), streamed("hermes", text, rng)):
        got_content, got_calls = parsed(items)
        assert got_calls == as_reference(calls)
        assert got_content.strip() == content


@pytest.mark.parametrize("seed", range(20))
def test_llama_calls_written_by_its_template_parse_back_whole_and_streamed(seed):
    rng = random.Random(seed)
    calls = random_calls(rng, 1)  # the template writes one call a turn
    text = rendered_answer(LLAMA, calls)
    assert parse_llama3_json(text) is not None
    assert parsed(streamed("llama3_json", text, rng)) == ("", as_reference(calls))


def test_llama_python_tag_and_semicolon_separated_calls():
    rng = random.Random(7)
    calls = random_calls(rng, 3)
    text = "<|python_tag|>" + "; ".join(
        json.dumps({"name": c["name"], "parameters": c["arguments"]}) for c in calls
    )
    assert [(c.name, json.loads(c.arguments)) for c in parse_llama3_json(text)] == as_reference(
        calls
    )


@pytest.mark.parametrize("parser", ["hermes", "llama3_json"])
def test_plain_answers_stay_content(parser):
    rng = random.Random(3)
    for text in [
        "Hello there.",
        "{not json",
        '{"a": 1}',
        "<tool_call>{bad}</tool_call> x",
        "  spaced  ",
        "<tool_c",
    ]:
        assert parsed(streamed(parser, text, rng)) == (text, []), text


# ---- through the replica's event stream --------------------------------------------------

TOOLS = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
    for n in ("get_weather", "search", "sum_2")
]


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, **fields}
    )


async def replica_events(text: str, rng: random.Random):
    """What a replica stream carries for an answer `text`, cut into random deltas."""
    pieces, at = [], 0
    while at < len(text):
        step = rng.randint(1, 9)
        pieces.append({"event": "delta", "text": text[at : at + step]})
        at += step
    end = {"event": "end", "finish_reason": "stop", "usage": {"completion_tokens": 3}}
    messages = [pieces[i : i + 3] for i in range(0, len(pieces), 3)]
    messages[-1:] = [messages[-1] + [end]] if messages else [[end]]
    for message in messages:
        yield message


def client_view(chunks: list[dict]) -> tuple[str, list[dict], str | None]:
    """The answer as an OpenAI client assembles streamed chunks: content concatenated, each
    tool call's pieces merged by index (arguments concatenated)."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice["delta"]
            content += delta.get("content") or ""
            for piece in delta.get("tool_calls", []):
                call = calls.setdefault(piece["index"], {"function": {"arguments": ""}})
                call.update({k: v for k, v in piece.items() if k in ("id", "type")})
                call["function"]["name"] = piece["function"].get(
                    "name", call["function"].get("name")
                )
                call["function"]["arguments"] += piece["function"].get("arguments", "")
            finish = choice["finish_reason"] or finish
    return content, [calls[i] for i in sorted(calls)], finish


async def both_ways(text: str, plan, seed: int):
    first = {"replica_id": "r"}
    answer = await collect(first, tool_events(replica_events(text, random.Random(seed)), plan))
    chunks = [
        c
        async for batch in chat_events(
            "m",
            tool_events(replica_events(text, random.Random(seed + 1)), plan),
            False,
            lambda reason: None,
        )
        for c in batch
    ]
    return answer, client_view(chunks)


@pytest.mark.parametrize("seed", range(10))
def test_auto_answers_collected_and_streamed_agree(seed):
    rng = random.Random(seed)
    calls = random_calls(rng, rng.randint(1, 3))
    plan = plan_tools(request(tool_choice="auto"), "hermes")
    answer, (content, streamed_calls, finish) = asyncio.run(
        both_ways(rendered_answer(QWEN, calls), plan, seed)
    )
    assert answer.finish_reason == finish == "tool_calls"
    assert answer.text.strip() == content.strip() == ""
    got = [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in answer.tool_calls
    ]
    assert got == as_reference(calls)
    assert [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in streamed_calls
    ] == got
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in streamed_calls)


def test_parallel_tool_calls_false_keeps_the_first_call():
    calls = random_calls(random.Random(1), 3)
    plan = plan_tools(request(parallel_tool_calls=False), "hermes")
    answer, _ = asyncio.run(both_ways(rendered_answer(QWEN, calls), plan, 0))
    assert [c["function"]["name"] for c in answer.tool_calls] == [calls[0]["name"]]


@pytest.mark.parametrize("parser", ["hermes", "llama3_json"])
def test_named_choice_continues_the_forced_opening(parser):
    """The prompt ends inside a call of the named function; the model writes its arguments."""
    choice = {"type": "function", "function": {"name": "search"}}
    plan = plan_tools(request(tool_choice=choice), parser)
    assert plan.forced.endswith(
        '"search", "arguments": ' if parser == "hermes" else '"search", "parameters": '
    )
    args = random_arguments(random.Random(5))
    rest = json.dumps(args) + ("}\n</tool_call>" if parser == "hermes" else "}")
    answer, _ = asyncio.run(both_ways(rest, plan, 0))
    assert [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in answer.tool_calls
    ] == [("search", args)]
    assert answer.finish_reason == "tool_calls"


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "search"}}]
)
def test_a_forced_call_the_model_does_not_make_is_an_error(choice):
    plan = plan_tools(request(tool_choice=choice), "hermes")
    for text in ["just chatting", 'nope", "arguments": {}}</tool_call>']:
        with pytest.raises(APIError) as err:
            asyncio.run(both_ways(text, plan, 0))
        assert err.value.body["error"]["code"] == "tool_call_not_produced"
    if choice == "required":  # a call of an undeclared function does not count either
        with pytest.raises(APIError):
            asyncio.run(both_ways('other", "arguments": {}}\n</tool_call>', plan, 0))


def test_tool_choice_none_reads_no_calls_and_a_model_without_a_format_refuses_auto():
    assert plan_tools(request(tool_choice="none"), "hermes") is None
    with pytest.raises(APIError) as err:
        plan_tools(request(tool_choice="auto"), None)
    assert err.value.status == 400
    assert err.value.body["error"]["param"] == "tool_choice"
    assert err.value.body["error"]["code"] == "unsupported_parameter"


# ---- the prompt: history turns, tools and the forced opening ------------------------------


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    from deployments.prompts import PromptBuilder
    from deployments.tokenizer import TextTokenizer
    from tests.cpu.chat_models import builtin_with_template

    root = builtin_with_template(tmp_path_factory.mktemp("llama") / "m", LLAMA)
    return PromptBuilder(TextTokenizer.load(root), 8, 64, detect_parser(LLAMA))


@pytest.mark.parametrize("seed", range(5))
def test_the_prompt_is_the_template_with_history_calls_and_the_forced_opening(builder, seed):
    rng = random.Random(seed)
    call = random_calls(rng, 1)[0]
    history = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": rng.choice(WORDS)},
        {"role": "user", "content": "and now?"},
    ]
    choice = {"type": "function", "function": {"name": "search"}}
    prepared = asyncio.run(builder.chat(request(messages=history, tool_choice=choice), None, 4096))
    view = [dict(m) for m in history]
    view[1] = {
        **view[1],
        "content": "",
        "tool_calls": [{"id": "c1", "type": "function", "function": call}],
    }
    text = builder.tokenizer.render_chat(view, TOOLS) + '{"name": "search", "parameters": '
    assert (
        list(prepared.payload["prompt_token_ids"])
        == builder.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    )
    assert prepared.tools.mode == "named"


def test_history_call_arguments_that_are_not_a_json_object_are_a_400(builder):
    history = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[1]"}}
            ],
        },
    ]
    with pytest.raises(APIError) as err:
        asyncio.run(builder.chat(request(messages=history), None, 4096))
    assert err.value.status == 400 and "arguments" in err.value.body["error"]["message"]
