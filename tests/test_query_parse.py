"""Query language: golden parses, error positions, JSON form, pretty-printer round trips, property tests."""
from __future__ import annotations

import json
import string
import subprocess
import sys
from datetime import date, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from t2c.data.errors import InvalidInput, QuerySyntaxError
from t2c.query.ast import (And, Concept, Filter, Not, Or, concepts, concepts_with_polarity, conj, disj, filters,
                       from_json, is_pure_filter, split, to_json, walk)
from t2c.query.parse import format, parse, tokenize

C, F = Concept, Filter
ROOT = Path(__file__).resolve().parents[1]

GOLDEN = [
    ("dog", C("dog")),
    ("red circle", C("red circle")),
    ("  red   circle  ", C("red circle")),
    ('"a red circle"', C("a red circle")),
    ('"  spaced  out "', C("  spaced  out ")),
    (r'"say \"cheese\" \\ now"', C('say "cheese" \\ now')),
    ("salt and pepper", C("salt and pepper")),
    ("t-shirt", C("t-shirt")),
    ("café au lait", C("café au lait")),
    ("3 dogs", C("3 dogs")),
    ("ANDROID phone", C("ANDROID phone")),
    ("dog AND cat", And((C("dog"), C("cat")))),
    ("dog OR cat", Or((C("dog"), C("cat")))),
    ("NOT dog", Not(C("dog"))),
    ("dog & cat", And((C("dog"), C("cat")))),
    ("dog && cat || !bird", Or((And((C("dog"), C("cat"))), Not(C("bird"))))),
    ("a OR b AND c", Or((C("a"), And((C("b"), C("c")))))),
    ("a AND b OR c", Or((And((C("a"), C("b"))), C("c")))),
    ("NOT a AND b", And((Not(C("a")), C("b")))),
    ("NOT (a AND b)", Not(And((C("a"), C("b"))))),
    ("NOT NOT a", Not(Not(C("a")))),
    ("a AND b AND c", And((C("a"), C("b"), C("c")))),
    ("(a AND b) AND (c AND d)", And((C("a"), C("b"), C("c"), C("d")))),
    ("a OR (b OR c)", Or((C("a"), C("b"), C("c")))),
    ("((a))", C("a")),
    ("red circle AND NOT (square OR triangle)",
     And((C("red circle"), Not(Or((C("square"), C("triangle"))))))),
    ('2*"sunset"', C("sunset", weight=2.0)),
    ("0.5*red circle", C("red circle", weight=0.5)),
    ("2 * sunset", C("sunset", weight=2.0)),
    ('"sunset"@0.3', C("sunset", threshold=0.3)),
    ("red circle@0.25", C("red circle", threshold=0.25)),
    ("dog@-0.1", C("dog", threshold=-0.1)),
    ("dog @ .2", C("dog", threshold=0.2)),
    ('2*"sunset"@0.3 AND beach', And((C("sunset", 2.0, 0.3), C("beach")))),
    ("1e1*x", C("x", weight=10.0)),
    ("width>=512", F("width", ">=", 512)),
    ("width >= 512", F("width", ">=", 512)),
    ("height<100", F("height", "<", 100)),
    ("size=1234", F("size", "=", 1234)),
    ("size==1234", F("size", "=", 1234)),
    ("x<=-5", F("x", "<=", -5)),
    ("x>0.5", F("x", ">", 0.5)),
    ("x>1e+20", F("x", ">", 1e20)),
    ("zip=007", F("zip", "=", 7)),
    ('zip="007"', F("zip", "=", "007")),
    ('path:"*/2021/*"', F("path", ":", "*/2021/*")),
    ("path:*.jpg", F("path", ":", "*.jpg")),
    ("path:2021", F("path", ":", "2021")),
    ("added>2026-01-01", F("added", ">", date(2026, 1, 1))),
    ("added>=2026-01-01T10:30", F("added", ">=", datetime(2026, 1, 1, 10, 30))),
    ("added<2026-01-01T10:30:05.25", F("added", "<", datetime(2026, 1, 1, 10, 30, 5, 250000))),
    ('split=="val"', F("split", "=", "val")),
    ('split="val"', F("split", "=", "val")),
    ("status!=ok", F("status", "!=", "ok")),
    ('status!=""', F("status", "!=", "")),
    ("owner=a@b.c", F("owner", "=", "a@b.c")),
    ('NOT path:"*/tmp/*"', Not(F("path", ":", "*/tmp/*"))),
    ("(a OR b) AND width>100", And((Or((C("a"), C("b"))), F("width", ">", 100)))),
    ("(width>5)", F("width", ">", 5)),
    ("dog AND (width>5 OR height>5)", And((C("dog"), Or((F("width", ">", 5), F("height", ">", 5)))))),
    ("dog AND beach AND NOT people AND added>2021-12-31",
     And((C("dog"), C("beach"), Not(C("people")), F("added", ">", date(2021, 12, 31))))),
    ("_col1=x", F("_col1", "=", "x")),
    ("a\tAND\nb", And((C("a"), C("b")))),
]


@pytest.mark.parametrize("text,expected", GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden(text, expected):
    tree = parse(text)
    assert tree == expected
    assert parse(format(tree)) == tree
    assert from_json(json.loads(json.dumps(to_json(tree)))) == tree


# (query, position, a fragment of the error's message or expected)
ERRORS = [
    ("", 0, "empty query"),
    ("   ", 0, "empty query"),
    ("dog AND", 7, "a term, a filter or '('"),
    ("dog AND ) cat", 8, "a term, a filter or '('"),
    ("AND dog", 0, "a term, a filter or '('"),
    ("(dog", 4, "')' to close the '(' at position 0"),
    ("dog)", 3, "unmatched ')'"),
    ("()", 1, "a term, a filter or '('"),
    ("red circle width>5", 11, "join terms"),
    ('"red" circle', 6, "join terms"),
    ("dog OR OR cat", 7, "a term"),
    ("NOT", 3, "a term"),
    ('"unterminated', 0, "unterminated"),
    ('dog AND "bad \\q"', 13, "unknown escape"),
    ("a\x00b", 1, "control character"),
    ("width>", 6, "a value after '>'"),
    ("width>)", 6, "a value after '>'"),
    ("width>=>5", 7, "a value after '>='"),
    ("3:00", 0, "identifier"),
    ("ab-c=5", 0, "identifier"),
    ("2*width>5", 2, "not a filter"),
    ("*dog", 0, "a term"),
    ("x*dog", 0, "must be a number"),
    ("0*dog", 0, "weight"),
    ("-1*dog", 0, "weight"),
    ("1000*dog", 0, "weight"),
    ("2*(a OR b)", 2, "a term after '*'"),
    ("dog@", 4, "number for the threshold"),
    ("dog@abc", 4, "number for the threshold"),
    ("dog@1.5", 4, "[-1, 1]"),
    ("dog@0.3 cat", 8, "join terms"),
    ('dog AND ""', 8, "empty quoted phrase"),
    ("added>2026-13-01", 6, "invalid value"),
    ("x>1e999", 2, "out of range"),
    ("dog AND cat) OR (x", 11, "unmatched ')'"),
    ("dog <", 5, "a value after '<'"),
]


@pytest.mark.parametrize("text,pos,fragment", ERRORS, ids=[e[0] or "<empty>" for e in ERRORS])
def test_error_positions(text, pos, fragment):
    with pytest.raises(QuerySyntaxError) as ei:
        parse(text)
    err = ei.value
    assert err.position == pos, str(err)
    assert err.query == text
    assert f"at position {pos}" in str(err)
    if fragment:
        assert fragment in f"{err.message} {err.expected}"
    assert isinstance(err, InvalidInput)  # the CLI maps it to exit code 2


def test_error_message_shape():
    with pytest.raises(QuerySyntaxError) as ei:
        parse("dog AND ( )")
    assert str(ei.value) == "unexpected ')' at position 10 (expected a term, a filter or '(')"
    assert ei.value.expected == "a term, a filter or '('"


def test_limits():
    with pytest.raises(InvalidInput, match="too long"):
        parse("x" * 2001)
    assert parse("x" * 2000) == C("x" * 2000)
    assert parse("y" * 50, max_length=50) == C("y" * 50)
    q = " AND ".join(f"w{i}" for i in range(33))
    with pytest.raises(QuerySyntaxError, match="too many terms") as ei:
        parse(q)
    assert ei.value.position == q.index("w32")
    assert len(concepts(parse(q, max_terms=33))) == 33
    with pytest.raises(QuerySyntaxError, match="too many terms"):
        parse(" OR ".join(f"c{i}>1" for i in range(4)), max_terms=3)
    deep = "(" * 100 + "a" + ")" * 100
    with pytest.raises(QuerySyntaxError, match="nested too deeply") as ei:
        parse(deep)
    assert ei.value.position == 64
    assert parse(deep, max_depth=100) == C("a")
    with pytest.raises(QuerySyntaxError, match="nested too deeply"):
        parse("NOT " * 400 + "a")
    with pytest.raises(InvalidInput, match="must be a string"):
        parse(None)  # type: ignore[arg-type]


def test_keywords_are_case_sensitive_words():
    assert parse("cats and dogs or not birds") == C("cats and dogs or not birds")
    assert parse('"AND" OR "NOT"') == Or((C("AND"), C("NOT")))


def test_format_examples():
    assert format(parse("red circle AND NOT (square OR triangle)")) == "red circle AND NOT (square OR triangle)"
    assert format(parse("(a OR b) AND NOT (c AND d)")) == "(a OR b) AND NOT (c AND d)"
    assert format(parse("a AND b OR c")) == "a AND b OR c"
    assert format(parse('2*"sunset"@0.3')) == "2*sunset@0.3"
    assert format(parse("0.5*x")) == "0.5*x"
    assert format(parse("split=val")) == 'split="val"'
    assert format(parse('path:"*/2021/*" AND added>2026-01-01')) == 'path:"*/2021/*" AND added>2026-01-01'
    assert format(C("AND")) == '"AND"'
    assert format(C("a:b")) == '"a:b"'
    assert format(C('say "hi"')) == r'"say \"hi\""'
    assert format(And((Not(Not(C("a"))), Or((C("b"), Not(C("c"))))))) == "NOT NOT a AND (b OR NOT c)"
    with pytest.raises(InvalidInput):
        format("dog")  # type: ignore[arg-type]


def test_tokenize_spans():
    toks = tokenize('2*"a b"@0.3 AND width>=5')
    assert [t.kind for t in toks] == ["WORD", "STAR", "STRING", "AT", "WORD", "AND", "WORD", "OP", "VALUE", "EOF"]
    assert [(t.pos, t.end) for t in toks][:3] == [(0, 1), (1, 2), (2, 7)]
    assert toks[2].text == "a b"


# ------------------------------------------------------------------------------------------- tree helpers
def test_constructors_validate_and_flatten():
    assert And((And((C("a"), C("b"))), C("c"))) == And((C("a"), C("b"), C("c")))
    assert Or([C("a"), Or((C("b"), C("c")))]).children == (C("a"), C("b"), C("c"))
    assert And((Or((C("a"), C("b"))), C("c"))).children[0] == Or((C("a"), C("b")))
    assert F("x", "==", 1) == F("x", "=", 1)
    assert C("x", weight=2) == C("x", weight=2.0) and isinstance(C("x", weight=2).weight, float)
    hash(parse("a AND (b OR width>5) AND NOT added>2026-01-01"))
    bad = [
        lambda: C(""), lambda: C("   "), lambda: C(5),  # type: ignore[arg-type]
        lambda: C("x", weight=0), lambda: C("x", weight=float("nan")), lambda: C("x", weight=True),
        lambda: C("x", weight=101), lambda: C("x", threshold=1.5), lambda: C("x", threshold=float("inf")),
        lambda: F("1col", "=", 1), lambda: F("a b", "=", 1), lambda: F("AND", "=", 1), lambda: F("x", "~", 1),
        lambda: F("x", "=", None), lambda: F("x", "=", True), lambda: F("x", "=", float("nan")),
        lambda: F("x", ":", 5), lambda: F('x"; DROP', "=", 1),
        lambda: And((C("a"),)), lambda: And(()), lambda: Or("ab"), lambda: And((C("a"), "b")),
        lambda: Not("a"), lambda: And(C("a")),
    ]
    for make in bad:
        with pytest.raises(InvalidInput):
            make()


def test_concepts_filters_polarity_split():
    t = parse("dog AND width>100 AND NOT (cat OR height<5) AND 2*beach@0.2")
    assert concepts(t) == [C("dog"), C("cat"), C("beach", 2.0, 0.2)]
    assert filters(t) == [F("width", ">", 100), F("height", "<", 5)]
    assert concepts_with_polarity(t) == [(C("dog"), True), (C("cat"), False), (C("beach", 2.0, 0.2), True)]
    assert concepts_with_polarity(parse("NOT (a AND NOT b)")) == [(C("a"), False), (C("b"), True)]
    f, rest = split(t)
    assert f == F("width", ">", 100)
    assert rest == And((C("dog"), Not(Or((C("cat"), F("height", "<", 5)))), C("beach", 2.0, 0.2)))
    assert split(parse("width>1 AND (height>2 OR NOT size<3) AND dog")) == (
        And((F("width", ">", 1), Or((F("height", ">", 2), Not(F("size", "<", 3)))))), C("dog"))
    assert split(parse("width>1 AND height<2")) == (parse("width>1 AND height<2"), None)
    assert split(parse("dog OR width>1")) == (None, parse("dog OR width>1"))
    assert split(C("dog")) == (None, C("dog"))
    assert is_pure_filter(parse("NOT (a>1 OR b:c)")) and not is_pure_filter(parse("a>1 OR c"))
    assert conj([]) is None and conj([C("a")]) == C("a") and disj([C("a"), C("b")]) == Or((C("a"), C("b")))
    assert len(list(walk(t))) == 8  # And, dog, width, Not, Or, cat, height, beach


# ------------------------------------------------------------------------------------------------- JSON
def test_json_form():
    t = parse('2*sunset@0.3 AND NOT added>2026-01-01 AND (x<=1.5 OR split="val" OR t=2026-01-01T10:00)')
    j = to_json(t)
    assert j["type"] == "and" and j["children"][0] == {"type": "concept", "text": "sunset", "weight": 2.0,
                                                        "threshold": 0.3}
    assert j["children"][1] == {"type": "not", "child": {"type": "filter", "column": "added", "op": ">",
                                                         "value": "2026-01-01", "value_type": "date"}}
    assert from_json(json.loads(json.dumps(j))) == t
    assert from_json({"type": "concept", "text": "dog"}) == C("dog")
    assert from_json({"type": "filter", "column": "w", "op": "==", "value": 3}) == F("w", "=", 3)
    assert from_json({"type": "filter", "column": "w", "op": ">", "value": 3, "value_type": "float"}) == F("w", ">", 3.0)


JSON_ERRORS = [
    ([], "$", "object"),
    ({"type": "concept"}, "$.text", "required"),
    ({"type": "Concept", "text": "x"}, "$.type", "one of"),
    ({"text": "x"}, "$.type", "one of"),
    ({"type": "concept", "text": "x", "wieght": 2}, "$.wieght", "unknown field"),
    ({"type": "concept", "text": ""}, "$.text", "non-empty"),
    ({"type": "concept", "text": "x", "weight": "2"}, "$.weight", "number"),
    ({"type": "concept", "text": "x", "weight": True}, "$.weight", "number"),
    ({"type": "concept", "text": "x", "weight": -1}, "$.weight", "number"),
    ({"type": "concept", "text": "x", "threshold": 2}, "$.threshold", "[-1, 1]"),
    ({"type": "and", "children": [{"type": "concept", "text": "a"}]}, "$.children", "at least two"),
    ({"type": "and", "children": {"a": 1}}, "$.children", "list"),
    ({"type": "or", "children": [{"type": "concept", "text": "a"}, {"type": "concept", "text": "b", "weight": 0}]},
     "$.children[1].weight", "number"),
    ({"type": "not", "child": {"type": "not", "child": 5}}, "$.child.child", "object"),
    ({"type": "filter", "column": "1x", "op": "=", "value": 1}, "$.column", "identifier"),
    ({"type": "filter", "column": "x", "op": "LIKE", "value": 1}, "$.op", "one of"),
    ({"type": "filter", "column": "x", "op": "=", "value": None}, "$.value", "string or number"),
    ({"type": "filter", "column": "x", "op": "=", "value": [1]}, "$.value", "string or number"),
    ({"type": "filter", "column": "x", "op": "=", "value": True}, "$.value", "string or number"),
    ({"type": "filter", "column": "x", "op": "=", "value": "2026-1-1", "value_type": "date"}, "$.value", "ISO date"),
    ({"type": "filter", "column": "x", "op": "=", "value": "2026-02-30", "value_type": "date"}, "$.value", "invalid"),
    ({"type": "filter", "column": "x", "op": "=", "value": 1.5, "value_type": "int"}, "$.value", "value_type"),
    ({"type": "filter", "column": "x", "op": "=", "value": 1, "value_type": "uuid"}, "$.value_type", "one of"),
    ({"type": "filter", "column": "x", "op": ":", "value": 1}, "$.value", "glob"),
]


@pytest.mark.parametrize("obj,path,fragment", JSON_ERRORS, ids=[str(i) for i in range(len(JSON_ERRORS))])
def test_json_errors_name_the_path(obj, path, fragment):
    with pytest.raises(InvalidInput) as ei:
        from_json(obj)
    assert ei.value.path == path
    assert f"at {path}:" in str(ei.value) and fragment in str(ei.value)


def test_json_limits():
    leaf = {"type": "concept", "text": "a"}
    with pytest.raises(InvalidInput, match="too many terms"):
        from_json({"type": "or", "children": [leaf] * 33})
    deep: dict = leaf
    for _ in range(100):
        deep = {"type": "not", "child": deep}
    with pytest.raises(InvalidInput, match="deeper"):
        from_json(deep)
    assert isinstance(from_json(deep, max_depth=100), Not)


def test_query_does_not_import_torch():
    code = ("import sys, query.parse, query.ast, query.sql; "
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules and 'duckdb' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# ------------------------------------------------------------------------------------------ properties
_TOKENS = ["AND", "OR", "NOT", "(", ")", '"', "\\", "*", "@", "&", "|", "!", "=", "==", "!=", "<", "<=", ">",
           ">=", ":", "dog", "red circle", "width", "0.5", "2", "-1", "2026-01-01", "2026-13-01", "1e999", " ",
           "\t", "\x00", "é", '"a\\"b"', "_x", "path", "*/2021/*", "@0.3", "2*"]


def _only_typed_errors(text: str) -> None:
    try:
        tree = parse(text)
    except QuerySyntaxError as e:
        assert 0 <= e.position <= len(text)
        assert e.query == text
        return
    except InvalidInput:
        return
    # whatever parses must print back to text that parses to the same tree
    assert parse(format(tree), max_length=10**6) == tree


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_random_text_only_raises_typed_errors(text):
    _only_typed_errors(text)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_TOKENS), max_size=14), st.sampled_from(["", " "]))
def test_random_token_soup_only_raises_typed_errors(parts, sep):
    _only_typed_errors(sep.join(parts))


_words = st.lists(st.sampled_from(["dog", "red", "circle", "3", "t-shirt", "café", "and", "x.y", "a'b"]),
                  min_size=1, max_size=3).map(" ".join)
_texts = st.one_of(_words, st.text(min_size=1, max_size=12).filter(lambda s: s.strip()))
_concepts = st.builds(
    Concept, _texts,
    st.one_of(st.just(1.0), st.floats(min_value=0, max_value=100, exclude_min=True)),
    st.one_of(st.none(), st.floats(min_value=-1, max_value=1)))
_columns = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True).filter(lambda s: s not in ("AND", "OR", "NOT"))
_values = st.one_of(st.text(max_size=10), st.integers(min_value=-10**20, max_value=10**20),
                    st.floats(allow_nan=False, allow_infinity=False), st.dates(),
                    st.datetimes())
_filters = st.one_of(
    st.builds(Filter, _columns, st.sampled_from(["=", "!=", "<", "<=", ">", ">="]), _values),
    st.builds(Filter, _columns, st.just(":"), st.text(max_size=10)))
_trees = st.recursive(
    st.one_of(_concepts, _filters),
    lambda kids: st.one_of(
        st.builds(Not, kids),
        st.lists(kids, min_size=2, max_size=4).map(lambda xs: And(tuple(xs))),
        st.lists(kids, min_size=2, max_size=4).map(lambda xs: Or(tuple(xs)))),
    max_leaves=12)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_trees)
def test_format_parse_round_trip(tree):
    text = format(tree)
    assert parse(text, max_length=10**6, max_depth=1000) == tree, text
    assert from_json(json.loads(json.dumps(to_json(tree))), max_depth=1000) == tree


def test_printable_ascii_alphabet_round_trip_examples():
    # every printable ASCII character inside a phrase survives format -> parse
    text = string.printable.strip()
    assert parse(format(C(text))) == C(text)
    assert parse(format(F("v", "=", text))) == F("v", "=", text)
