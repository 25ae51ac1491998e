"""The Dockerfile builds the image the manifests and the README name, and installs what
pyproject.toml declares (read by parsing it: no Docker engine runs here)."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
IMAGE = f"ghcr.io/grace-serve/grace-serve:{PROJECT['version']}"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def runs() -> list[str]:
    return [args for op, args in instructions() if op == "RUN"]


def makefile_torch() -> str:
    return re.search(r"^TORCH_VERSION\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)


def key(requirement: Requirement) -> tuple:
    return (
        canonicalize_name(requirement.name),
        frozenset(requirement.extras),
        str(requirement.specifier),
    )


def test_the_base_is_cuda_13_on_ubuntu():
    [default] = [args for op, args in instructions() if op == "ARG" and "CUDA_IMAGE=" in args]
    image = default.split("=", 1)[1]
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-(base|runtime)-ubuntu\d\d\.\d\d", image)
    assert ("FROM", "${CUDA_IMAGE}") in instructions()


def test_it_installs_the_dependencies_and_the_gpu_extra_exactly_as_declared():
    [install] = [r for r in runs() if '"ray[serve]' in r]
    words = shlex.split(install)
    installed = {key(Requirement(w)) for w in words[words.index("install") + 1 :]}
    declared = [
        Requirement(r) for r in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["gpu"]
    ]
    [torch] = [r for r in declared if r.name == "torch"]
    pinned = Requirement(f"torch=={makefile_torch()}")  # the build the README states
    assert makefile_torch() in torch.specifier
    expected = {key(r) for r in declared if r.name != "torch"} | {key(pinned)}
    assert installed == expected


def test_it_copies_what_the_app_and_its_install_need_and_installs_the_package():
    copies = [shlex.split(args) for op, args in instructions() if op == "COPY"]
    sources = {src.rstrip("/") for words in copies for src in words[:-1]}
    readme = PROJECT["readme"]  # setuptools reads it while installing
    assert {"pyproject.toml", readme, "deployments", "configs"} <= sources
    assert all((ROOT / src).exists() for src in sources)
    assert ("WORKDIR", "/app") in instructions()
    assert any("pip install --no-deps ." in r and "import deployments.app" in r for r in runs())


def test_it_has_what_triton_and_kuberays_probes_need_at_run_time():
    [apt] = [r for r in runs() if "apt-get install" in r]
    assert {"gcc", "python3-dev", "wget", "python3-venv"} <= set(apt.split())


def test_the_build_context_leaves_out_the_venv_but_nothing_copied():
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {".git", ".venv"} <= set(ignored)
    assert not {"deployments", "configs", "pyproject.toml", PROJECT["readme"]} & set(ignored)


def test_the_manifests_and_the_readme_name_the_image_the_readme_builds():
    for path in sorted((ROOT / "cluster").glob("*.yaml")):
        images = re.findall(r"image:\s*(\S+)", path.read_text())
        assert images and set(images) == {IMAGE}, path.name
        assert all(yaml.safe_load_all(path.read_text()))
    readme = (ROOT / "README.md").read_text()
    assert f"--platform linux/arm64,linux/amd64 -t {IMAGE}" in readme
