"""The shape of the package: no import cycle, no private name used across modules, no import running upwards.

Read from the source with ``ast`` (every import, also those inside functions), so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = "lit_sharp"


def _source_files() -> dict[str, Path]:
    """Module name -> file, for the package and for ``callbacks/`` (installed as ``lit_sharp.callbacks``)."""
    files: dict[str, Path] = {}
    for folder, prefix in ((REPO / "lit_sharp", PACKAGE), (REPO / "callbacks", f"{PACKAGE}.callbacks")):
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join([prefix, *parts])] = path
    return files


MODULES = _source_files()


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` for every import of a lit_sharp module in ``module``."""
    found = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names if alias.name.startswith(PACKAGE)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(PACKAGE):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if submodule in MODULES:
                    found.append((submodule, None, node.lineno))
                else:
                    found.append((node.module, alias.name, node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{module}:{node.lineno}: relative import; the package imports absolutely")
    return found


def _graph() -> dict[str, set[str]]:
    return {module: {target for target, _, _ in _imports(module) if target != module} for module in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_every_imported_lit_sharp_module_exists():
    missing = [f"{module}:{line} imports {target}" for module in MODULES for target, _, line in _imports(module)
               if target not in MODULES]
    assert not missing, missing


def test_no_import_cycle():
    assert _cycles(_graph()) == [], "modules that import each other, directly or around a loop"


def test_no_private_name_is_imported_from_another_module():
    private = []
    for module in MODULES:
        for target, name, line in _imports(module):
            hidden = [part for part in target.split(".") if part.startswith("_")]
            if hidden or (name or "").startswith("_"):
                private.append(f"{module}:{line} imports {target}{'.' + name if name else ''}")
    assert not private, private


def test_no_private_attribute_of_another_lit_sharp_module_is_used():
    used = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = {alias.asname or alias.name: alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                   for alias in node.names if alias.name.startswith(PACKAGE)}
        aliases |= {alias.asname or alias.name: f"{node.module}.{alias.name}" for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE)
                    for alias in node.names if f"{node.module}.{alias.name}" in MODULES}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                used.append(f"{module}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not used, used


def test_the_run_orchestrations_are_imported_only_by_the_entry():
    # train (the entry) -> training | evaluate | zoo.run -> run_folder, assembly, measurements, ... : nothing climbs back up.
    importers = {target: sorted(module for module, targets in _graph().items() if target in targets)
                 for target in (f"{PACKAGE}.training", f"{PACKAGE}.evaluate", f"{PACKAGE}.zoo.run", f"{PACKAGE}.train")}
    assert importers == {f"{PACKAGE}.training": [f"{PACKAGE}.train"], f"{PACKAGE}.evaluate": [f"{PACKAGE}.train"],
                         f"{PACKAGE}.zoo.run": [f"{PACKAGE}.train"], f"{PACKAGE}.train": [f"{PACKAGE}.cli"]}


def test_the_maths_modules_import_no_framework():
    # The rule of the house (docs/design.md): the maths is plain functions another project can take without Lightning,
    # Hydra or W&B. A fresh interpreter, so nothing imported by other tests can hide an import.
    maths = ["sam", "sharpness", "corruptions", "mixup", "schedule", "top1", "eval_mode", "normalization"]
    code = (f"import sys\nfor name in {maths!r}:\n    __import__('{PACKAGE}.' + name)\n"
            "frameworks = {'lightning', 'pytorch_lightning', 'hydra', 'omegaconf', 'wandb', 'submitit'}\n"
            "print(sorted(frameworks & {name.split('.')[0] for name in sys.modules}))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
