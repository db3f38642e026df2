"""The layers point one way, and the data layer holds no model code."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# what each layer may import from t2c (besides itself): service -> query -> data, service -> indexer -> data
ALLOWED = {
    "data": {"data"},
    "indexer": {"indexer", "data"},
    "query": {"query", "data", "indexer"},
    "service": {"service", "query", "indexer", "data"},
}
HEAVY = {"torch", "torchvision", "timm", "open_clip"}


def _imports(path: Path) -> set[str]:
    """Every module name a file imports (at any depth, including deferred imports in functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_what_it_may(layer):
    bad = []
    for path in sorted((REPO / layer).rglob("*.py")):
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "t2c" and len(parts) > 1 and parts[1] in ALLOWED and parts[1] not in ALLOWED[layer]:
                bad.append(f"{path.relative_to(REPO)}: {name}")
    assert not bad, bad


def test_data_layer_has_no_model_code():
    """torch and friends are the indexer's business: data/ keeps the store, sources, generator and vocabulary."""
    bad = [f"{p.relative_to(REPO)}: {n}" for p in sorted((REPO / "data").rglob("*.py"))
           for n in _imports(p) if n.split(".")[0] in HEAVY]
    assert not bad, bad
    assert not list((REPO / "data").rglob("*.safetensors"))
