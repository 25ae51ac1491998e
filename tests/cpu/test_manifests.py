"""The KubeRay manifests in cluster/ are valid custom resources that serve the GH200 config.

Schemas: KubeRay's RayCluster and RayService CRDs as JSON schemas that reject unknown fields,
from ../shared/schemas/kuberay/ beside the repository or $GRACE_SERVE_KUBERAY_SCHEMAS.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.config import parse_app_args

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "cluster").glob("*.yaml"))
GH200_CONFIG = ROOT / "configs" / "gh200-llama-3.1-70b.yaml"
SCHEMA_DIR = Path(
    os.environ.get("GRACE_SERVE_KUBERAY_SCHEMAS", ROOT.parent / "shared" / "schemas" / "kuberay")
)
SCHEMA_FILES = {"RayCluster": "raycluster_v1.json", "RayService": "rayservice_v1.json"}
GPU = "nvidia.com/gpu"


# ---- helpers --------------------------------------------------------------------------------


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def all_documents() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in load_documents(path)]


def the_one(kind: str) -> dict[str, Any]:
    docs = [doc for doc in all_documents() if doc["kind"] == kind]
    assert len(docs) == 1, f"expected one {kind} under cluster/, found {len(docs)}"
    return docs[0]


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """The RayCluster spec of a RayCluster, or the one a RayService creates."""
    return doc["spec"]["rayClusterConfig"] if doc["kind"] == "RayService" else doc["spec"]


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]  # KubeRay runs Ray in the first one


def gh200_app() -> dict[str, Any]:
    return yaml.safe_load(GH200_CONFIG.read_text())["applications"][0]


def advertised_resources(ray_start_params: dict[str, str]) -> dict[str, Any]:
    """The custom resources `ray start` gets from rayStartParams' `resources` string.

    KubeRay writes `ray start --resources=<value>` into a bash command, so the value must be
    shell-quoted JSON. KubeRay's operator and Ray's autoscaler also parse it themselves; all
    three readings must agree.
    """
    value = ray_start_params["resources"]
    [flag] = shlex.split(f"--resources={value}")  # what bash hands to `ray start`
    by_ray_start = json.loads(flag.removeprefix("--resources="))
    by_operator = json.loads(value.strip("'\"` "))  # KubeRay's getResourcesMap
    by_autoscaler = json.loads(value[1:-1].replace("\\", ""))  # Ray's _get_custom_resources
    assert by_ray_start == by_operator == by_autoscaler
    assert all(isinstance(v, int) for v in by_autoscaler.values())  # the autoscaler insists
    return by_ray_start


BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
DECIMAL = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def quantity_bytes(quantity: str | int) -> int:
    """A Kubernetes memory quantity (`460Gi`, `500G`, `1024`) in bytes."""
    match = re.fullmatch(r"(\d+)([KMGT]i|[kMGT]?)", str(quantity))
    assert match, f"unsupported quantity {quantity!r}"
    number, unit = match.groups()
    return int(number) * {**BINARY, **DECIMAL}[unit]


# ---- the manifests --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def schemas() -> dict[str, dict[str, Any]]:
    if not SCHEMA_DIR.is_dir():
        pytest.skip(
            f"KubeRay JSON schemas not found at {SCHEMA_DIR}; "
            "set GRACE_SERVE_KUBERAY_SCHEMAS to the directory holding "
            + " and ".join(SCHEMA_FILES.values())
        )
    return {
        kind: json.loads((SCHEMA_DIR / name).read_text()) for kind, name in SCHEMA_FILES.items()
    }


def test_cluster_holds_one_rayservice_and_one_raycluster():
    assert {p.name for p in MANIFESTS} >= {"rayservice-gh200.yaml", "raycluster-gh200.yaml"}
    kinds = sorted(doc["kind"] for doc in all_documents())
    assert kinds == ["RayCluster", "RayService"]
    assert all(doc["apiVersion"] == "ray.io/v1" for doc in all_documents())


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_manifest_validates_against_the_kuberay_crd_schema(path, schemas):
    """Field names and types are KubeRay's: the schemas reject unknown fields."""
    import jsonschema

    for doc in load_documents(path):
        assert doc.get("kind") in schemas, f"{path.name}: no schema for kind {doc.get('kind')}"
        jsonschema.validate(doc, schemas[doc["kind"]])


def test_serve_config_v2_is_exactly_the_gh200_config():
    """The RayService deploys configs/gh200-llama-3.1-70b.yaml, not a drifted copy of it."""
    serve_config = yaml.safe_load(the_one("RayService")["spec"]["serveConfigV2"])
    assert serve_config == yaml.safe_load(GH200_CONFIG.read_text())


def test_serve_config_v2_passes_serves_own_schema():
    serve_config = yaml.safe_load(the_one("RayService")["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)


def test_rayservice_and_raycluster_run_the_same_pods():
    """The interactive RayCluster is the RayService's cluster minus the Serve config."""
    service = cluster_spec(the_one("RayService"))
    cluster = cluster_spec(the_one("RayCluster"))
    assert service["headGroupSpec"] == cluster["headGroupSpec"]
    assert service["workerGroupSpecs"] == cluster["workerGroupSpecs"]


@pytest.mark.parametrize("kind", ["RayService", "RayCluster"])
def test_ray_version_is_the_one_the_project_pins(kind):
    import ray

    assert cluster_spec(the_one(kind))["rayVersion"] == ray.__version__


@pytest.mark.parametrize("kind", ["RayService", "RayCluster"])
def test_head_pod_is_an_arm64_cpu_pod_that_hosts_no_replica(kind):
    head = cluster_spec(the_one(kind))["headGroupSpec"]
    params = head["rayStartParams"]
    assert params["num-cpus"] == "0"  # replicas and the ingress need CPUs: none land here
    assert "num-gpus" not in params or params["num-gpus"] == "0"
    assert params["dashboard-host"] == "0.0.0.0"
    resources = ray_container(head)["resources"]
    assert GPU not in resources.get("limits", {}) and GPU not in resources.get("requests", {})
    assert head["template"]["spec"]["nodeSelector"]["kubernetes.io/arch"] == "arm64"


@pytest.mark.parametrize("kind", ["RayService", "RayCluster"])
def test_worker_pods_take_one_gh200_gpu_on_arm64_nodes(kind):
    args = parse_app_args(gh200_app()["args"])
    for group in cluster_spec(the_one(kind))["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        resources = ray_container(group)["resources"]
        assert int(resources["limits"][GPU]) == args.replica.num_gpus == 1
        assert int(resources["requests"][GPU]) == 1
        assert group["rayStartParams"].get("num-gpus", "1") == "1"
        assert pod["nodeSelector"]["kubernetes.io/arch"] == "arm64"
        product = pod["nodeSelector"]["nvidia.com/gpu.product"]
        assert args.replica.accelerator_type in product.split("-")  # NVIDIA-GH200-480GB
        assert any(t["key"] == GPU and t["effect"] == "NoSchedule" for t in pod["tolerations"])


@pytest.mark.parametrize("kind", ["RayService", "RayCluster"])
def test_workers_advertise_the_custom_resource_replicas_require(kind):
    """Each GH200 pod advertises `grace_node`, and there are pods for every replica."""
    args = parse_app_args(gh200_app()["args"])
    required = args.replica.resources
    assert required == {"grace_node": 1}
    room = 0  # replicas the worker pods can hold at once
    for group in cluster_spec(the_one(kind))["workerGroupSpecs"]:
        advertised = advertised_resources(group["rayStartParams"])
        assert advertised.keys() >= required.keys()
        per_pod = min(int(advertised[name] // need) for name, need in required.items())
        if args.replica.max_replicas_per_node is not None:
            per_pod = min(per_pod, args.replica.max_replicas_per_node)
        room += per_pod * group["replicas"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert room >= args.replica.num_replicas


@pytest.mark.parametrize("kind", ["RayService", "RayCluster"])
def test_worker_memory_holds_the_replicas_host_memory_budget(kind):
    """Managed memory may put host_memory_budget_bytes in LPDDR5X: the pod limit must allow it."""
    args = parse_app_args(gh200_app()["args"])
    for group in cluster_spec(the_one(kind))["workerGroupSpecs"]:
        resources = ray_container(group)["resources"]
        limit = quantity_bytes(resources["limits"]["memory"])
        assert limit > int(args.memory.host_memory_budget_bytes)
        assert quantity_bytes(resources["requests"]["memory"]) == limit  # Guaranteed QoS


@pytest.mark.parametrize("kind", ["RayService", "RayCluster"])
def test_every_ray_pod_mounts_a_memory_backed_dev_shm(kind):
    spec = cluster_spec(the_one(kind))
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        [mount] = [m for m in ray_container(group)["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert volumes[mount["name"]]["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("kind", ["RayService", "RayCluster"])
def test_workers_are_ready_only_while_a_model_replica_can_serve(kind):
    """Worker readiness asks the app's /ready on the Serve port; liveness stays KubeRay's
    (a loading model must not restart pods), and so do the head's probes (KubeRay submits the
    Serve config only once the head pod is ready: a /ready probe there would never pass)."""
    serve_port = yaml.safe_load(GH200_CONFIG.read_text())["http_options"]["port"]
    spec = cluster_spec(the_one(kind))
    for group in spec["workerGroupSpecs"]:
        container = ray_container(group)
        probe = container["readinessProbe"]["httpGet"]
        assert probe == {"path": "/ready", "port": serve_port}
        assert {"containerPort": serve_port, "name": "serve"} in container["ports"]
        assert "livenessProbe" not in container
    head = ray_container(spec["headGroupSpec"])
    assert "readinessProbe" not in head and "livenessProbe" not in head


@pytest.mark.parametrize("kind", ["RayService", "RayCluster"])
def test_every_pod_exports_metrics_on_the_documented_port(kind):
    spec = cluster_spec(the_one(kind))
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
        assert {"containerPort": 8080, "name": "metrics"} in ray_container(group)["ports"]
