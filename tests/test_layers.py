"""The package's layers hold: no module imports a stage above its own (ARCHITECTURE.md gives the order).

Every import statement is walked, those inside functions too, so a lazy import that runs upward is caught.
"""

from __future__ import annotations

import ast
from pathlib import Path

import bottleneck

PACKAGE = Path(bottleneck.__file__).parent
#: Bottom to top; a module may import its own layer and those below. The bottom modules import only each other.
LAYERS = (
    ("bounds", "errors", "fs", "naming", "quiet", "text"),
    ("backbones",),
    ("features",),
    ("learn",),
    ("use",),
    ("inspect",),
    ("api", "demo"),
    ("cli",),
    ("__init__", "__main__"),
)


def _layer(name: str) -> int:
    for number, names in enumerate(LAYERS):
        if name in names:
            return number
    raise AssertionError(f"bottleneck.{name} has no layer: add it to tests/test_layers.py and ARCHITECTURE.md")


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "bottleneck":  # `from bottleneck import naming`
                found += [(node.lineno, f"bottleneck.{alias.name}") for alias in node.names]
    return found


def upward_imports() -> list[str]:
    """'path:line: stage imports bottleneck.x' for every import of a layer above the importing module's."""
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = path.relative_to(PACKAGE).with_suffix("").parts[0]
        for line, name in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            parts = name.split(".")
            if parts[0] != "bottleneck" or len(parts) < 2 or parts[1] == "__version__":
                continue
            if _layer(parts[1]) > _layer(own):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {own} imports {name}")
    return upward


def test_no_module_imports_a_layer_above_its_own():
    assert upward_imports() == []


def test_the_walk_sees_imports_inside_functions(tmp_path):
    tree = ast.parse("def f():\n    from bottleneck.cli import main\n")
    assert _imports(tree) == [(2, "bottleneck.cli")]
    assert _layer("cli") > _layer("backbones") > _layer("fs")
