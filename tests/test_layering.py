"""The package's layers import downwards only, and the seams the design names hold.

Layers, top to bottom (docs/design.md, "Layers")::

    api -> training -> build -> eval -> inference / convert -> models -> parallel -> data -> config -> io / accelerator

A module may import from its own layer or any layer below it, never above (function-level
imports included: a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "blip2_megatron"
LAYERS = [
    ["api"],
    ["training"],
    ["build"],
    ["eval", "chat"],
    ["inference", "convert"],
    ["models"],
    ["parallel"],
    ["data", "configs"],
    ["config"],
    ["io", "accelerator"],
]
RANK = {name: index for index, names in enumerate(LAYERS) for name in names}


def _layer_of_module(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "blip2_megatron" or len(parts) < 2:
        return None
    return parts[1]


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return found


def _package_files() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE]


def test_every_package_module_belongs_to_a_layer():
    names = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in _package_files()}
    assert names <= set(RANK), f"modules outside the layer map: {sorted(names - set(RANK))}"


@pytest.mark.parametrize("path", _package_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_downwards(path):
    own = RANK[path.relative_to(PACKAGE).parts[0].removesuffix(".py")]
    upward = [
        f"line {line}: {module}"
        for line, module in _imports(path)
        if (layer := _layer_of_module(module)) is not None and RANK[layer] < own
    ]
    assert not upward, f"{path.relative_to(REPO)} imports from a higher layer: {upward}"


def test_models_neither_tokenize_nor_read_files():
    """Models receive tensors: no tokenizer, no file I/O, no DeepSpeed under models/."""
    forbidden = ("tokenizer", "open(", "read_text", "read_bytes", "torch.load", "safe_open", "deepspeed")
    offenders = []
    for path in (PACKAGE / "models").rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if any(word in code for word in forbidden) and not code.strip().startswith(('"', "'")):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_deepspeed_initialize_has_one_call_site():
    calls = [
        f"{path.relative_to(REPO)}:{number}"
        for folder in ("blip2_megatron", "launch", "data_tools")
        for path in (REPO / folder).rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "deepspeed.initialize(" in line
    ]
    assert len(calls) == 1 and calls[0].startswith("blip2_megatron/training/engine.py"), calls


def test_the_readme_python_lines_import():
    """The package root exports exactly what the README's Python block imports."""
    import blip2_megatron

    readme = (REPO / "README.md").read_text()
    imports = [
        line.strip() for line in readme.splitlines() if line.strip().startswith("from blip2_megatron import")
    ]
    assert imports, "the README shows no Python import of the package"
    for line in imports:
        names = [n.strip() for n in line.split("import", 1)[1].split(",")]
        for name in names:
            assert name in blip2_megatron.__all__, (
                f"README imports {name}, which the package root does not export"
            )
            assert getattr(blip2_megatron, name) is not None
