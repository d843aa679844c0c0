"""Every dotted name the docs and docstrings cite in backticks (`analysis.calibration`, `loop.fit`,
`cifar_transfer.data.folder.read_labelled_folder`) resolves to a module or an attribute of one: a
rename that leaves a citation behind fails here."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
from pathlib import Path

import pytest

from cifar_transfer.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "cifar_transfer"
CITED = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+)(?:\([^`]*\))?`")
FILES = {
    "json",
    "csv",
    "png",
    "md",
    "py",
    "html",
    "safetensors",
    "pt",
    "npz",
    "npy",
    "toml",
    "onnx",
    "txt",
    "db",
}
RECIPE_FIELDS = {f.name for f in dataclasses.fields(Recipe)}
SUBPACKAGES = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
MODULES = {p.stem for p in PACKAGE.rglob("*.py")} | set(SUBPACKAGES) | {"cifar_transfer"}
# where a cited name may start
PACKAGES = [
    "cifar_transfer",
    *(f"cifar_transfer.{p}" for p in SUBPACKAGES),
]


def resolves(name: str, package: str) -> bool:
    """`name` as an attribute path below `package` (a module's own package, then cifar_transfer
    itself); a recipe's field (`recipe.seed`) is an attribute of every Recipe."""
    parts = name.split(".")
    if parts[0] == "recipe" and len(parts) == 2 and parts[1] in RECIPE_FIELDS:
        return True
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(f"{package}.{'.'.join(parts[:k])}")
        except ImportError:
            continue
        try:
            for attr in parts[k:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def citations(text: str) -> set[str]:
    """Dotted names in backticks that start at a module of this package (not file names, not
    `ct.run`)."""
    names = {m.group(1).removeprefix("cifar_transfer.") for m in CITED.finditer(text)}
    return {
        n
        for n in names
        if n.split(".")[-1] not in FILES and n.split(".")[0] in MODULES - {"__init__"}
    }


def docstrings(path: Path) -> str:
    tree = ast.parse(path.read_text())
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef))]
    return "\n".join(ast.get_docstring(n) or "" for n in nodes)


SOURCES = sorted([*(ROOT / "docs").glob("*.md"), ROOT / "README.md", *PACKAGE.rglob("*.py")])


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_name_resolves(path):
    text = docstrings(path) if path.suffix == ".py" else path.read_text()
    missing = [
        n for n in sorted(citations(text)) if not any(resolves(n, package) for package in PACKAGES)
    ]
    assert not missing, (
        f"{path.relative_to(ROOT)} cites names that do not exist: {', '.join(missing)}"
    )
