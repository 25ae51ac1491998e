"""TextTokenizer gives what transformers' AutoTokenizer gives, without importing torch.

For the built-in tokenizer and for Llama-3.1- and Qwen2.5-style tokenizers built offline
(tests/cpu/chat_models.py), on fresh random texts and conversations with tools, tool calls and
tool results: the same token ids for text and chats, the same rendered chat, the same decode.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
from transformers import AutoTokenizer

from deployments.chat_template import ChatTemplateError
from deployments.engine import builtin_tokenizer
from deployments.tokenizer import TextTokenizer, TokenizerNotFound
from tests.cpu import chat_models

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=["builtin", "llama31", "qwen25", "qwen25-legacy"])
def pair(request, tmp_path_factory):
    """(TextTokenizer, AutoTokenizer) of one directory."""
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "builtin":
        builtin_tokenizer.write_tokenizer(root)
    elif request.param == "llama31":
        chat_models.llama31_dir(root)
    else:
        chat_models.qwen25_dir(root, legacy=request.param.endswith("legacy"))
    return request.param, TextTokenizer.load(root), AutoTokenizer.from_pretrained(root)


def hf_chat(auto, chat, tokenize, **kwargs):
    return auto.apply_chat_template(chat, tokenize=tokenize, return_dict=False, **kwargs)


def test_vocabulary_and_special_tokens_match(pair):
    _, ours, auto = pair
    assert ours.vocab_size == len(auto) == len(ours)
    assert ours.special_tokens == auto.special_tokens_map
    assert auto.eos_token_id in ours.eos_token_ids


def test_text_encodes_to_the_same_ids_with_special_tokens(pair):
    name, ours, auto = pair
    rng = random.Random(f"text-{name}")
    for _ in range(60):
        text = chat_models.random_text(rng, 80)
        assert ours.encode_text(text) == auto(text)["input_ids"], text
    if name == "llama31":  # its post-processor adds BOS
        assert ours.encode_text("hi")[0] == auto.bos_token_id


def test_decode_matches_with_and_without_special_tokens(pair):
    name, ours, auto = pair
    rng = random.Random(f"decode-{name}")
    for _ in range(60):
        ids = [rng.randrange(len(auto)) for _ in range(rng.randint(0, 40))]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == auto.decode(
                ids, skip_special_tokens=skip
            )


def test_random_conversations_render_and_encode_as_transformers_does(pair):
    name, ours, auto = pair
    rng = random.Random(f"chat-{name}")
    max_calls = 1 if name == "llama31" else 3  # Llama 3.1 takes one call per message
    for trial in range(40):
        chat = chat_models.random_chat(rng, max_calls)
        if name == "builtin":
            chat = [m for m in chat if "tool_calls" not in m and m["role"] != "tool"]
        tools = chat_models.random_tools(rng) if name != "builtin" and trial % 2 else None
        prompt = bool(trial % 3)
        extra = {"date_string": "02 Dec 2026"} if trial % 4 == 0 else {}
        want_text = hf_chat(auto, chat, False, tools=tools, add_generation_prompt=prompt, **extra)
        want_ids = hf_chat(auto, chat, True, tools=tools, add_generation_prompt=prompt, **extra)
        assert (
            ours.render_chat(chat, tools=tools, add_generation_prompt=prompt, **extra) == want_text
        )
        assert (
            ours.encode_chat(chat, tools=tools, add_generation_prompt=prompt, **extra) == want_ids
        )


def test_documents_and_template_variables_reach_the_template(tmp_path):
    root = chat_models.qwen25_dir(tmp_path / "q")
    ours, auto = TextTokenizer.load(root), AutoTokenizer.from_pretrained(root)
    chat = [{"role": "user", "content": "Summarise."}]
    docs = [{"title": "C2C", "text": "NVLink-C2C moves 900 GB/s."}, {"title": "é", "text": "…"}]
    text = ours.render_chat(chat, documents=docs)
    assert "## C2C\nNVLink-C2C moves 900 GB/s." in text
    assert text == hf_chat(auto, chat, False, documents=docs, add_generation_prompt=True)


def test_a_template_refusal_is_a_chat_template_error(tmp_path):
    root = chat_models.llama31_dir(tmp_path / "l")
    ours, auto = TextTokenizer.load(root), AutoTokenizer.from_pretrained(root)
    two_calls = [
        {"role": "user", "content": "x"},
        {
            "role": "assistant",
            "tool_calls": [
                {"function": {"name": "a", "arguments": {}}},
                {"function": {"name": "b", "arguments": {}}},
            ],
        },
    ]
    with pytest.raises(jinja2.TemplateError, match="single tool-calls"):
        hf_chat(auto, two_calls, False)
    with pytest.raises(ChatTemplateError, match="single tool-calls"):
        ours.render_chat(two_calls)
    with pytest.raises(ChatTemplateError, match="at least one message"):
        ours.encode_chat([])


BLOCKS_TEMPLATE = """{% for m in messages %}
    {% if m.role == 'user' %}
U: {{ m.content }}
    {% else %}
A: {{ m.content }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
A:
{% endif %}"""


def test_named_templates_pick_tool_use_when_tools_are_given(tmp_path):
    """Also: block tags on their own, indented lines vanish (trim_blocks, lstrip_blocks)."""
    root = tmp_path / "named"
    builtin_tokenizer.write_tokenizer(root)
    (root / "chat_template.jinja").write_text(BLOCKS_TEMPLATE)
    (root / "additional_chat_templates").mkdir()
    (root / "additional_chat_templates" / "tool_use.jinja").write_text(
        "TOOLS {{ tools | tojson }}{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    ours, auto = TextTokenizer.load(root), AutoTokenizer.from_pretrained(root)
    chat, tools = [{"role": "user", "content": "héllo"}], [{"name": "f", "d": "ü"}]
    want = hf_chat(auto, chat, False, tools=tools, add_generation_prompt=True)
    assert ours.render_chat(chat, tools=tools) == want == 'TOOLS [{"name": "f", "d": "ü"}]héllo'
    chat.append({"role": "assistant", "content": "ok"})
    want = hf_chat(auto, chat, False, add_generation_prompt=True)
    assert ours.render_chat(chat) == want == "U: héllo\nA: ok\nA:\n"


def test_without_a_chat_template_chats_render_as_the_engine_always_did(tmp_path):
    root = tmp_path / "plain"
    builtin_tokenizer.write_tokenizer(root)
    (root / "chat_template.jinja").unlink()
    ours = TextTokenizer.load(root)
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert ours.render_chat(chat) == "system: be brief\nuser: hi\nassistant:"
    assert (
        ours.encode_chat(chat)
        == ours.backend_tokenizer.encode(
            "system: be brief\nuser: hi\nassistant:", add_special_tokens=False
        ).ids
    )


def test_a_directory_without_tokenizer_json_says_a_fast_tokenizer_is_needed(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(
        TokenizerNotFound,
        match=r"no tokenizer\.json.*fast tokenizer.*"
        r"save_pretrained",
    ):
        TextTokenizer.load(tmp_path)


def test_builtin_tokenizer_files_are_what_save_pretrained_writes(tmp_path):
    from transformers import PreTrainedTokenizerFast

    ours = tmp_path / "ours"
    builtin_tokenizer.write_tokenizer(ours)
    reference = PreTrainedTokenizerFast(
        tokenizer_object=builtin_tokenizer.build_tokenizer(),
        chat_template=builtin_tokenizer.CHAT_TEMPLATE,
        bos_token=builtin_tokenizer.BOS_TOKEN,
        eos_token=builtin_tokenizer.EOS_TOKEN,
        pad_token=builtin_tokenizer.PAD_TOKEN,
        model_max_length=builtin_tokenizer.MODEL_MAX_LENGTH,
    )
    reference.save_pretrained(tmp_path / "ref")
    written = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert written == sorted(p.name for p in ours.iterdir())
    for name in written:
        assert (ours / name).read_text() == (tmp_path / "ref" / name).read_text(), name


def test_the_ingress_modules_run_without_torch_or_transformers(tmp_path):
    code = """
import sys
from deployments.model_files import resolve_model_dir
from deployments.tokenizer import TextTokenizer
from deployments.detokenizer import IncrementalDetokenizer
import deployments.logprob_format, deployments.streaming, deployments.text_stream
from deployments.token_bound import max_bytes_per_token
tok = TextTokenizer.load(resolve_model_dir("builtin:tiny-llama", weights=False))
assert max_bytes_per_token(tok.backend_tokenizer)
ids = tok.encode_chat([{"role": "user", "content": "héllo"}])
detok = IncrementalDetokenizer(tok, stop=["<|assistant|>"])
text = detok.push(ids).text + detok.flush()
assert "héllo" in text, text
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
assert not heavy, heavy
"""
    env = {**os.environ, "GRACE_SERVE_CACHE": str(tmp_path), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in next(tmp_path.glob("tiny-llama-*")).iterdir()) == [
        "chat_template.jinja",
        "tokenizer.json",
        "tokenizer_config.json",
    ]  # no weights built
