"""Query tree: frozen dataclasses for concepts, metadata filters and AND / OR / NOT, plus a strict JSON form.

Node types
    Concept(text, weight=1.0, threshold=None)   a text constraint ("red circle"), scored by cosine similarity
    Filter(column, op, value)                   a metadata constraint on a catalog column (``width>=512``)
    And(children) / Or(children)                n-ary, at least two children, nested same-type nodes flattened
    Not(child)

JSON form (``to_json`` / ``from_json``)::

    {"type": "concept", "text": "sunset", "weight": 2.0, "threshold": 0.3}
    {"type": "filter", "column": "width", "op": ">=", "value": 512, "value_type": "int"}
    {"type": "filter", "column": "added", "op": ">", "value": "2026-01-01", "value_type": "date"}
    {"type": "and", "children": [...]}   {"type": "or", "children": [...]}   {"type": "not", "child": {...}}

``value_type`` is one of "string", "int", "float", "date", "datetime"; ``from_json`` infers it from the JSON
type when absent (so dates must name it). ``weight`` and ``threshold`` are optional in ``from_json``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Iterator, Union

from t2c.data.errors import InvalidInput

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
KEYWORDS = frozenset({"AND", "OR", "NOT"})
#: Filter operators as stored in the tree (``==`` is accepted on input and normalised to ``=``).
FILTER_OPS = ("=", "!=", "<", "<=", ">", ">=", ":")
MAX_WEIGHT = 100.0
MAX_DEPTH = 64

FilterValue = Union[str, int, float, date, datetime]


def _bad(message: str) -> InvalidInput:
    return InvalidInput(message)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class Concept:
    """A text constraint: met when the image's concept score passes its (calibrated or given) threshold."""

    text: str
    weight: float = 1.0
    threshold: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise _bad(f"concept text must be a non-empty string, got {self.text!r}")
        if not _is_number(self.weight) or not math.isfinite(self.weight) or not 0 < self.weight <= MAX_WEIGHT:
            raise _bad(f"concept weight must be a number in (0, {MAX_WEIGHT:g}], got {self.weight!r}")
        object.__setattr__(self, "weight", float(self.weight))
        if self.threshold is not None:
            t = self.threshold
            if not _is_number(t) or not math.isfinite(t) or not -1.0 <= t <= 1.0:
                raise _bad(f"concept threshold must be a number in [-1, 1] (a cosine score), got {t!r}")
            object.__setattr__(self, "threshold", float(t))


@dataclass(frozen=True)
class Filter:
    """A metadata constraint ``column op value`` on a catalog column; ``:`` is a glob match (``*``, ``?``, ``[..]``)."""

    column: str
    op: str
    value: FilterValue

    def __post_init__(self) -> None:
        if not isinstance(self.column, str) or not IDENTIFIER.match(self.column) or self.column in KEYWORDS:
            raise _bad(f"column name must be an identifier ([A-Za-z_][A-Za-z0-9_]*, not AND/OR/NOT), "
                       f"got {self.column!r}")
        op = "=" if self.op == "==" else self.op
        if op not in FILTER_OPS:
            raise _bad(f"filter operator must be one of {', '.join(FILTER_OPS)} or ==, got {self.op!r}")
        object.__setattr__(self, "op", op)
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (str, int, float, date)):
            raise _bad(f"filter value must be a string, number or date, got {type(v).__name__}")
        if isinstance(v, float) and not math.isfinite(v):
            raise _bad(f"filter value must be a finite number, got {v!r}")
        if isinstance(v, datetime) and v.tzinfo is not None:
            raise _bad("filter datetimes must be naive (no time zone)")
        if op == ":" and not isinstance(v, str):
            raise _bad(f"a ':' (glob) filter needs a string pattern, got {v!r}")


def _flatten(kind: type, children: Any) -> tuple:
    if isinstance(children, (str, bytes, dict, *_NODE_TYPES)) or not hasattr(children, "__iter__"):
        raise _bad(f"{kind.__name__} children must be a sequence of nodes")
    out: list = []
    for c in children:
        if not isinstance(c, _NODE_TYPES):
            raise _bad(f"{kind.__name__} children must be query nodes, got {type(c).__name__}")
        out.extend(c.children if type(c) is kind else (c,))
    if len(out) < 2:
        raise _bad(f"{kind.__name__} needs at least two children, got {len(out)}")
    return tuple(out)


@dataclass(frozen=True)
class And:
    """All children must hold. Nested ``And`` children are flattened into this one."""

    children: tuple

    def __post_init__(self) -> None:
        object.__setattr__(self, "children", _flatten(And, self.children))


@dataclass(frozen=True)
class Or:
    """At least one child must hold. Nested ``Or`` children are flattened into this one."""

    children: tuple

    def __post_init__(self) -> None:
        object.__setattr__(self, "children", _flatten(Or, self.children))


@dataclass(frozen=True)
class Not:
    """The child must not hold."""

    child: "Node"

    def __post_init__(self) -> None:
        if not isinstance(self.child, _NODE_TYPES):
            raise _bad(f"Not child must be a query node, got {type(self.child).__name__}")


Node = Union[Concept, Filter, And, Or, Not]
_NODE_TYPES = (Concept, Filter, And, Or, Not)


def conj(nodes) -> "Node | None":
    """AND of `nodes`: None when empty, the node itself when one, else a flattened And."""
    nodes = list(nodes)
    return None if not nodes else nodes[0] if len(nodes) == 1 else And(tuple(nodes))


def disj(nodes) -> "Node | None":
    """OR of `nodes`: None when empty, the node itself when one, else a flattened Or."""
    nodes = list(nodes)
    return None if not nodes else nodes[0] if len(nodes) == 1 else Or(tuple(nodes))


# ---------------------------------------------------------------------------------------------- walking
def walk(node: Node) -> Iterator[Node]:
    """All nodes of the tree, pre-order, left to right."""
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        if isinstance(n, (And, Or)):
            stack.extend(reversed(n.children))
        elif isinstance(n, Not):
            stack.append(n.child)


def concepts(node: Node) -> list[Concept]:
    """Every Concept leaf, left to right (duplicates kept)."""
    return [n for n in walk(node) if isinstance(n, Concept)]


def filters(node: Node) -> list[Filter]:
    """Every Filter leaf, left to right (duplicates kept)."""
    return [n for n in walk(node) if isinstance(n, Filter)]


def concepts_with_polarity(node: Node) -> list[tuple[Concept, bool]]:
    """Every Concept leaf with True when it sits under an even number of NOTs (a positive constraint)."""
    out: list[tuple[Concept, bool]] = []
    stack: list[tuple[Node, bool]] = [(node, True)]
    while stack:
        n, pos = stack.pop()
        if isinstance(n, Concept):
            out.append((n, pos))
        elif isinstance(n, (And, Or)):
            stack.extend((c, pos) for c in reversed(n.children))
        elif isinstance(n, Not):
            stack.append((n.child, not pos))
    return out


def is_pure_filter(node: Node) -> bool:
    """True when the tree holds only Filter leaves (no Concept)."""
    return not any(isinstance(n, Concept) for n in walk(node))


def split(node: Node) -> tuple["Node | None", "Node | None"]:
    """Separate the pure-filter conjuncts from the rest: ``node == AND(filter_part, rest)``.

    Returns ``(filter_part, rest)``; either may be None. A pure-filter tree gives ``(node, None)``; an And gives
    its concept-free children (joined by AND) and the others; any other tree (an Or or Not mixing filters
    with concepts, or a lone concept) gives ``(None, node)``. The filter part can be compiled with
    ``t2c.query.sql.compile_filter`` and used as a WHERE prefilter; filters left inside ``rest`` must be evaluated
    per id as boolean columns (``t2c.query.sql.compile_filter_expr``).

    Example:
        ``split(parse("dog AND width>100 AND NOT (cat OR height<5)"))`` gives
        ``(Filter("width", ">", 100), And((Concept("dog"), Not(Or((Concept("cat"), Filter("height", "<", 5)))))))``
    """
    if is_pure_filter(node):
        return node, None
    if isinstance(node, And):
        pure = [c for c in node.children if is_pure_filter(c)]
        rest = [c for c in node.children if not is_pure_filter(c)]
        return conj(pure), conj(rest)
    return None, node


# ------------------------------------------------------------------------------------------------- JSON
def _value_type(v: FilterValue) -> str:
    if isinstance(v, str):
        return "string"
    if isinstance(v, datetime):
        return "datetime"
    if isinstance(v, date):
        return "date"
    return "int" if isinstance(v, int) else "float"


def to_json(node: Node) -> dict:
    """JSON-friendly dict of the tree (the inverse of ``from_json``)."""
    if isinstance(node, Concept):
        return {"type": "concept", "text": node.text, "weight": node.weight, "threshold": node.threshold}
    if isinstance(node, Filter):
        v = node.value
        return {"type": "filter", "column": node.column, "op": node.op,
                "value": v.isoformat() if isinstance(v, date) else v, "value_type": _value_type(v)}
    if isinstance(node, And):
        return {"type": "and", "children": [to_json(c) for c in node.children]}
    if isinstance(node, Or):
        return {"type": "or", "children": [to_json(c) for c in node.children]}
    if isinstance(node, Not):
        return {"type": "not", "child": to_json(node.child)}
    raise InvalidInput(f"not a query node: {type(node).__name__}")


_KEYS = {
    "concept": ({"type", "text"}, {"weight", "threshold"}),
    "filter": ({"type", "column", "op", "value"}, {"value_type"}),
    "and": ({"type", "children"}, set()),
    "or": ({"type", "children"}, set()),
    "not": ({"type", "child"}, set()),
}
_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}\Z")
_DATETIME_RE = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?\Z")


def _json_error(path: str, problem: str) -> InvalidInput:
    err = InvalidInput(f"invalid query JSON at {path}: {problem}",
                       'see query.ast for the JSON form, e.g. {"type": "concept", "text": "dog"}')
    err.path = path  # type: ignore[attr-defined]
    return err


def _json_value(obj: dict, path: str) -> FilterValue:
    v, vt = obj["value"], obj.get("value_type")
    if vt is None:
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise _json_error(f"{path}.value", f"must be a string or number, got {type(v).__name__}")
        return v
    if vt == "string":
        ok = isinstance(v, str)
    elif vt == "int":
        ok = isinstance(v, int) and not isinstance(v, bool)
    elif vt == "float":
        ok = _is_number(v)
        v = float(v) if ok else v
    elif vt in ("date", "datetime"):
        pat = _DATE_RE if vt == "date" else _DATETIME_RE
        if not isinstance(v, str) or not pat.match(v):
            raise _json_error(f"{path}.value", f"must be an ISO {vt} string, got {v!r}")
        try:
            return date.fromisoformat(v) if vt == "date" else datetime.fromisoformat(v)
        except ValueError as e:
            raise _json_error(f"{path}.value", f"invalid {vt} {v!r}: {e}") from None
    else:
        raise _json_error(f"{path}.value_type", f"must be one of string, int, float, date, datetime, got {vt!r}")
    if not ok:
        raise _json_error(f"{path}.value", f"does not match value_type {vt!r}: {v!r}")
    return v


def from_json(obj: Any, *, max_terms: int = 32, max_depth: int = MAX_DEPTH) -> Node:
    """Build a tree from its JSON form, validating strictly.

    Args:
        obj: a dict as produced by ``to_json`` (unknown keys, wrong types and bad values are rejected).
        max_terms: most concept + filter leaves allowed.
        max_depth: deepest nesting of and/or/not allowed.
    Returns:
        The query tree.
    Raises:
        InvalidInput: the message and ``err.path`` name the bad field, e.g. ``$.children[1].weight``.
    """
    count = [0]

    def build(o: Any, path: str, depth: int) -> Node:
        if depth > max_depth:
            raise _json_error(path, f"nested deeper than {max_depth} levels")
        if not isinstance(o, dict):
            raise _json_error(path, f"must be an object, got {type(o).__name__}")
        kind = o.get("type")
        if not isinstance(kind, str) or kind not in _KEYS:
            raise _json_error(f"{path}.type", f"must be one of {', '.join(_KEYS)}, got {kind!r}")
        required, optional = _KEYS[kind]
        missing = sorted(required - o.keys())
        if missing:
            raise _json_error(f"{path}.{missing[0]}", "is required")
        extra = sorted(str(k) for k in o.keys() - required - optional)
        if extra:
            raise _json_error(f"{path}.{extra[0]}", f"unknown field for a {kind} node")
        if kind in ("concept", "filter"):
            count[0] += 1
            if count[0] > max_terms:
                raise _json_error(path, f"too many terms (at most {max_terms})")
        if kind == "concept":
            text = o["text"]
            if not isinstance(text, str) or not text.strip():
                raise _json_error(f"{path}.text", f"must be a non-empty string, got {text!r}")
            w = o.get("weight", 1.0)
            if not _is_number(w) or not math.isfinite(w) or not 0 < w <= MAX_WEIGHT:
                raise _json_error(f"{path}.weight", f"must be a number in (0, {MAX_WEIGHT:g}], got {w!r}")
            t = o.get("threshold")
            if t is not None and (not _is_number(t) or not math.isfinite(t) or not -1 <= t <= 1):
                raise _json_error(f"{path}.threshold", f"must be null or a number in [-1, 1], got {t!r}")
            return Concept(text, float(w), None if t is None else float(t))
        if kind == "filter":
            col, op = o["column"], o["op"]
            if not isinstance(col, str) or not IDENTIFIER.match(col) or col in KEYWORDS:
                raise _json_error(f"{path}.column", f"must be an identifier, got {col!r}")
            if not isinstance(op, str) or (op not in FILTER_OPS and op != "=="):
                raise _json_error(f"{path}.op", f"must be one of {', '.join(FILTER_OPS)}, ==; got {op!r}")
            value = _json_value(o, path)
            if isinstance(value, float) and not math.isfinite(value):
                raise _json_error(f"{path}.value", f"must be finite, got {value!r}")
            if op == ":" and not isinstance(value, str):
                raise _json_error(f"{path}.value", f"a ':' (glob) filter needs a string pattern, got {value!r}")
            return Filter(col, op, value)
        if kind == "not":
            return Not(build(o["child"], f"{path}.child", depth + 1))
        kids = o["children"]
        if not isinstance(kids, list) or len(kids) < 2:
            raise _json_error(f"{path}.children", "must be a list of at least two nodes")
        built = tuple(build(c, f"{path}.children[{i}]", depth + 1) for i, c in enumerate(kids))
        return And(built) if kind == "and" else Or(built)

    return build(obj, "$", 0)
