"""The Python layers of docs/architecture.md: no module imports from a layer above its own.

The checker reads the layer table from docs/architecture.md itself, walks every module under
python/personacore with ``ast`` (imports at module level and inside functions, relative and
absolute) and resolves each import to the module it names. Names imported from the package root
(``from .. import X``) are followed through the root's own imports, since ``personacore/__init__.py``
is the facade that re-exports every layer. A negative control plants upward imports in a copy of
the tree and checks that every one is reported. import-linter (``lint-imports``, configured in
pyproject.toml) runs too when it is installed.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "python" / "personacore"
DOC = REPO / "docs" / "architecture.md"
ROOT = "personacore"
#: modules outside the table: the facade and the entry point import every layer, by design
ABOVE_ALL = {ROOT, f"{ROOT}.__main__"}
#: the compiled engine, ``personacore._core``, is part of the engine layer ("the native module")
NATIVE = {f"{ROOT}._core": f"{ROOT}.engine"}


def doc_layers(text: str) -> Dict[str, int]:
    """``{package module name: layer number}`` from the table rows ``| N | `pkg/`, ... | ... |``."""
    layers: Dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"^\|\s*(\d+)\s*\|([^|]*)\|", line)
        if m:
            for name in re.findall(r"`([A-Za-z_][\w]*)/?`", m.group(2)):
                layers[f"{ROOT}.{name}"] = int(m.group(1))
    return layers


def module_names(package: Path) -> Dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file under ``package``."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_module(name: str, modules: Dict[str, Path]) -> bool:
    return name in modules or name in NATIVE


def imports_of(module: str, path: Path, modules: Dict[str, Path]) -> Iterator[Tuple[int, str, str]]:
    """``(line, imported module, name or "")`` for every import in ``path``, at any depth."""
    is_package = path.name == "__init__.py"
    here = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, ""
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if _is_module(sub, modules):
                    yield node.lineno, sub, ""
                else:
                    yield node.lineno, target, alias.name


def _facade_names(modules: Dict[str, Path]) -> Dict[str, str]:
    """Where each name the package root re-exports comes from (``{name: module}``)."""
    names = {}
    for _, target, name in imports_of(ROOT, modules[ROOT], modules):
        if name:
            names[name] = target
        else:
            names[target.rsplit(".", 1)[-1]] = target
    return names


def layer_of(module: str, layers: Dict[str, int]) -> Optional[int]:
    """The layer of ``module`` (its longest table prefix), None for modules outside the table."""
    module = NATIVE.get(module, module)
    best = None
    for pkg, n in layers.items():
        if module == pkg or module.startswith(pkg + "."):
            if best is None or len(pkg) > len(best[0]):
                best = (pkg, n)
    return None if best is None else best[1]


def upward_imports(package: Path, layers: Dict[str, int]) -> List[str]:
    """Every import in ``package`` of a module in a higher layer than the importer's, as
    ``"file:line: importer (layer a) imports target (layer b)"``; also modules with no layer."""
    modules = module_names(package)
    facade = _facade_names(modules) if ROOT in modules else {}
    top = max(layers.values()) + 1
    problems = []
    for module, path in modules.items():
        if module in ABOVE_ALL:
            continue
        own = layer_of(module, layers)
        if own is None:
            problems.append(f"{path}: {module} is in no layer of docs/architecture.md")
            continue
        for line, target, name in imports_of(module, path, modules):
            if target != ROOT and not target.startswith(ROOT + "."):
                continue  # the standard library or a third-party package
            if target == ROOT:  # through the facade: the name's own module, else the facade
                target = facade.get(name, ROOT) if name else ROOT
                if name and name not in facade and name.startswith("__"):
                    continue  # a constant defined by the facade itself (__version__)
            theirs = top if target in ABOVE_ALL else layer_of(target, layers)
            if theirs is not None and theirs > own:
                rel = path.relative_to(package.parent)
                what = f"{target}.{name}" if name and target == ROOT else target
                problems.append(
                    f"{rel}:{line}: {module} (layer {own}) imports {what} (layer {theirs})"
                )
    return problems


# ------------------------------------------------------------------------------------------ tests


def test_doc_table_is_read():
    layers = doc_layers(DOC.read_text())
    assert layers[f"{ROOT}.errors"] == 0 and layers[f"{ROOT}.engine"] == 1
    assert layers[f"{ROOT}.vectors"] < layers[f"{ROOT}.steering"] < layers[f"{ROOT}.judges"]
    assert layers[f"{ROOT}.judges"] < layers[f"{ROOT}.extract"] < layers[f"{ROOT}.cli"]


def test_no_module_imports_a_higher_layer():
    problems = upward_imports(PACKAGE, doc_layers(DOC.read_text()))
    assert not problems, "\n".join(problems)


def test_checker_catches_planted_upward_imports(tmp_path):
    """Negative control: a copy of the tree with upward imports of every kind planted in it."""
    copy = tmp_path / "personacore"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.pyi"))
    layers = doc_layers(DOC.read_text())
    assert upward_imports(copy, layers) == upward_imports(PACKAGE, layers)  # same tree, same result
    with open(copy / "errors.py", "a") as f:  # module level, relative, names a submodule
        f.write("\nfrom .vectors import io\n")
    with open(copy / "vectors" / "vector.py", "a") as f:  # inside a function, relative, a name
        f.write("\n\ndef _planted():\n    from ..extract.extraction import extract\n")
    with open(copy / "engine" / "specs.py", "a") as f:  # absolute, inside a method
        f.write("\n\nclass _Planted:\n    def m(self):\n        import personacore.cli.main\n")
    with open(copy / "steering" / "monitor.py", "a") as f:  # a layer's name through the facade
        f.write("\n\ndef _planted():\n    from .. import OpenAIJudge\n")
    (copy / "newpkg").mkdir()
    (copy / "newpkg" / "__init__.py").write_text("")
    found = upward_imports(copy, layers)
    expected = [
        "errors (layer 0) imports personacore.vectors.io (layer 2)",
        "personacore.vectors.vector (layer 2) imports personacore.extract.extraction (layer 5)",
        "personacore.engine.specs (layer 1) imports personacore.cli.main (layer 7)",
        "personacore.steering.monitor (layer 3) imports personacore.judges (layer 4)",
        "personacore.newpkg is in no layer",
    ]
    for e in expected:
        assert sum(e in p for p in found) == 1, (e, found)
    assert len(found) == len(expected), found


def test_lint_imports():
    pytest.importorskip("importlinter")
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports())"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "broken" in r.stdout and " 0 broken" in r.stdout
