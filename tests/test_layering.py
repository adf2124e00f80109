"""Layering: the project's imports point down the layers, make no cycles, and no folder is crowded.

The pipeline is what Prefect workers, Docker images and other tools run; the CLI, the flows and the test-model
builders are its users, so it never imports them. The source is read with ``ast``, not imported, so that lazy imports
inside functions count too (``if TYPE_CHECKING:`` ones do not: only a type checker runs them). Each check is a
function of a root folder, run on the repository and on a planted project that breaks every rule.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top; a module may import its own layer or lower. shards (the stored format) sits at the bottom;
# preprocess and model above it (they share code both ways); evaluation above model (it scores what model makes);
# tiny_models are test-model builders registered by the CLI and the tests, never imported by stages; flows and
# the CLI (synchrorama) on top, with the other users of everything below (benchmarks, tests, scripts).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("shards",),
    ("preprocess", "model"),
    ("evaluation",),
    ("tiny_models",),
    ("flows", "synchrorama", "benchmarks", "tests", "scripts"),
)
# The packages whose modules must not import each other in a circle.
GRAPH_PACKAGES = ("shards", "preprocess", "model", "evaluation", "tiny_models", "flows", "synchrorama")
# A folder with more modules than this wants subpackages: it is where one looks for a stage's code.
SIZED_FOLDERS = ("preprocess", "model", "shards", "evaluation", "flows")
MAX_MODULES_PER_FOLDER = 16
# What the pipeline stages never import, said by name (the layers imply it) for a readable failure.
PIPELINE_PACKAGES = ("preprocess", "model")
PIPELINE_USERS = ("synchrorama", "flows", "tiny_models")


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node at any depth, except the bodies of ``if TYPE_CHECKING:`` (their ``else`` runs, so it counts)."""
    pending = [tree]
    while pending:
        node = pending.pop()
        yield node
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            pending.extend(node.orelse)
        else:
            pending.extend(ast.iter_child_nodes(node))


def _import_statements(source: str, module: str, is_package: bool) -> Iterator[tuple[str, list[str]]]:
    """(module, imported names) per import: ``import a.b`` -> ("a.b", []), ``from a import b, c`` -> ("a", [b, c])."""
    package = module if is_package else module.rpartition(".")[0]
    for node in _runtime_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from ((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)] if package else []
                base = ".".join([*parent, *([base] if base else [])])
            if base:
                yield base, [alias.name for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
            if name in ("import_module", "__import__"):
                yield node.args[0].value, []


def imported_modules(source: str, module: str = "", is_package: bool = False) -> set[str]:
    """Every module ``source`` imports, at any depth (module level, functions, ``if`` blocks), absolute names.

    ``from a import b`` yields ``a`` and ``a.b`` (``b`` may be a submodule); relative imports are resolved
    against ``module``; ``importlib.import_module("x")`` and ``__import__("x")`` with a literal name count too.
    """
    found: set[str] = set()
    for base, names in _import_statements(source, module, is_package):
        found.add(base)
        found.update(f"{base}.{name}" for name in names)
    return found


def imported_targets(source: str, module: str = "", is_package: bool = False) -> set[str]:
    """The most specific name each import means: ``from a import b`` -> ``a.b`` alone (not ``a``), so that the
    graph gets no edge to a package's ``__init__`` that the import does not need (those make false cycles)."""
    return {target for base, names in _import_statements(source, module, is_package)
            for target in ([f"{base}.{name}" for name in names] or [base])}


def module_name(root: Path, file: Path) -> str:
    parts = file.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_file(root: Path, module: str) -> Path | None:
    path = root.joinpath(*module.split("."))
    return next((file for file in (path.with_suffix(".py"), path / "__init__.py") if file.is_file()), None)


def resolve(root: Path, name: str) -> str | None:
    """The deepest existing module ``name`` means: ``a.b.c`` if that file exists, else ``a.b`` (c is a name), ..."""
    parts = name.split(".")
    while parts and module_file(root, ".".join(parts)) is None:
        parts.pop()
    return ".".join(parts) or None


def package_files(root: Path, packages: tuple[str, ...]) -> list[Path]:
    return sorted(file for package in packages for file in (root / package).rglob("*.py"))


def resolved_imports(root: Path, file: Path, packages: tuple[str, ...]) -> list[str]:
    """The modules ``file`` imports from ``packages`` (stdlib and third party are not ours to layer), resolved."""
    targets = imported_targets(file.read_text(), module_name(root, file), file.name == "__init__.py")
    return sorted({resolve(root, name) or name for name in targets if name.split(".")[0] in packages})


def module_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """module -> the project modules it imports, each resolved to the most specific module file that exists."""
    graph: dict[str, set[str]] = {}
    for file in package_files(root, packages):
        module = module_name(root, file)
        graph[module] = {target for target in resolved_imports(root, file, packages)
                         if target != module and module_file(root, target)}
    return graph


def upward_imports(root: Path, layers: tuple[tuple[str, ...], ...]) -> list[str]:
    """``file: imports module`` for every import from a layer to a higher one (the top layer may import anything)."""
    layer_of = {package: level for level, packages in enumerate(layers) for package in packages}
    return [f"{file.relative_to(root).as_posix()}: imports {name}"
            for level, packages in enumerate(layers[:-1]) for file in package_files(root, packages)
            for name in resolved_imports(root, file, tuple(layer_of)) if layer_of[name.split(".")[0]] > level]


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted; self-edges never count."""
    index: dict[str, int] = {}  # visiting order
    lowest: dict[str, int] = {}  # the earliest module on the stack reachable from this one
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = lowest[module] = len(index)
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if target not in index:
                visit(target)
                lowest[module] = min(lowest[module], lowest[target])
            elif target in stack:
                lowest[module] = min(lowest[module], index[target])
        if lowest[module] == index[module]:  # module is the first of its component that was visited
            component = stack[stack.index(module):]
            del stack[stack.index(module):]
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(cycles)


def oversized_folders(root: Path, folders: tuple[str, ...], limit: int) -> list[str]:
    counts = {folder: sum(1 for file in folder.glob("*.py") if file.name != "__init__.py")
              for top in folders for folder in [root / top, *(root / top).rglob("*")] if folder.is_dir()}
    return [f"{folder.relative_to(root).as_posix()}/: {count} modules" for folder, count in sorted(counts.items())
            if count > limit]


def _plant(root: Path, files: dict[str, str]) -> Path:
    for name, source in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(source)
    return root


def test_the_import_reader_sees_lazy_relative_and_dynamic_imports():
    source = '''
import json
def load():
    from synchrorama.tiny_models import build_tiny_models
    if True:
        import synchrorama.cli as cli
    return importlib.import_module("synchrorama.report")
from . import sibling
from ..shards import schema
'''
    found = imported_modules(source, "preprocess.sub.stage")
    assert {"synchrorama.tiny_models", "synchrorama.tiny_models.build_tiny_models", "synchrorama.cli",
            "synchrorama.report", "preprocess.sub.sibling", "preprocess.shards.schema", "json"} <= found
    assert imported_targets("from a.b import c, d\nfrom e import *") == {"a.b.c", "a.b.d", "e"}


def test_the_import_reader_ignores_imports_only_a_type_checker_runs():
    source = '''
import typing
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from synchrorama.cli import main
if typing.TYPE_CHECKING:
    import flows.run
else:
    import shards.schema
'''
    found = imported_modules(source)
    assert "shards.schema" in found
    assert not any(name.startswith(("synchrorama", "flows")) for name in found)


def test_planted_upward_imports_and_cycles_are_caught(tmp_path: Path):
    root = _plant(tmp_path, {
        "shards/__init__.py": "",
        "shards/a.py": "import preprocess.x\n",
        # The package imports its module, which imports a sibling by `from preprocess import y`: an edge to the
        # __init__ there would make a false cycle preprocess <-> preprocess.x.
        "preprocess/__init__.py": "from preprocess.x import run\n",
        "preprocess/x.py": "from preprocess import y\nimport shards\ndef run():\n    pass\n",
        "preprocess/y.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tiny_models import build\n"
                           "def load():\n    from . import x  # lazy, relative: the other half of the cycle\n",
        "model/z.py": "from preprocess.x import run\n",
        "tiny_models/build.py": "",
        "flows/f.py": "import tiny_models.build\nimport model.z\n",
    })
    assert upward_imports(root, LAYERS) == ["shards/a.py: imports preprocess.x"]
    graph = module_graph(root, GRAPH_PACKAGES)
    assert graph["preprocess.x"] == {"preprocess.y", "shards"} and graph["model.z"] == {"preprocess.x"}
    assert import_cycles(graph) == [["preprocess.x", "preprocess.y"]]


def test_planted_crowded_folder_is_caught(tmp_path: Path):
    files = {f"model/sub/m{number}.py": "" for number in range(MAX_MODULES_PER_FOLDER + 1)}
    root = _plant(tmp_path, {**files, "model/__init__.py": "", "model/sub/__init__.py": "", "shards/one.py": ""})
    assert oversized_folders(root, SIZED_FOLDERS, MAX_MODULES_PER_FOLDER) == ["model/sub/: 17 modules"]


def test_layers_never_point_up():
    assert len(package_files(ROOT, ("preprocess",))) > 20, "preprocess/ not found where this test expects it"
    upward = upward_imports(ROOT, LAYERS)
    assert not upward, "imports from a lower layer to a higher one (see LAYERS):\n" + "\n".join(upward)


def test_no_import_cycles_between_modules():
    graph = module_graph(ROOT, GRAPH_PACKAGES)
    assert {"shards", "preprocess", "model", "flows"} <= set(graph), "the project packages are not where expected"
    cycles = import_cycles(graph)
    assert not cycles, "modules that import each other in a circle:\n" + "\n".join(
        ", ".join(cycle) + "".join(f"\n    {module} -> {target}" for module in cycle
                                   for target in sorted(graph[module]) if target in cycle) for cycle in cycles)


def test_no_folder_holds_more_than_sixteen_modules():
    crowded = oversized_folders(ROOT, SIZED_FOLDERS, MAX_MODULES_PER_FOLDER)
    assert not crowded, f"folders over {MAX_MODULES_PER_FOLDER} modules; split them:\n" + "\n".join(crowded)


def test_the_pipeline_never_imports_its_users():
    offenders = [f"{file.relative_to(ROOT).as_posix()} imports {name}"
                 for file in package_files(ROOT, PIPELINE_PACKAGES)
                 for name in resolved_imports(ROOT, file, PIPELINE_USERS)]
    assert not offenders, ("preprocess/ and model/ are run by workers and images without the CLI, the flows or the "
                           "test-model builders, so they never import them:\n" + "\n".join(offenders))
