"""The serving benchmark's model directory: a tokenizer that gives every id visible text.

Checked: it is written without torch or transformers; transformers' AutoTokenizer and a plain
`tokenizers.Tokenizer` both load it and cover the whole vocabulary; N words are N tokens; and
what our engine samples from a random model decodes to one word a token and encodes back to
the same ids.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench_model import (
    BOS,
    EOS,
    UNK,
    marker_ids,
    visible_ids,
    words,
    write_model_dir,
)
from benchmarks.engine_bench import LLAMA_31_8B, QUICK

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("bench") / "quick", QUICK)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("bench") / "llama-8b", LLAMA_31_8B)


def test_written_without_torch_or_transformers(tmp_path):
    code = (
        "import sys, json; from benchmarks.bench_model import write_model_dir; "
        f"write_model_dir({str(tmp_path / 'm')!r}, json.loads(sys.argv[1])); "
        "print(json.dumps(sorted(m for m in ('torch', 'transformers') if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(QUICK)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out) == []
    assert {p.name for p in (tmp_path / "m").iterdir()} == {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    }


def test_both_loaders_cover_the_whole_vocabulary(llama_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(llama_dir))
    raw = Tokenizer.from_file(str(llama_dir / "tokenizer.json"))
    vocab = LLAMA_31_8B["vocab_size"]
    assert len(auto) == vocab and raw.get_vocab_size() == vocab
    tokens = [raw.id_to_token(i) for i in range(vocab)]
    assert None not in tokens and len(set(tokens)) == vocab
    assert (auto.bos_token_id, auto.eos_token_id) == (
        LLAMA_31_8B["bos_token_id"],
        LLAMA_31_8B["eos_token_id"],
    )
    assert auto.unk_token == UNK and auto.chat_template and "\n" not in auto.chat_template
    # Only bos, eos and unknown decode to nothing; every other id is one visible word.
    special = {marker_ids(LLAMA_31_8B)[t] for t in (BOS, EOS, UNK)}
    assert set(auto.all_special_ids) == special
    assert len(visible_ids(LLAMA_31_8B)) == vocab - len(marker_ids(LLAMA_31_8B))


@pytest.mark.parametrize("n", [1, 7, 512, 8192])
def test_n_words_are_n_tokens(llama_dir, n):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ids = random.Random(n).choices(visible_ids(LLAMA_31_8B), k=n)
    text = words(ids)
    auto = AutoTokenizer.from_pretrained(str(llama_dir))
    assert auto(text, add_special_tokens=True)["input_ids"] == ids
    assert Tokenizer.from_file(str(llama_dir / "tokenizer.json")).encode(text).ids == ids
    assert auto.decode(ids) == text


def test_chat_template_marks_roles_and_keeps_contents(llama_dir):
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(llama_dir))
    a, b = visible_ids(LLAMA_31_8B)[10:12]
    messages = [
        {"role": "system", "content": words([a])},
        {"role": "user", "content": words([a, b])},
        {"role": "assistant", "content": words([b])},
    ]
    text = auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    m = marker_ids(LLAMA_31_8B)
    assert auto(text, add_special_tokens=False)["input_ids"] == [
        m[BOS],
        m["<|system|>"],
        a,
        m[EOS],
        m["<|user|>"],
        a,
        b,
        m[EOS],
        m["<|assistant|>"],
        b,
        m[EOS],
        m["<|assistant|>"],
    ]


def test_what_the_engine_samples_is_visible_and_encodes_back(quick_dir):
    """A random model sampled at temperature 1.0: each token's text delta is one word, and
    the whole text encodes to the sampled ids (bos/eos/unknown, should they be drawn,
    decode to nothing and are left out)."""
    from deployments.config import AppArgs
    from deployments.engine import GenerationRequest, SamplingParams, select_engine_class
    from deployments.memory import setup_memory
    from deployments.platform import detect_platform

    args = AppArgs.model_validate(
        {
            "model": {"model_id": str(quick_dir), "dtype": "float32", "max_model_len": 1024},
            "memory": {"cpu_memory_budget_bytes": "256MiB"},
            "kv_cache": {"budget_bytes": "4MiB"},
            "engine": {"random_weights": True, "max_batched_tokens": 256, "cpu_threads": 1},
        }
    )
    engine = select_engine_class(args)(
        args, setup_memory(args.memory, detect_platform(use_gpu=False))
    )
    from deployments.detokenizer import IncrementalDetokenizer
    from deployments.tokenizer import TextTokenizer

    tokenizer = TextTokenizer.load(str(quick_dir))  # as the ingress reads it
    prompt = tokenizer.encode_text(words(visible_ids(QUICK)[:64]))
    request = GenerationRequest("t", None, prompt, SamplingParams(96, temperature=1.0, seed=3))

    async def generate() -> list:
        try:
            return [t async for out in engine.generate(request) for t in out.token_ids]
        finally:
            await engine.shutdown()

    ids = asyncio.run(generate())
    special = {marker_ids(QUICK)[t] for t in (BOS, EOS, UNK)}
    assert len(ids) > 16
    detok, pieces = IncrementalDetokenizer(tokenizer), []
    for token in ids:  # the ingress's text, a token at a time
        piece = detok.push([token]).text
        if token not in special:
            assert len(piece.split()) == 1  # one visible word per token
        pieces.append(piece)
    text = "".join(pieces) + detok.flush()
    assert engine.tokenizer(text, add_special_tokens=False)["input_ids"] == [
        t for t in ids if t not in special
    ]
