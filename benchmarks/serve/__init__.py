"""The serving benchmark's parts (benchmarks/serve_bench.py runs them).

workloads    what is sent: the plan's sizes, the steps, each step's sessions
sessions     how a session talks: Call and Reply, the three client behaviours
http_client  an aiohttp streaming client with its own SSE parser (the HTTP transport)
client_pool  client processes that run a step's sessions over HTTP, and their driver
engine_side  the in-process phase: the engine built as the replica builds it, its transport
server       `serve run` as a subprocess: start on a free port, wait, admin rows, stop
metrics      per-step rows from request records (TTFT, inter-token latency, tokens/s, cache)
report       headline ratios against the issue's targets
"""
