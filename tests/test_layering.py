"""Layering: no module that the optimizer builds on imports the optimizer back (DESIGN.md §3.2).

The import graph is read from the sources (every relative `import`, also those under
`TYPE_CHECKING` and inside functions), so a lazy import back into `optimizer.py` counts too.
"""

import ast
from pathlib import Path

import asft_optim

PACKAGE = Path(asft_optim.__file__).parent


def _module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The package modules that `path` imports relatively (`from .x import y`, `from . import x`)."""
    here = _module_of(path).split(".") if _module_of(path) else []
    package = here if path.name == "__init__.py" else here[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        base = package[:len(package) - (node.level - 1)]
        if node.module:
            out.add(".".join(base + node.module.split(".")))
        else:
            out.update(".".join(base + [alias.name]) for alias in node.names)
    return out


def test_no_module_below_the_optimizer_imports_it():
    graph = {_module_of(p): _imports(p) for p in PACKAGE.rglob("*.py")}
    below, todo = set(), ["optimizer"]
    while todo:  # everything optimizer.py imports, transitively
        for dep in graph.get(todo.pop(), ()):
            if dep not in below:
                below.add(dep)
                todo.append(dep)
    importers = sorted(m for m in below if "optimizer" in graph.get(m, ()))
    assert not importers, f"modules below optimizer.py import it back: {importers}"
