"""Query tree: frozen dataclasses for concepts, metadata filters and AND / OR / NOT, plus a strict JSON form.

Node types
    Concept(text, weight=1.0, threshold=None)   a text constraint ("red circle"), scored by cosine similarity
    Example(ref, weight=1.0, threshold=None)    an example image (``like:812``, ``like:"cat.jpg"``), likewise
    Filter(column, op, value)                   a metadata constraint on a catalog column (``width>=512``)
    And(children) / Or(children)                n-ary, at least two children, nested same-type nodes flattened
    Not(child)

JSON form (``to_json`` / ``from_json``)::

    {"type": "concept", "text": "sunset", "weight": 2.0, "threshold": 0.3}
    {"type": "example", "ref": 812, "weight": 1.0}     {"type": "example", "ref": "photos/cat.jpg"}
    {"type": "filter", "column": "width", "op": ">=", "value": 512, "value_type": "int"}
    {"type": "filter", "column": "added", "op": ">", "value": "2026-01-01", "value_type": "date"}
    {"type": "and", "children": [...]}   {"type": "or", "children": [...]}   {"type": "not", "child": {...}}

``value_type`` is one of "string", "int", "float", "date", "datetime"; ``from_json`` infers it from the JSON
type when absent (so dates must name it). ``weight`` and ``threshold`` are optional in ``from_json``.

One dispatch: every node class derives from ``Node`` (leaves from ``Leaf``; leaves scored by cosine similarity
from ``Scored``; AND / OR from ``Bool``) and carries its JSON form; code that walks a tree subclasses
``Visitor`` (``visit_concept``, ``visit_scored``, ``visit_filter``, ``visit_and`` / ``visit_or`` /
``visit_bool``, ``visit_not``). Adding a leaf is adding one registered class here.
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



class Node:
    """Base of every query node.

    ``kind`` names the node in its JSON form and in visitor dispatch; ``kids`` are its child nodes (none for a
    leaf). A new leaf is one subclass: its fields, ``kind``, ``json_keys``, ``to_json`` and ``from_json_obj``
    (and, when it is scored by cosine similarity like a concept, the ``Scored`` base gives it weight, threshold
    and the engine's handling).
    """

    __slots__ = ()
    kind = "node"
    #: (required, optional) keys of the JSON form
    json_keys: tuple = (frozenset(), frozenset())

    @property
    def kids(self) -> tuple:
        """Child nodes (empty for a leaf)."""
        return ()

    def to_json(self) -> dict:
        """JSON-friendly dict of this subtree."""
        raise NotImplementedError

    @classmethod
    def from_json_obj(cls, o: dict, path: str, build) -> "Node":
        """Build this node from its (key-checked) JSON object; ``build(obj, path)`` builds a child."""
        raise NotImplementedError


class Leaf(Node):
    """A node without children (a constraint on one image)."""

    __slots__ = ()
    kind = "leaf"


class Scored(Leaf):
    """A leaf met when the image's cosine score against the leaf's vector passes a threshold.

    Subclasses have ``text`` (the key naming the leaf's vector and calibration), ``weight`` and ``threshold``.
    """

    __slots__ = ()
    kind = "scored"

    @property
    def key(self) -> tuple[str, str]:
        """What names this leaf's vector and calibration: (kind, text), so a concept never meets an example."""
        return (self.kind, self.text)  # type: ignore[attr-defined]


class Bool(Node):
    """An n-ary AND or OR."""

    __slots__ = ()
    kind = "bool"

    @property
    def kids(self) -> tuple:
        return self.children  # type: ignore[attr-defined]

    def to_json(self) -> dict:
        return {"type": self.kind, "children": [c.to_json() for c in self.kids]}

    @classmethod
    def from_json_obj(cls, o: dict, path: str, build) -> "Node":
        kids = o["children"]
        if not isinstance(kids, list) or len(kids) < 2:
            raise _json_error(f"{path}.children", "must be a list of at least two nodes")
        return cls(tuple(build(c, f"{path}.children[{i}]") for i, c in enumerate(kids)))


class Visitor:
    """One dispatch over query trees.

    ``visit(node, *args)`` calls ``visit_<kind>`` for the most specific class in the node's MRO that the
    visitor defines: ``visit_concept``, ``visit_filter``, ``visit_and``, ``visit_or``, ``visit_not``, or the
    fallbacks ``visit_scored`` (any scored leaf: concepts, examples), ``visit_leaf``, ``visit_bool`` (AND and
    OR) and ``visit_node``. A visitor that handles ``visit_scored`` needs no change when a scored leaf is added.
    """

    def visit(self, node, *args, **kwargs):
        """Dispatch on the node's class (most specific method first)."""
        for cls in type(node).__mro__:
            kind = cls.__dict__.get("kind")
            if kind is not None:
                method = getattr(self, f"visit_{kind}", None)
                if method is not None:
                    return method(node, *args, **kwargs)
        raise InvalidInput(f"not a query node: {type(node).__name__}")


def _register(cls):
    """Record a node class under its JSON ``type`` (its ``kind``)."""
    _KINDS[cls.kind] = cls
    return cls


_KINDS: dict[str, type] = {}

def _check_weight(w: Any, path: str | None = None) -> float:
    """A leaf weight in (0, MAX_WEIGHT], as float."""
    if not _is_number(w) or not math.isfinite(w) or not 0 < w <= MAX_WEIGHT:
        if path is not None:
            raise _json_error(f"{path}.weight", f"must be a number in (0, {MAX_WEIGHT:g}], got {w!r}")
        raise _bad(f"concept weight must be a number in (0, {MAX_WEIGHT:g}], got {w!r}")
    return float(w)


def _check_threshold(t: Any, path: str | None = None) -> float | None:
    """A per-leaf threshold: None or a cosine score in [-1, 1], as float."""
    if t is None:
        return None
    if not _is_number(t) or not math.isfinite(t) or not -1.0 <= t <= 1.0:
        if path is not None:
            raise _json_error(f"{path}.threshold", f"must be null or a number in [-1, 1], got {t!r}")
        raise _bad(f"concept threshold must be a number in [-1, 1] (a cosine score), got {t!r}")
    return float(t)


@_register
@dataclass(frozen=True)
class Concept(Scored):
    """A text constraint: met when the image's concept score passes its (calibrated or given) threshold."""

    text: str
    weight: float = 1.0
    threshold: float | None = None

    kind = "concept"
    json_keys = (frozenset({"type", "text"}), frozenset({"weight", "threshold"}))

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise _bad(f"concept text must be a non-empty string, got {self.text!r}")
        object.__setattr__(self, "weight", _check_weight(self.weight))
        object.__setattr__(self, "threshold", _check_threshold(self.threshold))

    def to_json(self) -> dict:
        return {"type": "concept", "text": self.text, "weight": self.weight, "threshold": self.threshold}

    @classmethod
    def from_json_obj(cls, o: dict, path: str, build) -> "Concept":
        text = o["text"]
        if not isinstance(text, str) or not text.strip():
            raise _json_error(f"{path}.text", f"must be a non-empty string, got {text!r}")
        return cls(text, _check_weight(o.get("weight", 1.0), path), _check_threshold(o.get("threshold"), path))


@_register
@dataclass(frozen=True)
class Filter(Leaf):
    """A metadata constraint ``column op value`` on a catalog column; ``:`` is a glob match (``*``, ``?``, ``[..]``)."""

    column: str
    op: str
    value: FilterValue

    kind = "filter"
    json_keys = (frozenset({"type", "column", "op", "value"}), frozenset({"value_type"}))

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

    def to_json(self) -> dict:
        v = self.value
        return {"type": "filter", "column": self.column, "op": self.op,
                "value": v.isoformat() if isinstance(v, date) else v, "value_type": _value_type(v)}

    @classmethod
    def from_json_obj(cls, o: dict, path: str, build) -> "Filter":
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
        return cls(col, op, value)


MAX_REF_CHARS = 4096


def _ref_text(ref: int | str) -> str:
    """Query text of an example reference: ``like:812`` or ``like:"photos/cat.jpg"``."""
    if isinstance(ref, int):
        return f"like:{ref}"
    return 'like:"' + ref.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check_ref(ref: Any, path: str | None = None) -> int | str:
    """An example reference: a catalog id (int >= 0) or a non-empty image file name (str)."""
    ok = (isinstance(ref, int) and not isinstance(ref, bool) and ref >= 0) or (
        isinstance(ref, str) and ref.strip() != "" and len(ref) <= MAX_REF_CHARS
        and not any(ord(c) < 32 for c in ref))
    if not ok:
        problem = (f"must be an image id (an integer >= 0) or an image file name (a non-empty string of at "
                   f"most {MAX_REF_CHARS} characters, no control characters), got {ref!r}")
        if path is not None:
            raise _json_error(f"{path}.ref", problem)
        raise _bad(f"an example's reference {problem}")
    return ref


@_register
@dataclass(frozen=True)
class Example(Scored):
    """An example image: met when an image's cosine similarity to the example passes its threshold.

    ``ref`` is a catalog id (``like:812``, the indexed image's own vector) or an image file
    (``like:"photos/cat.jpg"``, decoded safely and embedded with the store's encoder and aligner; a service
    names an uploaded image ``sha256:<hex>``). The threshold is calibrated from the collection's similarity
    distribution to the example, like a concept's.
    """

    ref: int | str
    weight: float = 1.0
    threshold: float | None = None

    kind = "example"
    json_keys = (frozenset({"type", "ref"}), frozenset({"weight", "threshold"}))

    def __post_init__(self) -> None:
        _check_ref(self.ref)
        object.__setattr__(self, "weight", _check_weight(self.weight))
        object.__setattr__(self, "threshold", _check_threshold(self.threshold))

    @property
    def text(self) -> str:
        """The example as query text (``like:812``), its key for vectors, calibration and explanations."""
        return _ref_text(self.ref)

    def to_json(self) -> dict:
        return {"type": "example", "ref": self.ref, "weight": self.weight, "threshold": self.threshold}

    @classmethod
    def from_json_obj(cls, o: dict, path: str, build) -> "Example":
        return cls(_check_ref(o["ref"], path), _check_weight(o.get("weight", 1.0), path),
                   _check_threshold(o.get("threshold"), path))


def examples(node: Node) -> list[Example]:
    """Every Example leaf, left to right (duplicates kept)."""
    return [n for n in walk(node) if isinstance(n, Example)]


def _flatten(kind: type, children: Any) -> tuple:
    if isinstance(children, (str, bytes, dict, Node)) or not hasattr(children, "__iter__"):
        raise _bad(f"{kind.__name__} children must be a sequence of nodes")
    out: list = []
    for c in children:
        if not isinstance(c, Node):
            raise _bad(f"{kind.__name__} children must be query nodes, got {type(c).__name__}")
        out.extend(c.children if type(c) is kind else (c,))
    if len(out) < 2:
        raise _bad(f"{kind.__name__} needs at least two children, got {len(out)}")
    return tuple(out)


@_register
@dataclass(frozen=True)
class And(Bool):
    """All children must hold. Nested ``And`` children are flattened into this one."""

    children: tuple

    kind = "and"
    json_keys = (frozenset({"type", "children"}), frozenset())

    def __post_init__(self) -> None:
        object.__setattr__(self, "children", _flatten(And, self.children))


@_register
@dataclass(frozen=True)
class Or(Bool):
    """At least one child must hold. Nested ``Or`` children are flattened into this one."""

    children: tuple

    kind = "or"
    json_keys = (frozenset({"type", "children"}), frozenset())

    def __post_init__(self) -> None:
        object.__setattr__(self, "children", _flatten(Or, self.children))


@_register
@dataclass(frozen=True)
class Not(Node):
    """The child must not hold."""

    child: Node

    kind = "not"
    json_keys = (frozenset({"type", "child"}), frozenset())

    def __post_init__(self) -> None:
        if not isinstance(self.child, Node):
            raise _bad(f"Not child must be a query node, got {type(self.child).__name__}")

    @property
    def kids(self) -> tuple:
        return (self.child,)

    def to_json(self) -> dict:
        return {"type": "not", "child": self.child.to_json()}

    @classmethod
    def from_json_obj(cls, o: dict, path: str, build) -> "Not":
        return cls(build(o["child"], f"{path}.child"))


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
        stack.extend(reversed(n.kids))


def concepts(node: Node) -> list[Concept]:
    """Every Concept leaf, left to right (duplicates kept)."""
    return [n for n in walk(node) if isinstance(n, Concept)]


def scored(node: Node) -> list[Scored]:
    """Every scored leaf (concepts and any other leaf scored by cosine similarity), left to right."""
    return [n for n in walk(node) if isinstance(n, Scored)]


def filters(node: Node) -> list[Filter]:
    """Every Filter leaf, left to right (duplicates kept)."""
    return [n for n in walk(node) if isinstance(n, Filter)]


def scored_with_polarity(node: Node) -> list[tuple[Scored, bool]]:
    """Every scored leaf with True when it sits under an even number of NOTs (a positive constraint)."""
    out: list[tuple[Scored, bool]] = []
    stack: list[tuple[Node, bool]] = [(node, True)]
    while stack:
        n, pos = stack.pop()
        if isinstance(n, Scored):
            out.append((n, pos))
        flip = isinstance(n, Not)
        stack.extend((c, pos != flip) for c in reversed(n.kids))
    return out


def concepts_with_polarity(node: Node) -> list[tuple[Concept, bool]]:
    """Every Concept leaf with True when it sits under an even number of NOTs (a positive constraint)."""
    return [(n, pos) for n, pos in scored_with_polarity(node) if isinstance(n, Concept)]


def is_pure_filter(node: Node) -> bool:
    """True when the tree holds only Filter leaves (no scored leaf such as a Concept)."""
    return not any(isinstance(n, Scored) for n in walk(node))


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
    if not isinstance(node, Node):
        raise InvalidInput(f"not a query node: {type(node).__name__}")
    return node.to_json()


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
        max_terms: most leaves (concepts, filters, ...) allowed.
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
        if not isinstance(kind, str) or kind not in _KINDS:
            raise _json_error(f"{path}.type", f"must be one of {', '.join(_KINDS)}, got {kind!r}")
        cls = _KINDS[kind]
        required, optional = cls.json_keys
        missing = sorted(required - o.keys())
        if missing:
            raise _json_error(f"{path}.{missing[0]}", "is required")
        extra = sorted(str(k) for k in o.keys() - required - optional)
        if extra:
            raise _json_error(f"{path}.{extra[0]}", f"unknown field for a {kind} node")
        if issubclass(cls, Leaf):
            count[0] += 1
            if count[0] > max_terms:
                raise _json_error(path, f"too many terms (at most {max_terms})")
        return cls.from_json_obj(o, path, lambda child, p: build(child, p, depth + 1))

    return build(obj, "$", 0)
