"""What the install declares is true: the Python floor, the pinned torch, no unused
dependency, and the CPU torch index with its fast fallback (scripts/torch_index.py)."""

from __future__ import annotations

import http.server
import importlib.util
import re
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


torch_index = load_script("torch_index")

# Every runtime dependency (and the gpu extras') and the module our code imports it as; None
# where our code does not import it but a library we call needs it.
IMPORTED_AS = {
    "ray": "ray",
    "torch": "torch",
    "transformers": "transformers",
    "tokenizers": "tokenizers",
    "huggingface-hub": "huggingface_hub",
    "jinja2": "jinja2",
    "safetensors": "safetensors",
    "pydantic": "pydantic",
    "pyyaml": "yaml",
    "fastapi": "fastapi",
    "rmm-cu13": "rmm",
    "rmm-cu12": "rmm",
    "llguidance": "llguidance",
    "accelerate": None,  # transformers' from_pretrained(device_map=...) needs it
}


def makefile_variable(name: str) -> str:
    match = re.search(rf"^{name}\s*[:?]?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert match, f"{name} not set in the Makefile"
    return match.group(1)


def declared() -> list[Requirement]:
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + extras["gpu"] + extras["gpu-cu12"]]


def test_the_python_floor_is_rmms_and_the_makefile_enforces_the_same():
    """rmm-cu13/cu12 ship cp311-abi3 wheels only: 3.10 cannot install the gpu extra."""
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    assert makefile_variable("MIN_PYTHON") == "3.11"


def test_the_pinned_torch_satisfies_pyprojects_range():
    [torch] = [r for r in declared() if r.name == "torch"]
    assert makefile_variable("TORCH_VERSION") in torch.specifier


def test_every_declared_dependency_is_used():
    sources = "\n".join(p.read_text() for p in (ROOT / "deployments").rglob("*.py"))
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        assert name in IMPORTED_AS, f"{name}: declared, but used where?"
        module = IMPORTED_AS[name]
        if module:
            assert re.search(rf"^\s*(import|from) {module}\b", sources, re.M), requirement.name


# ---- the CPU torch index -------------------------------------------------------------------


class Index(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/whl/cpu/torch/" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def index_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/whl/cpu"
    server.shutdown()


def test_a_reachable_cpu_index_is_used(index_url):
    assert torch_index.pip_options(index_url, 3) == ["--index-url", index_url]


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:9/whl/cpu", "https://no-such-host.invalid/whl"],
    ids=["closed-port", "unknown-host"],
)
def test_an_unreachable_index_falls_back_quickly(url):
    started = time.monotonic()
    assert torch_index.pip_options(url, 3) == []
    assert time.monotonic() - started < 3.5


def test_the_script_prints_pip_options_and_says_why_on_fallback(index_url):
    def run(url: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "torch_index.py"), url],
            capture_output=True,
            text=True,
            timeout=30,
        )

    used = run(index_url)
    assert used.returncode == 0 and used.stdout.split() == ["--index-url", index_url]
    fallback = run("http://127.0.0.1:9/whl/cpu")
    assert fallback.returncode == 0 and fallback.stdout.strip() == ""
    assert "not reachable" in fallback.stderr


def test_the_makefile_installs_the_pinned_torch_through_the_index_script():
    makefile = (ROOT / "Makefile").read_text()
    assert "torch==$(TORCH_VERSION) $$($(BIN)/python scripts/torch_index.py" in makefile
    assert makefile_variable("TORCH_CPU_INDEX") == torch_index.CPU_INDEX
