"""The package root: every public name resolves, and the plain-Python core and the
emulator start without importing Prefect."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import prefect_journey


def _modules_loaded_by(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def _from_prefect(modules: set[str]) -> set[str]:
    return {name for name in modules if name == "prefect" or name.startswith("prefect.")}


def test_the_core_and_the_emulator_import_without_prefect() -> None:
    """Every module of the storage package is imported, so a Prefect import in any of them
    (also one no public name leads to) is caught."""
    storage = Path(prefect_journey.__file__).parent / "storage"
    storage_modules = {
        "prefect_journey.storage" + ("" if path.stem == "__init__" else f".{path.stem}")
        for path in storage.glob("*.py")
    }
    loaded = _modules_loaded_by(
        "import importlib, prefect_journey\n"
        "from prefect_journey import AsyncJourneyClient, Destination, ImagineRequest,"
        " ImagineResult, JourneyClient, JourneyError, StoredImage\n"
        "import prefect_journey.cli, prefect_journey.emulator, prefect_journey.policy\n"
        f"for name in {sorted(storage_modules)!r}:\n"
        "    importlib.import_module(name)"
    )
    assert "prefect_journey.client" in loaded and "prefect_journey.emulator.app" in loaded
    assert "prefect_journey.storage.records" in storage_modules
    assert storage_modules <= loaded
    assert _from_prefect(loaded) == set()


def test_neither_layer_imports_a_heavy_module_until_it_is_used() -> None:
    """What the start-up benchmark says of both imports: no Prefect server, Dask, s3fs, moto
    or Pillow (a thumbnail imports Pillow when it is made)."""
    from benchmarks.startup import CORE, HEAVY, PREFECT_LAYER

    for statement in (CORE, PREFECT_LAYER):
        loaded = _modules_loaded_by(statement)
        assert {name.split(".")[0] for name in loaded} & set(HEAVY) == set(), statement
        assert "prefect.server.api" not in loaded


def test_a_block_loads_prefect_when_first_asked_for() -> None:
    loaded = _modules_loaded_by("from prefect_journey import JourneyCredentials")
    assert {"prefect_journey.credentials", "prefect.blocks.core"} <= loaded
    assert "prefect_journey.destinations" not in loaded  # only what was asked for


def test_every_public_name_resolves_and_is_listed() -> None:
    for name in prefect_journey.__all__:
        value = getattr(prefect_journey, name)
        assert value.__name__ == name
    assert set(prefect_journey.__all__) <= set(dir(prefect_journey))
    assert prefect_journey.__version__


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'JourneyClinet'"):
        prefect_journey.JourneyClinet  # noqa: B018
    with pytest.raises(ImportError):
        from prefect_journey import JourneyClinet  # noqa: F401


def test_public_functions_and_classes_have_google_style_docstrings() -> None:
    """The API reference is generated from the docstrings: every public function and class
    has one, and every function with parameters documents them under ``Args:`` (an async
    twin, or a function that takes another's arguments, may say so instead)."""
    package = Path(prefect_journey.__file__).parent
    missing = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            if node.name.startswith("_") or _docstring_set_elsewhere(node):
                continue
            doc = ast.get_docstring(node) or ""
            where = f"{path.relative_to(package)}:{node.name}"
            if not doc:
                missing.append(f"{where}: no docstring")
            elif not isinstance(node, ast.ClassDef):
                named = [a.arg for a in [*node.args.args, *node.args.kwonlyargs]]
                refers = doc.startswith("Async twin of") or "same arguments" in doc
                if named and "Args:" not in doc and not refers:
                    missing.append(f"{where}: no Args section")
    assert missing == []


def _docstring_set_elsewhere(node: ast.AST) -> bool:
    # functools.wraps(..., assigned=(..., "__doc__")) gives the function another's docstring.
    decorators = getattr(node, "decorator_list", [])
    return any("__doc__" in ast.unparse(decorator) for decorator in decorators)


def test_no_module_serves_names_it_does_not_define() -> None:
    """The package was never released: a moved name moves, with no alias left behind (a
    module ``__getattr__`` or a module kept for its old path)."""
    package = Path(__file__).resolve().parent.parent / "prefect_journey"
    shims = [
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.Assign | ast.FunctionDef)
        and any(
            getattr(target, "id", None) == "__getattr__"
            for target in (node.targets if isinstance(node, ast.Assign) else [node])
        )
    ]
    assert shims == []
    for old in ("bulk", "flowkit", "campaign", "deprecations"):
        assert not (package / f"{old}.py").exists()


def _import_graph(package: Path) -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports, read from the source:
    at module level and inside functions alike; only ``if TYPE_CHECKING:`` blocks are left
    out (they never run)."""
    root = package.parent
    modules = {
        ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): path
        for path in package.rglob("*.py")
    }

    def resolved(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]  # a name defined in a module, not a module
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        here = module if is_package else module.rpartition(".")[0]
        found: set[str] = set()
        stack: list[ast.AST] = [ast.parse(path.read_text())]
        while stack:
            node = stack.pop()
            if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
                stack.extend(node.orelse)
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                    base = f"{parent}.{base}" if base else parent
                found.update(f"{base}.{alias.name}" for alias in node.names)
            stack.extend(ast.iter_child_nodes(node))
        targets = {resolved(name) for name in found if name.split(".")[0] == package.name}
        graph[module] = {target for target in targets if target and target != module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` as the path that goes round it; empty when there is none."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str]:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return []
        path.append(module)
        for target in sorted(graph[module]):
            if cycle := visit(target):
                return cycle
        path.pop()
        done.add(module)
        return []

    for module in sorted(graph):
        if cycle := visit(module):
            return cycle
    return []


def test_the_package_has_no_import_cycle() -> None:
    """Every import of a package module, also one inside a function, goes one way: the
    data's path through the modules is one-directional."""
    package = Path(prefect_journey.__file__).parent
    graph = _import_graph(package)
    assert "prefect_journey.generation" in graph["prefect_journey.tasks"]  # the graph is read
    cycle = _cycle(graph)
    assert cycle == [], " -> ".join(cycle)


def test_the_import_graph_sees_imports_inside_functions(tmp_path: Path) -> None:
    package = tmp_path / "prefect_journey"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from prefect_journey.b import g\n")
    (package / "b.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import c\n"
        "if TYPE_CHECKING:\n    from prefect_journey import a\n"
    )
    (package / "c.py").write_text("import prefect_journey.a\n")
    graph = _import_graph(package)
    assert graph["prefect_journey.b"] == {"prefect_journey.c"}
    assert _cycle(graph) == [
        "prefect_journey.a",
        "prefect_journey.b",
        "prefect_journey.c",
        "prefect_journey.a",
    ]
