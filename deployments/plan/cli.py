"""`python -m deployments.plan`: plan a model's memory and decode floor on a node, offline.

Exit status: 0 when the model and the users fit, 1 when they do not (the plan is still
printed), 2 for a usage error (unknown preset, missing config file, context beyond the
model's maximum), with a message on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from pydantic import ByteSize, TypeAdapter, ValidationError

from deployments.capacity import DEFAULT_HEADROOM_BYTES
from deployments.config import KVCacheConfig
from deployments.plan.models import PRESETS, ModelError, resolve_model
from deployments.plan.nodes import NODES, NodeError, resolve_node
from deployments.plan.planner import plan
from deployments.plan.report import render, to_dict

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_BYTES = TypeAdapter(ByteSize)


def _bytes(text: str) -> int:
    try:
        return int(_BYTES.validate_python(text))
    except ValidationError:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 340GiB, 96GB)") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m deployments.plan",
        description="Where a model's weights and each user's KV cache go on a node, how many "
        "users fit, and the decode-step floor from the memory tiers' bandwidths.",
    )
    p.add_argument(
        "--model",
        required=True,
        help=f"preset ({', '.join(PRESETS)}) or a local Hugging Face config.json "
        "(or its directory)",
    )
    p.add_argument("--node", required=True, help=f"preset: {', '.join(NODES)}")
    p.add_argument(
        "--context",
        required=True,
        type=int,
        metavar="TOKENS",
        help="tokens of context per user (prompt and reply so far)",
    )
    p.add_argument(
        "--users",
        type=int,
        metavar="N",
        help="users decoding together; default: as many as the KV budget holds",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPE_BYTES,
        default="bfloat16",
        help="weights and KV cache (default bfloat16)",
    )
    p.add_argument(
        "--host-budget",
        type=_bytes,
        metavar="BYTES",
        help="host memory a replica may use (memory.host_memory_budget_bytes); "
        "default: 90%% of the node's host memory per replica",
    )
    p.add_argument(
        "--headroom",
        type=_bytes,
        default=DEFAULT_HEADROOM_BYTES,
        metavar="BYTES",
        help="HBM kept free of weights and KV (default 2GiB, as memory.headroom_bytes)",
    )
    p.add_argument(
        "--kv-budget",
        type=_bytes,
        metavar="BYTES",
        help="the replica's KV budget (kv_cache.budget_bytes); default: "
        "kv_cache.budget_fraction of the room left after the weights",
    )
    p.add_argument("--json", action="store_true", help="print a JSON document instead")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        model = resolve_model(args.model)
        node = resolve_node(args.node)
        if args.users is not None and args.users <= 0:
            raise ValueError(f"--users must be positive, not {args.users}")
        result = plan(
            model,
            node,
            args.context,
            dtype=args.dtype,
            dtype_bytes=DTYPE_BYTES[args.dtype],
            users=args.users,
            host_budget=args.host_budget,
            headroom=args.headroom,
            kv_budget=args.kv_budget,
            kv_budget_fraction=KVCacheConfig().budget_fraction,
        )
    except (ModelError, NodeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    doc = to_dict(result)
    try:
        print(json.dumps(doc, indent=2) if args.json else render(result), flush=True)
    except BrokenPipeError:  # `... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0 if doc["fits"] else 1
