"""Compile metadata filters of a query tree to parameterised DuckDB SQL. Pure Python (no duckdb import).

Values always travel as ``?`` parameters, never pasted into SQL; column names must be in ``allowed_columns``
(a map catalog column -> DuckDB type, e.g. ``{"width": "INTEGER", "path": "VARCHAR", "added_at": "TIMESTAMP"}``)
and are double-quoted after validation. ``added`` is an alias of ``added_at``; otherwise a column matches
exactly, then case-insensitively.

Semantics of one filter (each compiles to a two-valued boolean, so NOT behaves classically):
  * ``= < <= > >=`` and ``:`` are false where the column is NULL; ``!=`` is true there
    (``status!=ok`` == ``NOT status=ok``).
  * ``:`` is a case-sensitive glob (DuckDB GLOB: ``*`` any run, ``?`` one character, ``[abc]`` a class);
    non-string columns are cast to VARCHAR first.
  * The value is coerced to the column's type or rejected with InvalidInput: numbers for numeric columns
    (a numeric string is accepted), any value for string columns (numbers/dates use their text form),
    ISO dates/datetimes for DATE/TIMESTAMP columns, true/false/yes/no/1/0 for BOOLEAN (``=``/``!=`` only).
  * A date compared with a TIMESTAMP column compares whole days: ``added>2026-01-01`` means from
    2026-01-02 on, ``added=2026-01-01`` any time that day.

Mixed trees: ``split(node)`` (from query.ast) separates the pure-filter conjuncts of a top-level AND, to be
compiled with ``compile_filter`` into a WHERE prefilter. Filters that sit under an OR or NOT together with
concepts (``dog OR width>1000``) cannot be pushed into WHERE; the engine evaluates each with
``compile_filter_expr`` as a boolean column per id (``SELECT id, <expr> AS f0, ... FROM images``, parameters
concatenated in order) and combines them with the concept results.
"""
from __future__ import annotations

import math
import re
from datetime import date, datetime
from typing import Mapping

from t2c.data.errors import InvalidInput, UnknownChoice
from t2c.query.ast import IDENTIFIER, And, Filter, Node, Not, Visitor, filters, split  # noqa: F401 (split re-exported)

__all__ = ["compile_filter", "compile_filter_expr", "resolve_column", "column_kind", "validate_filters", "split",
           "quote_ident", "COLUMN_ALIASES"]

COLUMN_ALIASES = {"added": "added_at"}

_INT_TYPES = {"TINYINT", "SMALLINT", "INTEGER", "INT", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER",
              "UBIGINT", "UHUGEINT", "INT1", "INT2", "INT4", "INT8", "INT16", "INT32", "INT64", "LONG", "SHORT",
              "SIGNED", "INTEGRAL"}
_FLOAT_TYPES = {"FLOAT", "DOUBLE", "REAL", "DECIMAL", "NUMERIC", "FLOAT4", "FLOAT8"}
_STR_TYPES = {"VARCHAR", "TEXT", "STRING", "CHAR", "BPCHAR", "NVARCHAR", "ENUM", "UUID"}
_TS_TYPES = {"TIMESTAMP", "DATETIME", "TIMESTAMPTZ", "TIMESTAMP_S", "TIMESTAMP_MS", "TIMESTAMP_NS", "TIMESTAMP_US"}
_BOOL_TYPES = {"BOOLEAN", "BOOL", "LOGICAL"}
_NUM_RE = re.compile(r"\s*[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?\s*\Z")
_INT_RE = re.compile(r"\s*[+-]?[0-9]+\s*\Z")
_TRUE, _FALSE = {"true", "t", "yes", "y", "1"}, {"false", "f", "no", "n", "0"}
_SQL_OP = {"=": "=", "!=": "<>", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
_INT64 = 2 ** 63


def quote_ident(name: str) -> str:
    """Double-quote a validated identifier for DuckDB."""
    if not isinstance(name, str) or not IDENTIFIER.match(name):
        raise InvalidInput(f"column name must be an identifier, got {name!r}")
    return '"' + name + '"'


def _base(duck_type: str) -> str:
    return re.split(r"[\s(]", str(duck_type).strip().upper(), maxsplit=1)[0]


def column_kind(duck_type: str) -> str:
    """Classify a DuckDB type name: 'int', 'float', 'str', 'date', 'timestamp', 'bool' or 'other'."""
    base = _base(duck_type)
    if base in _INT_TYPES:
        return "int"
    if base in _FLOAT_TYPES:
        return "float"
    if base in _STR_TYPES:
        return "str"
    if base == "DATE":
        return "date"
    if base in _TS_TYPES:
        return "timestamp"
    if base in _BOOL_TYPES:
        return "bool"
    return "other"


def resolve_column(name: str, allowed_columns: Mapping[str, str]) -> str:
    """The catalog column a filter names (exact, then alias, then case-insensitive); UnknownChoice if none."""
    if name in allowed_columns:
        return name
    alias = COLUMN_ALIASES.get(name)
    if alias is not None and alias in allowed_columns:
        return alias
    ci = [c for c in allowed_columns if isinstance(c, str) and c.lower() == name.lower()]
    if len(ci) == 1:
        return ci[0]
    choices = [str(c) for c in allowed_columns]
    choices += [a for a, t in COLUMN_ALIASES.items() if t in allowed_columns and a not in allowed_columns]
    raise UnknownChoice("column", name, choices)


def _type_error(col: str, dtype: str, want: str, value) -> InvalidInput:
    return InvalidInput(f"column {col!r} holds {want} ({dtype}); {value!r} is not one",
                        f"compare {col} with {want}, e.g. " + {
                            "numbers": f"{col}>=512", "dates": f"{col}>2026-01-01",
                            "booleans": f"{col}=true"}.get(want, f'{col}="text"'))


def _as_number(col: str, dtype: str, v):
    if isinstance(v, str):
        if _INT_RE.match(v):
            v = int(v)
        elif _NUM_RE.match(v):
            v = float(v)
        else:
            raise _type_error(col, dtype, "numbers", v)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or isinstance(v, date):
        raise _type_error(col, dtype, "numbers", v)
    if isinstance(v, float) and not math.isfinite(v):
        raise InvalidInput(f"value {v!r} for column {col!r} is not a finite number")
    if isinstance(v, int) and not -_INT64 <= v < _INT64:
        raise InvalidInput(f"value {v} for column {col!r} is out of range (64-bit integers only)")
    return v


def _as_temporal(col: str, dtype: str, v):
    if isinstance(v, str):
        s = v.strip()
        try:
            v = date.fromisoformat(s) if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", s) else datetime.fromisoformat(s)
        except ValueError:
            raise _type_error(col, dtype, "dates", v) from None
        if isinstance(v, datetime) and v.tzinfo is not None:
            raise InvalidInput(f"value {s!r} for column {col!r} has a time zone; give a naive date or datetime")
    if not isinstance(v, date):
        raise _type_error(col, dtype, "dates", v)
    return v


def _as_text(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, date):
        return v.isoformat()
    return repr(v) if isinstance(v, float) else str(v)


def compile_filter_expr(node: Filter, allowed_columns: Mapping[str, str]) -> tuple[str, list]:
    """Compile one Filter to a parenthesised DuckDB boolean expression and its parameters.

    Args:
        node: the filter, e.g. ``Filter("width", ">=", 512)``.
        allowed_columns: catalog column -> DuckDB type.
    Returns:
        ``(sql, params)``, e.g. ``('COALESCE("width" >= ?, FALSE)', [512])``; never NULL-valued.
    Raises:
        UnknownChoice: the column is not in ``allowed_columns`` (the message lists the valid ones).
        InvalidInput: the value cannot be compared with the column's type, or the operator does not apply.
    """
    if not isinstance(node, Filter):
        raise InvalidInput(f"compile_filter_expr needs a Filter, got {type(node).__name__}")
    col = resolve_column(node.column, allowed_columns)
    dtype = str(allowed_columns[col])
    kind = column_kind(dtype)
    ident = quote_ident(col)
    op, v = node.op, node.value
    if op == ":":
        lhs = ident if kind == "str" and _base(dtype) not in ("UUID", "ENUM") else f"CAST({ident} AS VARCHAR)"
        return f"COALESCE({lhs} GLOB ?, FALSE)", [_as_text(v)]
    if kind == "other":
        raise InvalidInput(f"column {col!r} has type {dtype}, which filters cannot compare",
                           "filter on number, string, date, timestamp or boolean columns")
    lhs = ident
    if kind in ("int", "float"):
        param = _as_number(col, dtype, v)
    elif kind == "str":
        param = _as_text(v)
        if _base(dtype) in ("UUID", "ENUM"):
            lhs = f"CAST({ident} AS VARCHAR)"
    elif kind in ("date", "timestamp"):
        param = _as_temporal(col, dtype, v)
        if isinstance(param, datetime):
            if kind == "date":
                lhs = f"CAST({ident} AS TIMESTAMP)"
        elif kind == "timestamp":
            lhs = f"CAST({ident} AS DATE)"  # a date literal compares whole days
    else:  # bool
        if op not in ("=", "!="):
            raise InvalidInput(f"column {col!r} is BOOLEAN; only = and != apply, not {op}")
        s = _as_text(v).strip().lower()
        if s not in _TRUE | _FALSE:
            raise _type_error(col, dtype, "booleans", v)
        param = s in _TRUE
    default = "TRUE" if op == "!=" else "FALSE"
    return f"COALESCE({lhs} {_SQL_OP[op]} ?, {default})", [param]


def compile_filter(node: Node, allowed_columns: Mapping[str, str]) -> tuple[str, list]:
    """Compile a filter-only tree (Filter / And / Or / Not) to one DuckDB boolean expression and parameters.

    Args:
        node: a tree with no Concept leaves (use ``split`` to take the filter part of a mixed tree).
        allowed_columns: catalog column -> DuckDB type.
    Returns:
        ``(sql, params)`` for ``WHERE {sql}``, e.g.
        ``('(COALESCE("width" >= ?, FALSE) AND (NOT COALESCE("path" GLOB ?, FALSE)))', [512, '*/tmp/*'])``.
    Raises:
        InvalidInput: the tree holds a concept, or a value does not fit its column; UnknownChoice: unknown column.
    Example:
        >>> compile_filter(parse('width>=512 AND NOT path:"*/tmp/*"'), {"width": "INTEGER", "path": "VARCHAR"})
    """
    compiler = _FilterCompiler(allowed_columns)
    sql = compiler.visit(node)
    return sql, compiler.params


class _FilterCompiler(Visitor):
    """One DuckDB boolean expression of a filter-only tree; parameters collect in ``params``, in order."""

    def __init__(self, allowed_columns: Mapping[str, str]):
        self.allowed_columns = allowed_columns
        self.params: list = []

    def visit_filter(self, n: Filter) -> str:
        sql, p = compile_filter_expr(n, self.allowed_columns)
        self.params.extend(p)
        return sql

    def visit_scored(self, n) -> str:
        raise InvalidInput(f"compile_filter needs a filter-only tree, found the {n.kind} {n.text!r}",
                           "take the filter part with query.sql.split(node)")

    def visit_not(self, n: Not) -> str:
        return f"(NOT {self.visit(n.child)})"

    def visit_bool(self, n) -> str:
        sep = " AND " if isinstance(n, And) else " OR "
        return "(" + sep.join(self.visit(c) for c in n.children) + ")"


def validate_filters(node: Node, allowed_columns: Mapping[str, str]) -> None:
    """Check every filter in a (possibly mixed) tree against the catalog columns; raises like compile_filter_expr."""
    for f in filters(node):
        compile_filter_expr(f, allowed_columns)
