"""A model's files on local disk: a hub id resolved through the Hugging Face cache.

`resolve_model_dir` turns the configured `model.model_id` into a directory: a local directory is
itself, `builtin:tiny-llama` is built on first use (deployments/engine/builtin.py), and anything
else is a hub id fetched with huggingface_hub's `snapshot_download` into the standard cache
(HF_HOME / HF_HUB_CACHE, read when called), or found there when HF_HUB_OFFLINE is set. With
`weights=False` only the small files that describe the model and its tokenizer are fetched, so
the HTTP ingress can tokenize without downloading (or importing anything to read) weights.

Never imports torch or transformers.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

# Config, tokenizer and chat-template files: all that tokenizing and sizing a model needs.
METADATA_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates/*.jinja",
]
# With weights: slow-tokenizer sources (for transformers when a repo has no tokenizer.json),
# remote code (trust_remote_code) and safetensors. Repos' `original/` copies are not matched.
WEIGHT_FILES = [
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "*.tiktoken",
    "*.py",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
]
# Only for repos without safetensors (the generic engine reads these; the paged one cannot).
PICKLE_WEIGHT_FILES = ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"]
WEIGHT_INDEXES = ["model.safetensors.index.json", "pytorch_model.bin.index.json"]
SINGLE_WEIGHTS = ["model.safetensors", "pytorch_model.bin"]
_TRUE = {"1", "ON", "YES", "TRUE"}


class ModelNotFound(Exception):
    """The configured model cannot be found; the message says why and what to do.

    `reason` is one of: "local" (no such directory), "missing" (no such hub repo, or private
    without access), "gated", "unauthorized", "revision", "offline" (not in the local cache and
    the hub may not or cannot be asked), "incomplete" (the cached snapshot lacks files).
    """

    def __init__(self, model_id: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.model_id = model_id
        self.reason = reason


def hub_cache_dir() -> str:
    """The hub cache huggingface_hub would use, from the environment as it is now."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return os.path.expanduser(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    home = os.environ.get("HF_HOME", os.path.join(xdg, "huggingface"))
    return os.path.join(os.path.expanduser(home), "hub")


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) forbids asking the hub."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in _TRUE


def looks_like_path(model_id: str) -> bool:
    """A local path rather than a hub id (`org/name` or `name`)."""
    return model_id.startswith(("/", ".", "~")) or model_id.count("/") > 1


def resolve_model_dir(model_id: str, revision: str | None = None, weights: bool = True) -> str:
    """A local directory holding `model_id`'s files (its weights too unless `weights=False`).

    Raises `ModelNotFound` with a message naming the model, why it was not found, and what to
    do about it.
    """
    from deployments.engine import builtin  # torch-free; builds only what is asked for

    if builtin.is_builtin(model_id):
        return str(builtin.materialize(model_id, weights=weights))
    if os.path.isdir(os.path.expanduser(model_id)):
        return os.path.abspath(os.path.expanduser(model_id))
    if looks_like_path(model_id):
        raise ModelNotFound(
            model_id,
            "local",
            f"model {model_id!r}: no such directory (it is "
            "not a hub id either, which is `org/name`)",
        )
    path = _download(
        model_id, revision, METADATA_FILES + WEIGHT_FILES if weights else METADATA_FILES
    )
    if weights and not any((Path(path) / f).exists() for f in WEIGHT_INDEXES + SINGLE_WEIGHTS):
        path = _download(model_id, revision, METADATA_FILES + PICKLE_WEIGHT_FILES)
    check_snapshot(model_id, Path(path), weights)
    logger.info("model %s (revision %s) is in %s", model_id, revision or "main", path)
    return path


def _download(model_id: str, revision: str | None, patterns: list[str]) -> str:
    """`snapshot_download` of the files matching `patterns`, its errors as ModelNotFound."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache, offline = hub_cache_dir(), hub_offline()
    try:
        return snapshot_download(
            model_id,
            revision=revision,
            cache_dir=cache,
            local_files_only=offline,
            allow_patterns=patterns,
        )
    except GatedRepoError as exc:  # before RepositoryNotFoundError: it is a subclass
        raise ModelNotFound(
            model_id,
            "gated",
            f"model {model_id!r} is gated on the Hugging Face "
            f"hub: accept its terms at https://huggingface.co/{model_id} and set "
            "HF_TOKEN to a token of that account",
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelNotFound(
            model_id,
            "missing",
            f"model {model_id!r} is not on the Hugging Face "
            "hub, or it is private and HF_TOKEN gives no access to it: check the "
            "id, or set HF_TOKEN",
        ) from exc
    except RevisionNotFoundError as exc:
        raise ModelNotFound(
            model_id,
            "revision",
            f"model {model_id!r} has no revision "
            f"{revision!r} on the hub: use a branch, tag or commit it has",
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise ModelNotFound(
            model_id, "offline", _offline_message(model_id, revision, cache, offline, exc)
        ) from exc
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise ModelNotFound(
                model_id,
                "unauthorized",
                f"the hub refused access to model "
                f"{model_id!r} (HTTP {status}): set HF_TOKEN to a token that "
                "may read it",
            ) from exc
        raise


def _offline_message(
    model_id: str, revision: str | None, cache: str, offline: bool, exc: Exception
) -> str:
    where = f"model {model_id!r} (revision {revision or 'main'}) is not in the hub cache {cache}"
    why = (
        "and HF_HUB_OFFLINE forbids asking the hub"
        if offline
        else f"and the hub could not be reached ({type(exc).__name__})"
    )
    return (
        f"{where} {why}: download it where the hub is reachable (`hf download {model_id}`"
        f"{f' --revision {revision}' if revision else ''} with HF_HOME or HF_HUB_CACHE "
        "pointing at this cache), or unset HF_HUB_OFFLINE"
    )


def check_snapshot(model_id: str, root: Path, weights: bool) -> None:
    """Raise ModelNotFound("incomplete") if a hub snapshot lacks the files loading needs."""
    missing = [] if (root / "config.json").exists() else ["config.json"]
    if weights:
        for index in WEIGHT_INDEXES:
            if (root / index).exists():
                shards = set(json.loads((root / index).read_text())["weight_map"].values())
                missing += sorted(s for s in shards if not (root / s).exists())
                break
        else:
            if not any((root / f).exists() for f in SINGLE_WEIGHTS):
                missing.append("model.safetensors (or a sharded index)")
    if missing:
        raise ModelNotFound(
            model_id,
            "incomplete",
            f"the cached snapshot of model {model_id!r} "
            f"in {root} lacks {', '.join(missing[:4])}: download it again where "
            f"the hub is reachable (`hf download {model_id}`)",
        )
