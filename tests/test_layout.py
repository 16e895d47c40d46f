"""The README's "How the code is laid out" is true: every module is listed, and each imports only modules listed
above it (arrows point down), so the layering is checked, not just described."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "gkd"


def _layout_order() -> list[str]:
    """Module names (``divergences``, ``tasks``, ``experiments``, ...) in the order the README lists them."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## How the code is laid out", 1)[1].split("```", 2)[1]
    order: list[str] = []
    for line in block.splitlines():
        for name in re.findall(
            r"([a-z_]+)(?:\.py|/)", line.split("  ", 2)[1] if line.startswith("  ") else ""
        ):
            if name not in order and name not in ("src", "gkd"):
                order.append(name)
    return order


def _top(module: str) -> str:
    """``gkd.tasks.base`` -> ``tasks``; ``gkd.step`` -> ``step``."""
    return module.split(".")[1]


def _imports(path: Path, type_only: bool = False) -> set[str]:
    """gkd modules imported by ``path`` at run time, function-local imports included; with ``type_only``, the imports
    under ``if TYPE_CHECKING:`` as well (they inform type checkers only, but a cycle through them is still a cycle
    for a reader)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if not type_only and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gkd."):
            found.add(_top(node.module))
        elif isinstance(node, ast.ImportFrom) and node.module == "gkd":
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(_top(a.name) for a in node.names if a.name.startswith("gkd."))
    return found


def test_every_module_is_in_the_readme_layout():
    order = _layout_order()
    modules = {p.stem for p in SRC.glob("*.py") if p.stem != "__init__"} | {
        p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()
    }
    assert modules <= set(order), f"not in the README layout: {sorted(modules - set(order))}"


@pytest.mark.parametrize("type_only", [False, True], ids=["run time", "type-only included"])
def test_each_module_imports_only_modules_listed_above_it(type_only):
    """Arrows point down only, so there is no import cycle between gkd's modules, type-only imports included."""
    order = _layout_order()
    rank = {name: i for i, name in enumerate(order)}
    upward = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        me = rel.parts[0] if len(rel.parts) > 1 else path.stem
        if me == "__init__":
            continue
        for dep in _imports(path, type_only=type_only):
            if dep in rank and me in rank and dep != me and rank[dep] > rank[me]:
                upward.append(f"{rel} imports gkd.{dep}")
    assert not upward, "imports that point up the layout: " + "; ".join(upward)


# Modules gkd imports from torch that are not in every torch release, with the first release that has them.
_TORCH_SINCE = {
    "torch.distributed.fsdp.fully_shard": (2, 6),
    "torch.distributed.fsdp.register_fsdp_forward_method": (2, 6),
    "torch.distributed.tensor.DTensor": (2, 5),
    "torch.distributed.tensor.distribute_tensor": (2, 5),
}


def test_the_lowest_torch_in_pyproject_has_every_torch_import_of_gkd():
    """pyproject's lower bound for torch is a release where every ``from torch... import name`` of gkd exists."""
    root = Path(__file__).resolve().parent.parent
    spec = re.search(r'"torch>=(\d+)\.(\d+)', (root / "pyproject.toml").read_text())
    assert spec is not None
    lowest = (int(spec.group(1)), int(spec.group(2)))
    used = set()
    for path in (root / "src" / "gkd").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
                used |= {f"{node.module}.{alias.name}" for alias in node.names}
    assert "torch.distributed.fsdp.fully_shard" in used
    for name in used:
        since = _TORCH_SINCE.get(name, (2, 0))
        assert lowest >= since, f"gkd imports {name} (torch >= {since}), but pyproject allows torch {lowest}"
