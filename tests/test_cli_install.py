"""``make install`` is reproducible: constraints.txt pins every package CI tests with."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
INSTALLED_EXTRAS = ("lab", "peers", "dev", "docs", "mlflow")  # what `make install` asks for
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")


def pins() -> dict[str, str]:
    """Canonical name → pinned version, from constraints.txt (every line that is not a comment)."""
    out: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"not an exact pin: {line!r}"
        name = canonicalize_name(match[1])
        assert name not in out, f"{name} pinned twice"
        out[name] = match[2]
    return out


def direct_requirements() -> list[Requirement]:
    """The base dependencies and those of the installed extras, the extras they pull in included."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras, todo, found = project["optional-dependencies"], list(INSTALLED_EXTRAS), []
    seen: set[str] = set()
    requirements = [Requirement(r) for r in project["dependencies"]]
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in map(Requirement, extras[extra]):
            if canonicalize_name(requirement.name) == canonicalize_name(project["name"]):
                todo.extend(requirement.extras)  # streamserve[worker,…]: another extra of ours
            else:
                found.append(requirement)
    return requirements + found


def test_every_direct_dependency_is_pinned_within_what_pyproject_allows():
    pinned = pins()
    for requirement in direct_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (requirement, pinned[name])
    assert "redis" in pinned and "hiredis" in pinned
    assert "streamserve" not in pinned, "the project itself is installed from the checkout"


def test_the_tests_run_on_the_pinned_versions():
    pinned = pins()
    for requirement in direct_requirements():
        name = canonicalize_name(requirement.name)
        installed = metadata.version(requirement.name)
        # ==2.13.0 accepts a local build such as 2.13.0+cpu
        assert SpecifierSet(f"=={pinned[name]}").contains(installed, prereleases=True), (
            f"{name} {installed} is installed, constraints.txt pins {pinned[name]}: regenerate it "
            "(its header says how) or reinstall with `make install`")


def test_make_install_uses_the_constraints():
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install -c constraints.txt -e '.[lab,peers,dev,docs,mlflow]'" in makefile
    assert re.search(r"^\$\(STAMP\):.*constraints\.txt", makefile, re.M), "a new pin reinstalls"
