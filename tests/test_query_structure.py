"""The query package's shape: one dispatch over the tree (a new scored leaf needs no other change) and short functions."""
from __future__ import annotations

import ast as pyast
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from t2c.data.errors import InvalidInput
from t2c.query import ast as qa
from t2c.query.engine import _necessary_positive, evaluate_tree
from t2c.query.parse import parse
from t2c.query.sql import compile_filter

QUERY_DIR = Path(__file__).resolve().parents[1] / "query"


@dataclass(frozen=True)
class Tag(qa.Scored):
    """A test-only scored leaf, defined outside the package: the walkers must handle it unchanged."""

    text: str
    weight: float = 1.0
    threshold: float | None = None
    kind = "tag"


def test_new_scored_leaf_flows_through_every_walker():
    t = Tag("x")
    tree = qa.And((t, qa.Not(qa.Or((qa.Concept("dog"), qa.Filter("width", ">", 3))))))
    assert qa.scored(tree) == [t, qa.Concept("dog")]
    assert qa.scored_with_polarity(tree) == [(t, True), (qa.Concept("dog"), False)]
    assert qa.concepts(tree) == [qa.Concept("dog")]
    assert not qa.is_pure_filter(t)
    assert qa.split(qa.And((t, qa.Filter("width", ">", 3)))) == (qa.Filter("width", ">", 3), t)
    assert list(_necessary_positive(tree).values()) == [t]
    passes = {t: np.array([True, True, False]), qa.Concept("dog"): np.array([False, False, True])}
    width = np.array([True, False, False])
    got = evaluate_tree(tree, lambda leaf: passes[leaf], lambda f: width, 3)
    assert got.tolist() == [False, True, False]
    with pytest.raises(InvalidInput, match="filter-only tree, found the tag 'x'"):
        compile_filter(t, {"width": "INTEGER"})


def test_visitor_dispatch_prefers_the_most_specific_method_and_rejects_non_nodes():
    class V(qa.Visitor):
        def visit_scored(self, n):
            return "scored"

        def visit_concept(self, n):
            return "concept"

        def visit_bool(self, n):
            return "bool"

    v = V()
    assert v.visit(qa.Concept("a")) == "concept"
    assert v.visit(Tag("a")) == "scored"
    assert v.visit(parse("a OR b")) == "bool" and v.visit(parse("a AND b")) == "bool"
    with pytest.raises(InvalidInput, match="not a query node"):
        v.visit(qa.Filter("w", "=", 1))  # no visit_filter / visit_leaf / visit_node
    with pytest.raises(InvalidInput, match="not a query node: str"):
        v.visit("a")


def test_no_function_in_query_is_longer_than_80_lines():
    long = []
    for p in sorted(QUERY_DIR.rglob("*.py")):
        for n in pyast.walk(pyast.parse(p.read_text())):
            if isinstance(n, (pyast.FunctionDef, pyast.AsyncFunctionDef)) and n.end_lineno - n.lineno >= 80:
                long.append(f"{p.name}:{n.name} ({n.end_lineno - n.lineno + 1} lines)")
    assert not long, long
