"""Routing simulation: many users' multi-turn conversations over replicas of unequal memory.

Modules, one job each:

- ``workload``: node types (memory a replica reports and its KV budget) and the users'
  conversations (seeded; arrival, turn and think times, context lengths);
- ``cluster``: each replica's memory (KV caches under a budget, LRU eviction of idle users)
  and the stats it reports, as ``LLMReplica.record_routing_stats`` does;
- ``policies``: the routers compared, each behind one small adapter;
- ``simulate``: the event loop (one request per turn, stats refreshed every period,
  replicas joining and leaving);
- ``metrics``: what a run records, and the definitions the results quote;
- ``suite``: the runs behind one results file (load sweep, seeds, churn) and the targets;
- ``plot``: the figure. ``benchmarks/routing.py`` is the command that runs it all.
"""
