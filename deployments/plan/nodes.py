"""Node presets: each replica's memory tiers, their capacities and bandwidths, as documented.

Capacities are the vendors' figures in decimal GB (as the routing simulation uses them); the
cards report a little more to CUDA (an H100 SXM 80GB shows 81,559 MiB = 85.5 GB), which the
plan leaves as slack. Bandwidths are bytes per second, per direction where a link is meant.

Sources (also in the README's facts table):

- GH200: NVIDIA GH200 Grace Hopper Superchip datasheet and product page
  (nvidia.com/en-us/data-center/grace-hopper-superchip): 96 GB HBM3 at 4 TB/s, or 144 GB
  HBM3e at 4.9 TB/s; 480 GB LPDDR5X (up to 512 GB/s; the design notes plan with ~500 GB/s);
  NVLink-C2C 900 GB/s total, 450 GB/s a direction. Others measured ~375 GB/s host-to-device
  and ~297 GB/s device-to-host over C2C, so the floor from 450 GB/s is optimistic.
- GB200: NVIDIA GB200 NVL72 product page: one Grace and two Blackwell GPUs per superchip,
  ~186 GB HBM3e at 8 TB/s each, 480 GB LPDDR5X, NVLink-C2C 900 GB/s for the superchip.
- H100 SXM (80 GB HBM3, 3.35 TB/s) and H200 (141 GB HBM3e, 4.8 TB/s): NVIDIA's H100 and
  H200 product pages. On x86 their host link is PCIe Gen5 x16 (64 GB/s a direction nominal;
  ~54 GB/s pinned copies measured on this project's H100/H200 machines) and is not coherent.
"""

from __future__ import annotations

from dataclasses import dataclass

from deployments.capacity import DEFAULT_HEADROOM_BYTES, NodeMemory, host_budget_bytes

GB = 10**9
TB = 10**12


class NodeError(ValueError):
    """An unknown node preset."""


@dataclass(frozen=True)
class NodeSpec:
    """One replica's share of a node (bytes, bytes per second)."""

    name: str
    description: str
    coherent: bool  # the GPU reads host memory coherently (Grace); else no spill to host
    hbm_bytes: int
    hbm_bandwidth: float
    host_bytes: int  # host memory per replica (LPDDR5X share on Grace)
    host_bandwidth: float  # that memory's own bandwidth per replica
    link: str
    link_bandwidth: float  # GPU <- host memory, one direction, per replica
    replicas_per_node: int = 1

    @property
    def host_read_bandwidth(self) -> float:
        """How fast the GPU reads host memory: the slower of the link and the memory."""
        return min(self.link_bandwidth, self.host_bandwidth)

    def memory(
        self, host_budget: int | None = None, headroom: int = DEFAULT_HEADROOM_BYTES
    ) -> NodeMemory:
        """The replica's memory model; `host_budget` defaults as the replica's does, from
        the host memory (here: all of the replica's share counted as available)."""
        if not self.coherent:
            return NodeMemory.discrete(self.hbm_bytes, headroom)
        if host_budget is not None and host_budget > self.host_bytes:
            raise ValueError(
                f"host budget {host_budget / GB:.1f} GB exceeds a {self.name} replica's "
                f"{self.host_bytes / GB:.1f} GB of host memory"
            )
        return NodeMemory.grace(
            self.hbm_bytes, host_budget_bytes(host_budget, self.host_bytes), headroom
        )


_C2C_A_DIRECTION = 450 * GB  # NVLink-C2C: 900 GB/s total
_LPDDR5X_BANDWIDTH = 500 * GB
_PCIE_PINNED_MEASURED = 54 * GB

NODES: dict[str, NodeSpec] = {
    node.name: node
    for node in (
        NodeSpec(
            "gh200-96gb",
            "GH200: H100 GPU, 96 GB HBM3 + Grace, 480 GB LPDDR5X",
            True,
            96 * GB,
            4.0 * TB,
            480 * GB,
            _LPDDR5X_BANDWIDTH,
            "NVLink-C2C",
            _C2C_A_DIRECTION,
        ),
        NodeSpec(
            "gh200-144gb",
            "GH200: H100 GPU, 144 GB HBM3e + Grace, 480 GB LPDDR5X",
            True,
            144 * GB,
            4.9 * TB,
            480 * GB,
            _LPDDR5X_BANDWIDTH,
            "NVLink-C2C",
            _C2C_A_DIRECTION,
        ),
        # One replica per Blackwell GPU (as configs/gb200-llama-4-scout.yaml runs): each gets
        # its GPU's HBM and half of what the two GPUs share, the LPDDR5X, its bandwidth and
        # the superchip's C2C, for both replicas may read host memory at once.
        NodeSpec(
            "gb200",
            "GB200 superchip, one replica per Blackwell GPU: 186 GB HBM3e + "
            "half of Grace's 480 GB LPDDR5X",
            True,
            186 * GB,
            8.0 * TB,
            240 * GB,
            _LPDDR5X_BANDWIDTH / 2,
            "NVLink-C2C (half)",
            _C2C_A_DIRECTION / 2,
            replicas_per_node=2,
        ),
        NodeSpec(
            "h100-sxm",
            "H100 SXM 80 GB HBM3 on x86, PCIe host link (not coherent)",
            False,
            80 * GB,
            3.35 * TB,
            0,
            0.0,
            "PCIe Gen5 x16",
            _PCIE_PINNED_MEASURED,
        ),
        NodeSpec(
            "h200",
            "H200 141 GB HBM3e on x86, PCIe host link (not coherent)",
            False,
            141 * GB,
            4.8 * TB,
            0,
            0.0,
            "PCIe Gen5 x16",
            _PCIE_PINNED_MEASURED,
        ),
    )
}


def resolve_node(name: str) -> NodeSpec:
    try:
        return NODES[name]
    except KeyError:
        raise NodeError(f"unknown node {name!r}; presets: {', '.join(NODES)}") from None
