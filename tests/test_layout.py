"""The tree tells the pipeline: each stage imports only the stages before it, and jobs never import
each other.

Read from the source with `ast`, so a new import that breaks the order fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cifar_transfer"
# Lowest first; a module may import its own layer and those below it.
LAYERS = [
    {"errors", "atomic", "runfolder", "recipe", "machine"},
    {"data"},
    {"model"},
    {"training"},
    {"analysis"},
    {"reporting"},
    {"serving"},
    {"jobs"},
    {"api"},
    {"cli", "__main__", "__init__"},
]


def layer(name: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if name in names)


def imports(path: Path) -> set[str]:
    """The project modules `path` imports (relative imports resolved), as dotted names below
    cifar_transfer."""
    here = path.relative_to(PACKAGE).with_suffix("").parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(here[: len(here) - node.level])
            target = [*base, *node.module.split(".")] if node.module else base
            found |= {
                ".".join([*target, a.name]) if not node.module else ".".join(target)
                for a in node.names
            }
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_nothing_imports_upward_and_jobs_import_no_job(path):
    mine = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    for target in imports(path):
        top = target.split(".")[0]
        assert layer(top) <= layer(mine), f"{path.name} ({mine}) imports {target}, a later stage"
        if mine == "jobs" and top == "jobs":
            assert target.split(".")[1] == path.stem, (
                f"job {path.stem} imports another job: {target}"
            )


def test_every_module_is_in_a_layer():
    for path in MODULES:
        layer(path.relative_to(PACKAGE).parts[0].removesuffix(".py"))  # raises StopIteration if not
