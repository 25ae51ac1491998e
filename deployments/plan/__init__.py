"""Capacity planner: `python -m deployments.plan --model M --node N --context TOKENS`.

- `models`: parameter counts by how decoding reads them, KV shape; presets and HF configs;
- `nodes`: node presets with documented capacities and bandwidths;
- `planner`: placement into HBM and host memory, users that fit, the decode-step floor;
- `report`: the plan as JSON and as a table; `cli`: the command line.

The node memory model (limit, tiers' room) is `deployments.capacity`, which the replica's
`deployments.memory` uses as well.
"""
