"""The application's arguments: what `serve run` passes as `args` to `build_app`.

Every field is described; a bad value raises `ConfigError`, whose message names the field by
its dotted path (for example ``memory.pool_size_bytes``). Byte sizes accept integers or strings
such as ``"8GiB"``. This module imports nothing else of ours.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, model_validator

GiB = 1 << 30
MiB = 1 << 20
# A moving user's cache is copied in chunks of this many bytes (cache_moves.chunk_bytes): at
# ~50 GB/s (PCIe pinned copies) 128 MiB is ~2.5 ms of device copy and ~5-10 ms of host copy,
# so a chunk's fixed costs (an event wait, a loop turn, a thread hand-off, one object-store
# put of ~0.1-0.3 ms) stay a few percent, while the pipeline's fill and drain (about one chunk
# at each end) cost ~10 ms of a 4 GiB move; its three staging slots are 384 MiB of pinned
# memory per replica.
MOVE_CHUNK_BYTES = 128 * MiB


class ConfigError(ValueError):
    """A bad application argument; the message names each offending field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class ModelConfig(_Section):
    model_id: str = Field(
        "builtin:tiny-llama",
        min_length=1,
        description="Hugging Face hub id, local directory, or `builtin:tiny-llama` (a small random "
        "Llama with a byte-level tokenizer, built offline and cached on disk).",
    )
    served_model_name: str | None = Field(
        None, description="Name clients pass as `model`; defaults to the last part of model_id."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype; `auto` is bfloat16 on a GPU and float32 on CPU."
    )
    max_model_len: int | None = Field(
        None, gt=0, description="Longest conversation in tokens; defaults to the model's limit."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub.")
    tool_call_parser: Literal["auto", "hermes", "llama3_json", "none"] = Field(
        "auto",
        description="How tool calls are read from the model's output (vLLM's parser names): "
        "`hermes` for `<tool_call>{...}</tool_call>` (Qwen2/2.5/3, Hermes), `llama3_json` for "
        'Llama 3.x\'s `{"name": ..., "parameters": ...}`; `auto` picks from the chat '
        "template; `none`: requests whose tool_choice is not `none` are refused.",
    )
    device_weight_budget_bytes: ByteSize | None = Field(
        None,
        description="Most bytes of weights the paged engine keeps in device memory; the layers "
        "beyond it live in pinned host memory and stream in ahead of use (decode then runs at "
        "the host link's speed). For models larger than a discrete GPU; unset keeps every "
        "weight on the device.",
    )

    @property
    def name(self) -> str:
        """The name clients use in the `model` field."""
        return self.served_model_name or self.model_id.rstrip("/").split("/")[-1].split(":")[-1]


class MemoryConfig(_Section):
    mode: Literal["auto", "managed", "device", "off"] = Field(
        "auto",
        description="How the replica allocates GPU memory. `managed`: RMM managed (unified) "
        "memory, which on Grace may exceed HBM; `device`: plain device memory through RMM; "
        "`off`: PyTorch's own allocator; `auto`: managed on a GPU, off on CPU.",
    )
    pool: bool = Field(False, description="Put an RMM pool on top of the upstream resource.")
    pool_size_bytes: ByteSize | None = Field(
        None,
        description="Most bytes RMM may hand out. Default: HBM + host_memory_budget_bytes on a "
        "coherent Grace node; the card's free memory minus headroom_bytes on a discrete GPU.",
    )
    host_memory_budget_bytes: ByteSize | None = Field(
        None,
        description="LPDDR a Grace replica may use beyond HBM (counts toward free unified "
        "memory). Default: 90% of the host's available memory at start.",
    )
    headroom_bytes: ByteSize = Field(
        ByteSize(2 * GiB),
        description="Device memory left untouched on a discrete GPU (CUDA context, other users).",
    )
    allow_oversubscription: bool = Field(
        False,
        description="Allow a managed pool larger than the discrete GPU's free memory. Dangerous: "
        "oversubscribed managed memory on a discrete GPU can hang the GPU.",
    )
    cpu_memory_budget_bytes: ByteSize = Field(
        ByteSize(4 * GiB),
        description="On a CPU-only replica: the memory budget that free unified memory counts "
        "down from (weights + KV caches).",
    )


class KVCacheConfig(_Section):
    budget_bytes: ByteSize | None = Field(
        None,
        description="Most bytes of per-user KV caches one replica keeps. Default: "
        "budget_fraction of the free memory left after the model loads.",
    )
    budget_fraction: float = Field(
        0.8, gt=0, le=1, description="Share of post-load free memory for KV when no budget set."
    )
    host_tier_bytes: ByteSize = Field(
        ByteSize(0),
        description="Host-memory tier below the paged engine's device KV pool (pinned memory "
        "on a GPU): idle users' caches move there, least recently used first, when device "
        "pages run short, and come back when they return, so more users keep their caches "
        "before any is dropped. 0 disables it.",
    )
    key_share: float | None = Field(
        None,
        gt=0,
        le=1,
        description="With API keys on: the fraction of each replica's KV memory (device pool "
        "plus host tier) that each key's kept caches hold against other keys. A key holding "
        "no more than this never loses a user's cache to another key's requests; beyond it, "
        "its least recently used users go first as usual. Keep it at most 1 / (number of keys) "
        "for every key's share to hold at once. Unset: one least-recently-used order for all.",
    )


class EngineConfig(_Section):
    engine_class: str = Field(
        "auto",
        pattern=r"^(auto|[\w.]+:\w+)$",
        description="`module:Class` of the engine (a `deployments.engine.Engine`), or `auto`: "
        "the paged engine for Llama/Mistral/Qwen2/Qwen3 checkpoints, the generic transformers "
        "engine for anything else.",
    )
    default_max_tokens: int = Field(
        256, gt=0, description="Completion length when a chat request sets no max_tokens."
    )
    max_concurrent_requests: int = Field(
        64, gt=0, description="Requests an engine runs at once; more wait in its queue."
    )
    cpu_threads: int | None = Field(
        None, gt=0, description="torch threads on a CPU replica; default: the actor's CPUs."
    )
    page_size: int = Field(16, gt=0, le=256, description="Tokens per KV page (paged engine).")
    max_num_seqs: int = Field(256, gt=0, description="Most sequences in one batch (paged engine).")
    max_batched_tokens: int = Field(
        8192, gt=0, description="Token budget of one step; long prompts prefill in chunks of it."
    )
    cuda_graphs: bool = Field(True, description="Replay decode steps as CUDA graphs (GPU).")
    prefill_graph_tokens: int = Field(
        512,
        ge=0,
        le=4096,
        description="With `cuda_graphs` and `triton` prefill attention, a step that is one "
        "sequence's prefill chunk of at most this many tokens (a returning user's new turn, a "
        "short prompt) replays a CUDA graph, captured at start-up per token-count bucket, "
        "instead of ~320 kernel launches from Python; 0: off.",
    )
    prefill_attention: Literal["sdpa", "triton"] = Field(
        "triton",
        description="Attention for prefill chunks on a GPU: `triton` runs one paged flash "
        "kernel for all chunks of a step; `sdpa` gathers each sequence's pages for PyTorch's "
        "attention (a masked chunk after a kept prefix falls back to its math kernel).",
    )
    random_weights: bool = Field(
        False,
        description="Initialise weights randomly from the model's config instead of "
        "loading them (benchmarks and capacity tests of real architectures' shapes).",
    )


class ReplicaConfig(_Section):
    num_replicas: int = Field(1, gt=0, description="Model replicas (one per node on Grace).")
    max_ongoing_requests: int = Field(
        64, gt=0, description="Requests Serve sends one replica at once."
    )
    num_cpus: float = Field(1, ge=0, description="Ray CPUs reserved per replica.")
    num_gpus: float = Field(0, ge=0, description="Ray GPUs reserved per replica.")
    accelerator_type: str | None = Field(
        None, description="Ray accelerator type to require, such as `GH200` or `H100`."
    )
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per replica, e.g. {grace_node: 1}."
    )
    max_replicas_per_node: int | None = Field(
        1, gt=0, description="At most this many replicas on one node; null for no limit."
    )
    health_check_period_s: float = Field(10, gt=0, description="Seconds between health checks.")
    stream_messages_per_s: float = Field(
        4000,
        gt=0,
        description="Messages per second that all of one replica's streams share: with N "
        "streams, each gets a message at most every N / this seconds, carrying every token "
        "produced meanwhile (the first token always goes at once).",
    )
    max_queued_requests: int = Field(
        256,
        gt=0,
        description="Requests each caller (ingress replica, driver) may hold waiting for a "
        "free LLMReplica; beyond that a request is refused at once (HTTP 429 with Retry-After).",
    )
    graceful_shutdown_timeout_s: float = Field(
        30,
        gt=0,
        description="Seconds Serve gives a stopping replica (scale-down, a new version, a "
        "drained node): its requests finish, then its idle users' caches move to peers "
        "(cache_moves) until this runs out; the rest are dropped and counted.",
    )


class CacheMovesConfig(_Section):
    enabled: bool = Field(
        True,
        description="Move idle users' kept KV caches to other replicas instead of dropping "
        "them: under memory pressure, on graceful shutdown and on POST "
        "/admin/replicas/{id}/drain (README: Cache moves).",
    )
    pressure_free_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Under memory pressure: when less than this share of a replica's KV "
        "budget is free, its least recently used idle users move to the peer with the most "
        "room that keeps this share free after taking them.",
    )
    check_period_s: float = Field(
        1.0,
        gt=0,
        description="How often a replica checks its memory pressure (also after every request).",
    )
    call_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Longest one move's transfer to a peer may take; a receiver cancels an "
        "import its sender left unfinished this long (its pages are freed).",
    )
    chunk_bytes: ByteSize = Field(
        ByteSize(MOVE_CHUNK_BYTES),
        gt=0,
        description="A moving cache travels in chunks of at most this many bytes (one "
        "object-store object each), staged through three pinned host buffers of this size "
        "allocated when the engine starts (capped at the larger KV tier's size).",
    )
    chunks_per_call: int = Field(
        4,
        gt=0,
        description="A move is pipelined: the sender hands the receiver this many chunks per "
        "call as soon as they are in the object store, and the receiver copies them in while "
        "the sender copies the next ones out (8 calls for a 4 GiB user of 128 MiB chunks).",
    )


class RouterConfig(_Section):
    stats_period_s: float = Field(
        1.0, gt=0, description="How often replicas report memory and resident users."
    )
    free_memory_tolerance_fraction: float = Field(
        0.01,
        ge=0,
        le=1,
        description="New users go to the replica with the largest share of its KV budget "
        "free; replicas within this share of the best count as tied, and ties break by "
        "rendezvous hash of the user.",
    )
    sticky_max_wait_s: float = Field(
        30.0,
        ge=0,
        description="How long a returning user waits for its busy home replica before "
        "being served elsewhere (its history then recomputed).",
    )
    placement_ttl_s: float = Field(
        30.0, gt=0, description="How long a router remembers its own unconfirmed placements."
    )
    stale_stats_s: float | None = Field(
        None,
        gt=0,
        description="Stats older than this rank their replica after every "
        "replica with fresh stats (a frozen replica stops reporting); None: 5 stats periods, "
        "at least 5 s.",
    )

    @property
    def stale_after_s(self) -> float:
        return self.stale_stats_s or max(5.0, 5 * self.stats_period_s)


class IngressConfig(_Section):
    num_replicas: int = Field(1, gt=0, description="OpenAIIngress replicas.")
    num_cpus: float = Field(0.5, ge=0, description="Ray CPUs per ingress replica.")
    request_timeout_s: float = Field(
        600, gt=0, description="Longest a request may run before it is cut off (504)."
    )
    max_ongoing_requests: int = Field(
        1024,
        gt=0,
        description="HTTP requests Serve lets one ingress replica hold at once "
        "(also its actor's concurrency, which health checks share).",
    )
    probe_slots: int = Field(
        16,
        ge=1,
        description="Of max_ongoing_requests, slots the ingress keeps free for "
        "health checks and probes: it answers 429 `ingress_busy` beyond the rest.",
    )
    body_slots: int | None = Field(
        None,
        ge=1,
        description="Of max_ongoing_requests, requests whose body may be arriving "
        "at once; when full, the oldest incomplete body (if 1 s old or more) is answered 408 so "
        "a newer request gets in, else the newer one gets 429 bodies_busy (None: a quarter of "
        "max_ongoing_requests).",
    )
    max_requests_per_key: int | None = Field(
        None,
        gt=0,
        description="With auth on, most requests one API key may have in flight "
        "on one ingress replica (429 `key_busy` beyond); None: no cap.",
    )
    body_timeout_s: float = Field(
        30,
        gt=0,
        description="Longest a request's body may take to arrive whole (408 "
        "`request_timeout` after), so a stalled client frees its slot.",
    )
    first_token_timeout_s: float = Field(
        300,
        gt=0,
        description="Longest a request may wait for its first token, queueing "
        "included (504 `timeout`); never more than request_timeout_s.",
    )
    admin_timeout_s: float = Field(
        5,
        gt=0,
        description="Longest /admin/replicas waits for a replica's row; replicas "
        "that take longer are listed as `unresponsive`.",
    )
    stream_idle_timeout_s: float = Field(
        60,
        gt=0,
        description="Longest a replica's stream may go without a message after its "
        "first; then the request ends with an error (504 / an error chunk `stream_stalled`).",
    )
    max_queued_requests: int = Field(
        1024,
        gt=0,
        description="HTTP requests the proxy holds waiting for a free ingress replica; beyond "
        "that it answers 429 with Retry-After.",
    )
    retry_after_s: int = Field(
        1, ge=1, description="Seconds sent in `Retry-After` when a request is refused as busy."
    )
    max_body_bytes: ByteSize = Field(
        ByteSize(4 * MiB),
        gt=0,
        description="Largest request body accepted; larger ones get 413 before they are read.",
    )
    max_messages: int = Field(
        2048, gt=0, description="Most messages one chat request may carry (400 beyond)."
    )
    replica_retries: int = Field(
        2,
        ge=0,
        description="Times a request whose replica died before its first token is sent to "
        "another replica (nothing reached the client yet, so this is safe).",
    )

    @model_validator(mode="after")
    def _probe_room(self) -> IngressConfig:
        if self.request_limit < 1:
            raise ValueError(
                f"probe_slots ({self.probe_slots}) and body_slots "
                f"({self.body_limit}) leave no room in max_ongoing_requests "
                f"({self.max_ongoing_requests})"
            )
        return self

    @property
    def body_limit(self) -> int:
        """Requests whose body may be arriving at once (the gate's Readers)."""
        return self.body_slots or max(1, self.max_ongoing_requests // 4)

    @property
    def request_limit(self) -> int:
        """Requests the ingress's gate runs at once, bodies whole: Serve's limit less the
        probes' slots and the bodies still arriving, so health checks always find a slot."""
        return self.max_ongoing_requests - self.probe_slots - self.body_limit


class AuthConfig(_Section):
    api_keys_file: str | None = Field(
        None,
        description="File of API keys, one a line (blank lines and `#` comments ignored). "
        "Any key set turns auth on: requests need `Authorization: Bearer <key>`.",
    )
    api_keys_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of an environment variable (in the ingress process) holding API "
        "keys separated by commas or whitespace. May be combined with api_keys_file.",
    )

    admin_keys_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of an environment variable (in the ingress process) holding the "
        "keys that may call `/admin/*` (also accepted everywhere else). With auth on and none "
        "set, `/admin/*` answers 403 to every HTTP caller.",
    )
    user_key_secret_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of an environment variable (in the ingress processes) holding a "
        "secret that keys the user hashes (HMAC-SHA-256), so nobody without it can tell "
        "whether a given user id is resident; unset: plain SHA-256.",
    )

    @property
    def enabled(self) -> bool:
        """Whether a key source is configured (the keys themselves load in the ingress)."""
        return bool(self.api_keys_file or self.api_keys_env)


class AppArgs(_Section):
    """Everything `build_app` needs; the `args:` block of a Serve config."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="The model to serve.")
    memory: MemoryConfig = Field(default_factory=MemoryConfig, description="Memory set-up.")
    kv_cache: KVCacheConfig = Field(default_factory=KVCacheConfig, description="KV budget.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="Engine choice.")
    replica: ReplicaConfig = Field(default_factory=ReplicaConfig, description="LLMReplica.")
    router: RouterConfig = Field(default_factory=RouterConfig, description="Routing.")
    cache_moves: CacheMovesConfig = Field(
        default_factory=CacheMovesConfig, description="Users' caches moved between replicas."
    )
    ingress: IngressConfig = Field(default_factory=IngressConfig, description="HTTP ingress.")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API keys (off if unset).")

    @model_validator(mode="after")
    def _consistent(self) -> AppArgs:
        if self.kv_cache.key_share is not None and not self.auth.enabled:
            raise ValueError(
                "kv_cache.key_share is set but auth is off: shares are per API key (set "
                "auth.api_keys_file or auth.api_keys_env, or unset kv_cache.key_share)"
            )
        if self.memory.mode in ("managed", "device") and self.replica.num_gpus == 0:
            raise ValueError(
                f"memory.mode is {self.memory.mode!r} but replica.num_gpus is 0: a GPU memory "
                "mode needs a GPU (set replica.num_gpus: 1, or memory.mode: auto)"
            )
        return self


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "args"


def parse_app_args(raw: dict[str, Any] | AppArgs | None) -> AppArgs:
    """Validate raw `args` into AppArgs; raise ConfigError naming every bad field."""
    if isinstance(raw, AppArgs):
        return raw
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"args: expected a mapping, got {type(raw).__name__}")
    try:
        return AppArgs.model_validate(raw or {})
    except ValidationError as exc:
        problems = [f"{_field_path(e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("invalid app args:\n  " + "\n  ".join(problems)) from None
