"""Layering: the preprocessing pipeline (``preprocess/``) never imports the command-line package (``synchrorama/``).

The pipeline is what Prefect workers, Docker images and other tools run; the CLI is one of its users. The check
reads the source with ``ast`` rather than importing it, so that imports inside functions (the lazy ones, which
an import-time check never sees) count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI_PACKAGE = "synchrorama"
# The repository's own top-level packages: the imports that the transitive check follows.
PROJECT_PACKAGES = ("preprocess", "tiny_models", "model", "shards", "evaluation", "flows", CLI_PACKAGE)
# Known edges into the CLI package from what preprocess/ imports, each with its reason: none (the scenes the tiny VAE
# trains on live in tiny_models.scenes); nothing may appear.
KNOWN_TRANSITIVE_EDGES: set[tuple[str, str]] = set()


def imported_modules(source: str, module: str = "", is_package: bool = False) -> set[str]:
    """Every module ``source`` imports, at any depth (module level, functions, ``if`` blocks), absolute names.

    ``from a import b`` yields ``a`` and ``a.b`` (``b`` may be a submodule); relative imports are resolved
    against ``module``; ``importlib.import_module("x")`` and ``__import__("x")`` with a literal name count too.
    """
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)] if package else []
                base = ".".join([*parent, *([base] if base else [])])
            if base:
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
            if name in ("import_module", "__import__"):
                found.add(node.args[0].value)
    return found


def _module_file(module: str) -> Path | None:
    path = ROOT.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(file: Path) -> str:
    parts = file.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports_of(file: Path) -> set[str]:
    return imported_modules(file.read_text(), _module_name(file), file.name == "__init__.py")


def _is_cli(module: str) -> bool:
    return module == CLI_PACKAGE or module.startswith(CLI_PACKAGE + ".")


def _preprocess_files() -> list[Path]:
    files = sorted((ROOT / "preprocess").rglob("*.py"))
    assert len(files) > 20, "preprocess/ not found where this test expects it"
    return files


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
    assert not any(_is_cli(name) for name in imported_modules("import synchrorama_extra\nfrom tiny_models import x"))


def test_preprocess_never_imports_the_cli_package():
    offenders = [f"{file.relative_to(ROOT)} imports {name}" for file in _preprocess_files()
                 for name in sorted(_imports_of(file)) if _is_cli(name)]
    assert not offenders, "preprocess/ must not import the CLI package:\n" + "\n".join(offenders)


def test_nothing_preprocess_imports_reaches_the_cli_package_except_the_known_edges():
    """Follows every import of the project's own packages from preprocess/ (tiny_models, model, shards, ...)."""
    seen: set[str] = set()
    pending = [_module_name(file) for file in _preprocess_files()]
    edges = set()
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        file = _module_file(module)
        if file is None:  # a name imported from a module (a function, a class), not a module of its own
            continue
        for name in _imports_of(file):
            if name.split(".")[0] not in PROJECT_PACKAGES:
                continue
            if _is_cli(name) and _module_file(name) is not None:
                edges.add((module, name))
            elif not _is_cli(name):
                pending.append(name)
    assert "tiny_models.build" in seen, "the tiny-model builders are expected to be reached from preprocess/"
    unexpected = sorted(edges - KNOWN_TRANSITIVE_EDGES)
    assert not unexpected, "modules that preprocess/ imports import the CLI package: " + ", ".join(
        f"{module} -> {name}" for module, name in unexpected)
