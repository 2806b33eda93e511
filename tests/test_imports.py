"""The one-way import rule (DESIGN §4): fmbseg and storage import nothing else of the repo; stages import only
fmbseg and storage; nothing below flows imports Prefect."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fmbseg", "storage", "stages", "flows")
ALLOWED = {
    "fmbseg": {"fmbseg"},
    "storage": {"storage"},
    "stages": {"fmbseg", "storage", "stages"},
    "flows": {"fmbseg", "storage", "stages", "flows"},
}


def _imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_go_one_way(package):
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        imported = _imported_top_levels(path)
        bad = (imported & set(PACKAGES)) - ALLOWED[package]
        if package != "flows" and "prefect" in imported:
            bad.add("prefect")
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, "\n".join(offenders)
