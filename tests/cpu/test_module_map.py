"""The README's Development section maps every module of deployments/ to its job."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_module_is_named_in_the_development_section():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Development") :]
    modules = [
        p
        for p in (ROOT / "deployments").rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    ]
    assert modules
    missing = [str(p.relative_to(ROOT)) for p in modules if p.stem not in section]
    assert not missing, f"modules the README's Development section does not name: {missing}"
