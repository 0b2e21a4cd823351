"""pyproject.toml declares exactly the third-party modules that the project's packages import.

The fresh virtual environment of `.ci/run` catches a missing distribution that nothing else
brings in; this test also catches one that arrives today only as another package's
dependency (scipy through jax), and a declared distribution that nothing imports.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import sys

import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("model", "optim", "train", "rl", "configs")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return {_norm(re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0]) for d in deps}


def _imported_modules() -> dict[str, str]:
    """Top-level module -> the first file that imports it, over the project's packages."""
    own = set(PACKAGES)
    found: dict[str, str] = {}
    for pkg in PACKAGES:
        for d, _, files in os.walk(os.path.join(ROOT, pkg)):
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(d, name)
                with open(path) as f:
                    tree = ast.parse(f.read(), path)
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        mods = [a.name for a in node.names]
                    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                        mods = [node.module]
                    else:
                        continue
                    for m in mods:
                        top = m.split(".")[0]
                        if top not in own and top not in sys.stdlib_module_names:
                            found.setdefault(top, os.path.relpath(path, ROOT))
    return found


def test_every_import_is_declared_and_every_declaration_imported():
    dists = importlib.metadata.packages_distributions()
    declared = _declared()
    used: set[str] = set()
    missing = []
    for mod, where in sorted(_imported_modules().items()):
        names = {_norm(d) for d in dists.get(mod, [])}
        hit = names & declared
        if not hit:
            missing.append(f"{mod} (imported by {where}; distributions {sorted(names)})")
        used |= hit
    assert not missing, "not declared in pyproject.toml: " + "; ".join(missing)
    assert not declared - used, f"declared but never imported: {sorted(declared - used)}"
