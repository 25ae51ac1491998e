"""The serving benchmark's parts without a GPU: configs, workloads, client, figures, headlines.

The whole script runs on CPU with `python -m benchmarks.serve_bench --quick` (about a minute
and a half here, Ray and `serve run` included); these tests check its pieces quickly.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from ray.serve.schema import ServeDeploySchema

from benchmarks.serve.http_client import HTTPTransport, SSEParser, new_session, request_body
from benchmarks.serve.metrics import changes, percentile, summarize
from benchmarks.serve.report import TARGETS, headlines
from benchmarks.serve.sessions import SAMPLED, Call, Reply, run_sessions
from benchmarks.serve.workloads import FULL, QUICK_PLAN, kv_expectation, sessions_for, steps
from deployments.app import build_app
from deployments.config import parse_app_args

CONFIGS = Path(__file__).resolve().parents[2] / "benchmarks" / "configs"
VISIBLE = list(range(10, 2048))


@pytest.mark.parametrize("name", ["serve-llama-8b.yaml", "serve-quick.yaml"])
def test_configs_validate_and_admit_256_streams(name):
    raw = yaml.safe_load((CONFIGS / name).read_text())
    ServeDeploySchema.model_validate(raw)
    app = raw["applications"][0]
    args = parse_app_args(app["args"])
    build_app(args)
    assert args.replica.num_replicas == 1 and args.engine.random_weights
    assert args.engine.max_num_seqs >= 256
    assert args.replica.max_ongoing_requests > 256 and args.ingress.max_ongoing_requests > 256
    assert Path(args.model.model_id).is_absolute() and args.model.served_model_name
    assert "request_router_config" in app["deployments"][0]


def test_gpu_config_is_one_managed_replica_whose_kv_budget_holds_the_kept_users():
    args = parse_app_args(
        yaml.safe_load((CONFIGS / "serve-llama-8b.yaml").read_text())["applications"][0]["args"]
    )
    assert args.memory.mode == "managed" and args.replica.num_gpus == 1
    expect = kv_expectation(FULL, 128 << 10, args.engine.page_size, int(args.kv_cache.budget_bytes))
    assert expect["fits"] and expect["share_of_budget"] < 0.85


def test_multi_turn_users_have_six_turns_and_some_histories_pass_8k():
    users = sessions_for(steps(FULL)[-1], FULL)
    assert len(users) == 256 and all(len(u.message_tokens) >= 6 for u in users)
    assert sum(u.final_tokens() > 8192 for u in users) >= 8
    assert all(0 <= u.start_delay_s < FULL.ramp_s for u in users)


def test_steps_warm_up_every_fixed_setting_and_cover_both_samplings():
    names = [s.name for s in steps(FULL)]
    for c in FULL.concurrency:
        for sampling in ("sampled", "greedy"):
            i = names.index(f"fixed-c{c}-{sampling}")
            assert names[i - 1] == f"fixed-c{c}-{sampling}-warmup"
    assert names[-2:] == ["returning", "multi_turn"]
    returning = sessions_for(steps(FULL)[-2], FULL)[0]
    assert len(returning.added_tokens) == 50 and len(set(returning.added_tokens)) > 20
    assert all(40 <= n <= 90 for n in returning.added_tokens)


class FakeTransport:
    """Answers every call with `reply_words` words, one chunk each; records the calls."""

    def __init__(self, reply_words: int = 3, cached: int = 0) -> None:
        self.calls: list[Call] = []
        self.reply_words, self.cached = reply_words, cached

    async def __call__(self, call: Call) -> Reply:
        self.calls.append(call)
        text = " ".join(["w"] * self.reply_words)
        prompt = (
            sum(len(m["content"].split()) for m in call.messages)
            if call.messages
            else len(call.prompt.split())
        )
        return Reply(
            start=0.0,
            end=1.0,
            chunk_t=[0.1, 0.2, 0.3],
            chunk_n=[1, 1, 1],
            text=text,
            prompt_tokens=prompt,
            completion_tokens=self.reply_words,
            cached_tokens=self.cached,
        )


def test_chat_user_sends_its_growing_conversation_and_counts_what_was_held():
    user = sessions_for(steps(QUICK_PLAN)[-1], QUICK_PLAN)[0]
    user.think_s = [0.0] * len(user.think_s)
    user.start_delay_s = 0.0
    send = FakeTransport()
    records = asyncio.run(run_sessions([user], send, VISIBLE, stop_at=float("inf")))
    assert len(records) == len(send.calls) == QUICK_PLAN.turns
    for turn, call in enumerate(send.calls):
        assert [m["role"] for m in call.messages] == ["user", "assistant"] * turn + ["user"]
        assert len(call.messages[-1]["content"].split()) == user.message_tokens[turn]
        assert call.user == user.name and call.max_tokens == user.reply_tokens[turn]
    assert records[0]["held_tokens"] == 0
    assert records[1]["held_tokens"] == records[0]["prompt_tokens"] + 3


def test_returning_user_prompt_is_the_last_prompt_its_reply_and_new_words():
    user = sessions_for(steps(QUICK_PLAN)[-2], QUICK_PLAN)[0]
    user.think_s = 0.0
    send = FakeTransport(reply_words=2)
    records = asyncio.run(run_sessions([user], send, VISIBLE, stop_at=float("inf")))
    prompts = [c.prompt for c in send.calls]
    assert len(prompts[0].split()) == QUICK_PLAN.history_tokens
    for i in range(1, len(prompts)):
        assert prompts[i].startswith(prompts[i - 1] + " w w ")
        assert len(prompts[i].split()) == len(prompts[i - 1].split()) + 2 + user.added_tokens[i - 1]
    assert [r["measured"] for r in records] == [False] + [True] * QUICK_PLAN.returns


def test_sessions_are_the_same_in_every_process_and_stop_at_the_cap():
    step = steps(QUICK_PLAN)[1]
    a, b = FakeTransport(), FakeTransport()
    asyncio.run(run_sessions(sessions_for(step, QUICK_PLAN), a, VISIBLE, float("inf")))
    asyncio.run(run_sessions(sessions_for(step, QUICK_PLAN), b, VISIBLE, float("inf")))
    assert [c.prompt for c in a.calls] == [c.prompt for c in b.calls]
    assert all(len(c.prompt.split()) == QUICK_PLAN.prompt_tokens for c in a.calls)
    late = FakeTransport()
    assert asyncio.run(run_sessions(sessions_for(step, QUICK_PLAN), late, VISIBLE, 0.0)) == []


def test_sse_parser_handles_split_reads_crlf_and_several_events_a_read():
    parser = SSEParser()
    assert parser.feed(b'data: {"a":') == []
    assert parser.feed(b' 1}\r\n\r\ndata: {"b": 2}\n\ndata: [DO') == ['{"a": 1}', '{"b": 2}']
    assert parser.feed(b"NE]\n\n: comment\n\n") == ["[DONE]"]


def test_request_body_asks_for_exact_lengths_and_usage():
    body = request_body(Call(8, SAMPLED, prompt="a b"), "m")
    assert body["ignore_eos"] is True and body["min_tokens"] == 8
    assert body["stream_options"] == {"include_usage": True} and body["top_p"] == 0.95


def test_http_transport_times_content_chunks_and_reads_usage():
    """Against a small aiohttp server streaming OpenAI-shaped completion chunks."""

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        assert request.headers["X-User-Id"] == "u1" and body["stream"]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        # One event, then two events in one write (one delivery), then a finish chunk.
        for texts in (["a"], [" b", " c"], [""]):
            chunks = [{"choices": [{"index": 0, "text": t, "finish_reason": None}]} for t in texts]
            await response.write("".join(f"data: {json.dumps(c)}\n\n" for c in chunks).encode())
            await asyncio.sleep(0.02)
        usage = {
            "prompt_tokens": 5,
            "completion_tokens": 3,
            "total_tokens": 8,
            "prompt_tokens_details": {"cached_tokens": 4},
        }
        await response.write(
            f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode()
        )
        return response

    async def run() -> Reply:
        app = web.Application()
        app.router.add_post("/v1/completions", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            async with new_session() as session:
                send = HTTPTransport(session, f"http://127.0.0.1:{port}", "m")
                return await send(Call(3, SAMPLED, prompt="x y", user="u1"))
        finally:
            await runner.cleanup()

    reply = asyncio.run(run())
    assert reply.error is None and reply.text == "a b c" and reply.chunk_n == [1, 2]
    assert reply.chunk_t[1] - reply.chunk_t[0] >= 0.015
    assert (reply.prompt_tokens, reply.completion_tokens, reply.cached_tokens) == (5, 3, 4)


def record(start: float, times: list[float], n: list[int], **extra) -> dict:
    return {
        "session": "s",
        "turn": 0,
        "measured": True,
        "max_tokens": sum(n),
        "held_tokens": 0,
        "start": start,
        "end": start + times[-1],
        "chunk_t": times,
        "chunk_n": n,
        "prompt_tokens": 10,
        "completion_tokens": sum(n),
        "cached_tokens": 0,
        "error": None,
        **extra,
    }


def test_summary_definitions():
    records = [
        record(0.0, [0.1, 0.2, 0.4], [1, 1, 2]),
        record(0.5, [0.3, 0.4, 0.5], [1, 1, 1], turn=1, held_tokens=20, cached_tokens=19),
        record(0.0, [9.0], [1], measured=False),
    ]
    row = summarize(records, "multi_turn")
    assert row["requests"] == 2 and row["output_tokens"] == 7 and row["seconds"] == 1.0
    assert row["output_tokens_per_s"] == 7.0
    assert row["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert row["itl_ms"]["p50"] == pytest.approx(100.0)  # gaps 0.1, 0.2, 0.1, 0.1
    assert row["tokens_per_chunk"] == {"mean": round(7 / 6, 3), "max": 2}
    assert row["cache"]["cached_share"] == 0.95 and row["cache"]["returning_turns"] == 1
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([], 50) is None


def test_changes_reports_moved_numbers_only():
    before = {"a": 1, "b": "x", "c": {"d": 2.0, "e": 1}, "as_of": 1.0, "f": True}
    after = {"a": 3, "b": "y", "c": {"d": 2.5, "e": 1}, "as_of": 9.0, "f": False}
    assert changes(before, after) == {"a": 2, "c": {"d": 0.5}}


def _row(side: str, step: str, **figures) -> dict:
    base = {
        "side": side,
        "step": step,
        "warmup": False,
        "requests": 10,
        "output_tokens_per_s": 100.0,
        "ttft_ms": {"p50": 20.0, "p99": 30.0},
        "itl_ms": {"p50": 5.0, "p99": 9.0},
    }
    return {**base, **figures}


def test_headlines_are_ratios_between_the_two_sides_of_one_step():
    cache = {"cached_share": 0.97, "returning_ttft_ms": {"p50": 20.0, "p99": 40.0}}
    rows = [
        _row("in_process", "fixed-c64-sampled", decode_step_ms=10.0, step_over_floor=1.2),
        _row("http", "fixed-c64-sampled", output_tokens_per_s=95.0),
        _row("in_process", "fixed-c1-greedy", decode_step_ms=4.9),
        _row(
            "http",
            "fixed-c1-greedy",
            ttft_ms={"p50": 24.0, "p99": 30.0},
            client={"client_kept_up": True},
        ),
        _row("in_process", "returning", cache={**cache, "returning_ttft_ms": {"p50": 18.0}}),
        _row("http", "returning", cache=cache),
        _row("http", "multi_turn", cache=cache),
        _row("in_process", "multi_turn", cache=cache),
    ]
    head = headlines(rows)
    assert head["c64_sampled_tokens_per_s_http_over_in_process"] == 0.95
    assert head["c1_greedy_itl_p50_over_in_process_step"] == pytest.approx(5.0 / 4.9, 1e-3)
    assert head["c1_greedy_ttft_p50_minus_in_process_ms"] == 4.0
    assert head["returning_ttft_p50_minus_in_process_ms"] == 2.0
    assert head["returning_ttft_p99_over_p50"] == 2.0
    assert head["decode_b64_sampled_step_over_floor"] == 1.2
    met = head["targets_met"]
    assert met["c64_sampled_tokens_per_s_http_over_in_process"] is True
    assert met["returning_ttft_p99_over_p50"] is False and met["multi_turn_cached_share"]
    assert set(met) | set(head["targets_not_measured"]) == set(TARGETS)
    assert head["client_kept_up_in_every_step"] is True


def test_server_timing_parses_and_splits_the_first_token():
    from benchmarks.serve.http_client import parse_server_timing
    from benchmarks.serve.metrics import first_token_breakdown

    timing = parse_server_timing("prepare;dur=1.50, upstream;dur=20.00, replica;dur=16.0, x;desc=a")
    assert timing == {"prepare": 1.5, "upstream": 20.0, "replica": 16.0}
    record = {"error": None, "chunk_t": [0.030, 0.035], "server_timing": timing}
    parts = first_token_breakdown([record])
    assert parts["prepare"]["p50"] == 1.5 and parts["replica"]["p50"] == 16.0
    assert parts["transport"]["p50"] == 4.0  # upstream - replica
    assert parts["proxy"]["p50"] == 8.5  # TTFT 30 ms - prepare - upstream
    assert first_token_breakdown([{**record, "server_timing": {}}]) is None


def test_steps_are_chosen_by_name_or_by_a_names_start():
    from benchmarks.serve.workloads import FULL, steps

    every = [s.name for s in steps(FULL)]
    assert [s.name for s in steps(FULL, "fixed-c64,returning")] == [
        "fixed-c64-sampled-warmup",
        "fixed-c64-sampled",
        "fixed-c64-greedy-warmup",
        "fixed-c64-greedy",
        "returning",
    ]
    assert [s.name for s in steps(FULL, "fixed-c1-greedy")] == [
        "fixed-c1-greedy-warmup",
        "fixed-c1-greedy",
    ]  # a step brings its warm-up
    assert [s.name for s in steps(FULL, None)] == every
    with pytest.raises(ValueError, match="fixed-c6"):
        steps(FULL, "fixed-c6")  # a prefix only matches up to a dash: not fixed-c64


def test_direct_ingress_env_names_the_port_range():
    from deployments.direct_ingress import direct_ingress_env

    assert direct_ingress_env(range(30500, 30506)) == {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "30500",
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": "30506",
    }
    with pytest.raises(ValueError):
        direct_ingress_env(range(0))
