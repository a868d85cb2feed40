"""Imports flow one way: protocol ← registry ← experiments ← worker; producer ← protocol."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "protocol": {"protocol"},
    "producer": {"protocol", "producer"},
    "registry": {"protocol", "registry"},
    "experiments": {"protocol", "registry", "experiments"},
    "worker": {"protocol", "registry", "experiments", "worker", "producer"},
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_flow_one_way(package):
    for path in (ROOT / package).glob("*.py"):
        assert imported_packages(path) <= ALLOWED[package], f"{path.name} imports too much"


def test_client_never_imports_onnxruntime_or_torch():
    code = ("import sys, producer; producer.Client; "
            "bad = {'onnxruntime', 'torch', 'scipy', 'rich'} & set(sys.modules); print(sorted(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_base_install_dependencies_exclude_heavy_packages():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"])
    assert not any(heavy in base for heavy in ("onnxruntime", "torch", "scipy"))
