"""Metadata filters compiled to parameterised DuckDB SQL, run against an in-memory catalog table."""
from __future__ import annotations

import fnmatch
from datetime import date, datetime, time

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from t2c.data.errors import InvalidInput, UnknownChoice
from t2c.query.ast import And, Concept, Filter, Not, Or, filters
from t2c.query.parse import parse
from t2c.query.sql import (column_kind, compile_filter, compile_filter_expr, quote_ident, resolve_column, split,
                       validate_filters)

ROWS = [
    # id, path, size, width, height, mtime, status, added_at, split, taken, flag
    (1, "/photos/2021/a.jpg", 1234, 512, 384, 1.5, "ok", datetime(2026, 1, 1, 10, 0), "val", date(2021, 6, 1), True),
    (2, "/photos/2022/b.png", 99, 100, 100, 2.5, "ok", datetime(2026, 1, 2, 0, 0), "train", date(2022, 1, 1), False),
    (3, "/tmp/c.jpg", 5000, 1024, 768, None, "corrupt", datetime(2025, 12, 31, 23, 59), "train", None, None),
    (4, "/photos/2021/tmp/d.JPG", 42, 640, 480, 0.0, None, None, None, date(2021, 12, 31), True),
    (5, None, None, None, None, -3.0, "ok", datetime(2026, 1, 1, 0, 0), "5", date(2026, 1, 1), False),
    (6, "/photos/2021/x'; DROP TABLE images; --.jpg", 7, 2048, 10, 9.75, "ok", datetime(2026, 3, 1), "val",
     date(2026, 3, 1), True),
]
COLUMNS = ["id", "path", "size", "width", "height", "mtime", "status", "added_at", "split", "taken", "flag"]


@pytest.fixture(scope="module")
def con():
    c = duckdb.connect(":memory:")
    c.execute("CREATE TABLE images (id INTEGER, path VARCHAR, size BIGINT, width INTEGER, height INTEGER, "
              "mtime DOUBLE, status VARCHAR, added_at TIMESTAMP, split VARCHAR, taken DATE, flag BOOLEAN, "
              "blob BLOB)")
    c.executemany("INSERT INTO images VALUES (?,?,?,?,?,?,?,?,?,?,?,NULL)", ROWS)
    yield c
    c.close()


@pytest.fixture(scope="module")
def cols(con):
    return {r[0]: r[1] for r in con.execute("DESCRIBE images").fetchall()}


def ids(con, cols, query: str) -> list[int]:
    sql, params = compile_filter(parse(query), cols)
    return [r[0] for r in con.execute(f"SELECT id FROM images WHERE {sql} ORDER BY id", params).fetchall()]


GOLDEN = [
    ("width>=512", [1, 3, 4, 6]),
    ("width >= 512 AND height<500", [1, 4, 6]),
    ("height<100", [6]),
    ("size=1234", [1]),
    ("size==1234", [1]),
    ("size!=1234", [2, 3, 4, 5, 6]),  # NULL size is "not 1234"
    ("NOT size=1234", [2, 3, 4, 5, 6]),
    ('path:"*/2021/*"', [1, 4, 6]),
    ("path:*.jpg", [1, 3, 6]),  # glob is case-sensitive: d.JPG does not match
    ('NOT path:"*/tmp/*"', [1, 2, 5, 6]),
    ('path:"/photos/202?/*"', [1, 2, 4, 6]),
    ("added>2026-01-01", [2, 6]),  # whole days: everything on 2026-01-01 is excluded
    ("added>=2026-01-01", [1, 2, 5, 6]),
    ("added=2026-01-01", [1, 5]),
    ("added<2026-01-01", [3]),
    ("added>2026-01-01T05:00", [1, 2, 6]),
    ("added_at<=2026-01-01T10:00", [1, 3, 5]),
    ('added>"2026-01-01"', [2, 6]),
    ("taken<2022-01-01", [1, 4]),
    ("taken>=2021-12-31T12:00", [2, 5, 6]),
    ('split=="val"', [1, 6]),
    ('split="val"', [1, 6]),
    ("split=val", [1, 6]),
    ("split=5", [5]),  # a number compared with a string column uses its text
    ("status!=ok", [3, 4]),
    ('status!=ok AND NOT status="corrupt"', [4]),
    ("flag=true", [1, 4, 6]),
    ("flag!=yes", [2, 3, 5]),
    ("flag=0", [2, 5]),
    ('width>"600"', [3, 4, 6]),
    ("mtime>1.5", [2, 6]),
    ("mtime<=0", [4, 5]),
    ("mtime>-1e1", [1, 2, 4, 5, 6]),
    ("id:[12]", [1, 2]),  # glob on a non-string column casts it to text
    ("added:2026-01-01*", [1, 5]),
    ("(width>1000 OR height<100) AND NOT split=train", [6]),
    ("width>1000 OR height<100 AND NOT split=train", [3, 6]),
    ("NOT (width>1000 OR height<100)", [1, 2, 4, 5]),
    ("NOT NOT width>1000", [3, 6]),
    ("WIDTH>1000", [3, 6]),  # case-insensitive column match
]


@pytest.mark.parametrize("query,expected", GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_rows(con, cols, query, expected):
    assert ids(con, cols, query) == expected


def test_values_are_parameters_never_sql(cols):
    sql, params = compile_filter(parse('width>=512 AND path:"*/2021/*" AND added>2026-01-01'), cols)
    assert sql == ('(COALESCE("width" >= ?, FALSE) AND COALESCE("path" GLOB ?, FALSE) '
                   'AND COALESCE(CAST("added_at" AS DATE) > ?, FALSE))')
    assert params == [512, "*/2021/*", date(2026, 1, 1)]
    assert compile_filter_expr(Filter("status", "!=", "ok"), cols) == ('COALESCE("status" <> ?, TRUE)', ["ok"])


@pytest.mark.parametrize("evil", [
    "x' OR '1'='1", "'; DROP TABLE images; --", '"; DROP TABLE images; --', "val') OR TRUE --", "\\'; --",
])
def test_sql_injection_attempts(con, cols, evil):
    for q in (Filter("split", "=", evil), Filter("path", ":", evil), Filter("status", "!=", evil),
              Not(Filter("split", "<", evil))):
        sql, params = compile_filter(q, cols)
        assert evil not in sql and "DROP" not in sql and "'" not in sql
        con.execute(f"SELECT id FROM images WHERE {sql}", params).fetchall()
    assert con.execute("SELECT count(*) FROM images").fetchone()[0] == len(ROWS)
    # the exact evil text matches only the row that really holds it
    assert ids(con, cols, 'path="/photos/2021/x\'; DROP TABLE images; --.jpg"') == [6]
    assert ids(con, cols, 'path:"*DROP TABLE*"') == [6]


def test_identifiers_are_validated(cols):
    for bad in ['width" OR 1=1 --', "a b", "1x", ""]:
        with pytest.raises(InvalidInput):
            Filter(bad, "=", 1)
        with pytest.raises(InvalidInput):
            quote_ident(bad)
    evil_cols = {'w" OR 1=1 --': "INTEGER"}
    with pytest.raises(UnknownChoice):
        compile_filter_expr(Filter("w", "=", 1), evil_cols)


def test_unknown_column_lists_choices(cols):
    with pytest.raises(UnknownChoice) as ei:
        compile_filter(parse("colour=red"), cols)
    err = ei.value
    assert "colour" in err.message
    assert "width" in err.choices and "added" in err.choices and "added_at" in err.choices
    assert "width" in err.hint
    assert resolve_column("added", cols) == "added_at"
    assert resolve_column("added", {"added": "DATE", "added_at": "TIMESTAMP"}) == "added"
    with pytest.raises(UnknownChoice):
        resolve_column("added", {"width": "INTEGER"})


@pytest.mark.parametrize("query,fragment", [
    ("width>abc", "numbers"),
    ("width>2026-01-01", "numbers"),
    ('size="12x"', "numbers"),
    ("added>hello", "dates"),
    ("added>5", "dates"),
    ("taken=1.5", "dates"),
    ('added>"2026-01-01T10:00+02:00"', "time zone"),
    ("flag<true", "only = and !="),
    ("flag=maybe", "booleans"),
    ("width>99999999999999999999999", "out of range"),
    ("blob=1", "cannot compare"),
])
def test_type_errors(cols, query, fragment):
    with pytest.raises(InvalidInput) as ei:
        compile_filter(parse(query), cols)
    assert fragment in str(ei.value)
    with pytest.raises(InvalidInput):
        validate_filters(And((Concept("dog"), parse(query))), cols)


def test_column_kinds():
    assert [column_kind(t) for t in ["INTEGER", "bigint", "DECIMAL(10,2)", "VARCHAR(20)", "DATE",
                                     "TIMESTAMP WITH TIME ZONE", "BOOLEAN", "BLOB", "DOUBLE PRECISION"]] == \
        ["int", "int", "float", "str", "date", "timestamp", "bool", "other", "float"]


def test_mixed_trees(con, cols):
    tree = parse("dog AND width>=512 AND NOT (cat OR height<100)")
    with pytest.raises(InvalidInput, match="filter-only"):
        compile_filter(tree, cols)
    pure, rest = split(tree)
    assert pure == Filter("width", ">=", 512)
    sql, params = compile_filter(pure, cols)
    prefilter = [r[0] for r in con.execute(f"SELECT id FROM images WHERE {sql} ORDER BY id", params).fetchall()]
    assert prefilter == [1, 3, 4, 6]
    # filters left under OR/NOT are evaluated per id as boolean columns
    inner = filters(rest)
    exprs, all_params = [], []
    for i, f in enumerate(inner):
        s, p = compile_filter_expr(f, cols)
        exprs.append(f"{s} AS f{i}")
        all_params += p
    got = con.execute(f"SELECT id, {', '.join(exprs)} FROM images ORDER BY id", all_params).fetchall()
    assert got == [(1, False), (2, False), (3, False), (4, False), (5, False), (6, True)]


# ------------------------------------------------------------------- property: SQL == Python reference
def _ref(node, row: dict) -> bool:
    """Independent reference semantics of a filter tree on one row."""
    if isinstance(node, And):
        return all(_ref(c, row) for c in node.children)
    if isinstance(node, Or):
        return any(_ref(c, row) for c in node.children)
    if isinstance(node, Not):
        return not _ref(node.child, row)
    col = "added_at" if node.column == "added" else node.column
    v, x = row[col], node.value
    if node.op == ":":
        return v is not None and fnmatch.fnmatchcase(v if isinstance(v, str) else str(v), x)
    if v is None:
        return node.op == "!="
    if isinstance(v, datetime) and not isinstance(x, datetime):
        v = v.date()
    elif isinstance(v, date) and not isinstance(v, datetime) and isinstance(x, datetime):
        v = datetime.combine(v, time())
    return {"=": v == x, "!=": v != x, "<": v < x, "<=": v <= x, ">": v > x, ">=": v >= x}[node.op]


_OPS = st.sampled_from(["=", "!=", "<", "<=", ">", ">="])
_leaf = st.one_of(
    st.builds(Filter, st.sampled_from(["width", "height", "size"]), _OPS, st.integers(-10, 3000)),
    st.builds(Filter, st.just("mtime"), _OPS, st.floats(-5, 12, allow_nan=False)),
    st.builds(Filter, st.sampled_from(["status", "split"]), _OPS, st.sampled_from(["ok", "val", "train", "5", "", "z"])),
    st.builds(Filter, st.sampled_from(["added", "added_at", "taken"]), _OPS,
              st.one_of(st.dates(date(2021, 1, 1), date(2026, 4, 1)),
                        st.datetimes(datetime(2021, 1, 1), datetime(2026, 4, 1)))),
    st.builds(Filter, st.just("path"), st.just(":"),
              st.sampled_from(["*/2021/*", "*.jpg", "*tmp*", "/photos/202?/*", "*", "*.JPG", "/tmp/c.jpg"])),
)
_filter_trees = st.recursive(_leaf, lambda kids: st.one_of(
    st.builds(Not, kids),
    st.lists(kids, min_size=2, max_size=3).map(lambda xs: And(tuple(xs))),
    st.lists(kids, min_size=2, max_size=3).map(lambda xs: Or(tuple(xs)))), max_leaves=6)


@settings(max_examples=200, deadline=None)
@given(_filter_trees)
def test_sql_matches_reference_semantics(con, cols, tree):
    sql, params = compile_filter(tree, cols)
    assert sql.count("?") == len(params)
    got = [r[0] for r in con.execute(f"SELECT id FROM images WHERE {sql} ORDER BY id", params).fetchall()]
    want = [r[0] for r in ROWS if _ref(tree, dict(zip(COLUMNS, r)))]
    assert got == want
