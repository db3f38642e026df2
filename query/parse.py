"""The query language: tokenizer, recursive-descent parser and pretty-printer (``format``). Pure Python.

Grammar (EBNF; whitespace separates tokens and is otherwise ignored)::

    query     = or_expr EOF ;
    or_expr   = and_expr { OR and_expr } ;                    (* OR  = "OR"  | "|" | "||" *)
    and_expr  = unary { AND unary } ;                         (* AND = "AND" | "&" | "&&" *)
    unary     = NOT unary | primary ;                         (* NOT = "NOT" | "!"        *)
    primary   = "(" or_expr ")" | example | filter | concept ;
    example   = [ number "*" ] "like" ":" ( digits | phrase | bare_value ) [ "@" number ] ;
    filter    = column cmp value ;
    column    = identifier ;                                  (* [A-Za-z_][A-Za-z0-9_]* *)
    cmp       = "=" | "==" | "!=" | "<" | "<=" | ">" | ">=" | ":" ;   (* ":" = glob match *)
    value     = phrase | bare_value ;
    concept   = [ number "*" ] ( phrase | word { word } ) [ "@" number ] ;
    phrase    = '"' { char | "\\" | '\"' } '"' ;
    word      = a run of characters that are not whitespace, control characters or ( ) " * @ & | ! = < > : ;
                "AND", "OR" and "NOT" (upper case, whole word) are keywords, never words ;
    bare_value= a run of characters that are not whitespace, control characters or ( ) " & | ,
                not starting with = < > ! : ;
    number    = [ "+" | "-" ] ( digits [ "." [digits] ] | "." digits ) [ ( "e" | "E" ) [ "+" | "-" ] digits ] ;

Meaning
  * Precedence NOT > AND > OR; AND and OR are n-ary and flattened. There is no implicit AND: two terms
    must be joined by an operator. Consecutive bare words form ONE concept (``red circle`` is the concept
    "red circle"); lower-case ``and``/``or``/``not`` are ordinary words ("salt and pepper" is one concept).
    ``-`` is not an operator (``t-shirt`` is one word); use ``NOT`` or ``!``.
  * A word directly followed by a comparison operator starts a filter (so it ends any concept before it):
    ``width>=512``, ``split="val"``, ``status!=ok``, ``path:"*/2021/*"``, ``added>2026-01-01``.
  * ``2*"sunset"`` weights a concept (0 < weight <= 100); ``"sunset"@0.3`` or ``red circle@0.3`` overrides
    its threshold with a cosine score in [-1, 1]. Both: ``2*red circle@0.3``. Weights and thresholds apply
    to concepts only.
  * Filter values: a quoted value is always a string; a bare value is an int (``512``), a float (``0.5``,
    ``1e+20``), a date (``2026-01-01``), a datetime (``2026-01-01T10:30[:00[.ffffff]]``), else a string
    (``ok``). After ``:`` the value is always a string (a glob pattern: ``*``, ``?``, ``[abc]``).
  * ``like:812`` is an example image by catalog id, ``like:"photos/cat.jpg"`` (or bare ``like:cat.jpg``) an
    image file; both take a weight and a threshold like a concept (``2*like:812@0.9``). ``like`` before ``:``
    is therefore not a filter column.
  * Quoted phrases use double quotes; inside them ``\\"`` is a quote and ``\\\\`` a backslash (no other escapes).
  * Positions in errors are 0-based character offsets into the query.

Example:
    >>> parse('2*"sunset"@0.3 AND NOT (sea OR lake) AND width>=512')
    And(children=(Concept(text='sunset', weight=2.0, threshold=0.3), Not(child=Or(...)), Filter(...)))
"""
from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from datetime import date, datetime

from t2c.data.errors import InvalidInput, QuerySyntaxError
from t2c.query.ast import (IDENTIFIER, KEYWORDS, MAX_DEPTH, MAX_WEIGHT, And, Concept, Example, Filter, Node, Not,
                           Or, Visitor)

__all__ = ["parse", "format", "tokenize", "Token"]

_SPECIAL = frozenset('()"*@&|!=<>:')
_VALUE_STOP = frozenset('()"&|')
_VALUE_NO_START = frozenset("=<>!:")
_INT_RE = re.compile(r"[+-]?[0-9]+\Z")
_FLOAT_RE = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?\Z")
_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}\Z")
_DATETIME_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?\Z")
_KEYWORD_ALIASES = {"&": "AND", "&&": "AND", "|": "OR", "||": "OR", "!": "NOT"}


@dataclass(frozen=True)
class Token:
    """One lexical token: kind, source text (or decoded phrase), and its span in the query."""

    kind: str  # WORD STRING VALUE LPAREN RPAREN AND OR NOT STAR AT OP EOF ERROR
    text: str
    pos: int
    end: int
    error: tuple | None = None  # (message, expected) for ERROR tokens


def _is_control(c: str) -> bool:
    return unicodedata.category(c) == "Cc"


def _is_word_char(c: str) -> bool:
    return not (c.isspace() or c in _SPECIAL or _is_control(c))


def _is_value_char(c: str) -> bool:
    return not (c.isspace() or c in _VALUE_STOP or _is_control(c))


def _lex_string(s: str, i: int) -> Token:
    """Lex a double-quoted phrase starting at s[i] == '"'."""
    out: list[str] = []
    j = i + 1
    while j < len(s):
        c = s[j]
        if c == '"':
            return Token("STRING", "".join(out), i, j + 1)
        if c == "\\":
            if j + 1 < len(s) and s[j + 1] in '"\\':
                out.append(s[j + 1])
                j += 2
                continue
            bad = s[j:j + 2]
            return Token("ERROR", bad, j, j + len(bad),
                         (f"unknown escape {bad!r} in a quoted phrase", '\\" or \\\\'))
        out.append(c)
        j += 1
    return Token("ERROR", s[i:], i, len(s), ("unterminated quoted phrase", 'a closing "'))


def tokenize(s: str) -> list[Token]:
    """Split a query into tokens; a lexical error becomes an ERROR token followed by EOF."""
    toks: list[Token] = []
    i, n = 0, len(s)
    after_op = False
    while i < n:
        c = s[i]
        if c.isspace():
            i += 1
            continue
        if after_op:  # a filter value may follow a comparison operator
            after_op = False
            if c != '"' and _is_value_char(c) and c not in _VALUE_NO_START:
                j = i
                while j < n and _is_value_char(s[j]):
                    j += 1
                toks.append(Token("VALUE", s[i:j], i, j))
                i = j
                continue
        if c == '"':
            t = _lex_string(s, i)
            toks.append(t)
            if t.kind == "ERROR":
                break
            i = t.end
        elif c == "(":
            toks.append(Token("LPAREN", c, i, i + 1))
            i += 1
        elif c == ")":
            toks.append(Token("RPAREN", c, i, i + 1))
            i += 1
        elif c in "&|":
            j = i + 2 if s[i + 1:i + 2] == c else i + 1
            toks.append(Token(_KEYWORD_ALIASES[c], s[i:j], i, j))
            i = j
        elif c in "!=<>:":
            two = s[i:i + 2]
            if two in ("!=", "==", "<=", ">="):
                op = two
            elif c == "!":
                toks.append(Token("NOT", c, i, i + 1))
                i += 1
                continue
            else:
                op = c
            toks.append(Token("OP", op, i, i + len(op)))
            i += len(op)
            after_op = True
        elif c == "*":
            toks.append(Token("STAR", c, i, i + 1))
            i += 1
        elif c == "@":
            toks.append(Token("AT", c, i, i + 1))
            i += 1
        elif _is_control(c):
            toks.append(Token("ERROR", c, i, i + 1, (f"unexpected control character {c!r}", "a term, an operator or '('")))
            break
        else:
            j = i
            while j < n and _is_word_char(s[j]):
                j += 1
            w = s[i:j]
            toks.append(Token(w if w in KEYWORDS else "WORD", w, i, j))
            i = j
    toks.append(Token("EOF", "", n, n))
    return toks


def _describe(t: Token) -> str:
    if t.kind == "EOF":
        return "end of query"
    if t.kind == "STRING":
        return "a quoted phrase"
    text = t.text if len(t.text) <= 24 else t.text[:21] + "..."
    return repr(text)


class _Parser:
    def __init__(self, text: str, max_terms: int, max_depth: int):
        self.text = text
        self.toks = tokenize(text)
        self.i = 0
        self.max_terms = max_terms
        self.max_depth = max_depth
        self.terms = 0

    # -- token access
    @property
    def cur(self) -> Token:
        t = self.toks[self.i]
        if t.kind == "ERROR":
            raise self.error(t.error[0], t.pos, t.error[1])
        return t

    def peek(self, k: int = 1) -> Token:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def advance(self) -> Token:
        t = self.cur
        self.i += 1
        return t

    def error(self, message: str, pos: int, expected: str | None) -> QuerySyntaxError:
        return QuerySyntaxError(message, pos, expected, self.text)

    def unexpected(self, expected: str) -> QuerySyntaxError:
        t = self.cur
        if t.kind in ("WORD", "STRING") and expected.startswith("AND"):
            expected += "; join terms and filters with AND or OR (consecutive bare words are already one term)"
        return self.error(f"unexpected {_describe(t)}", t.pos, expected)

    def count_term(self, t: Token) -> None:
        self.terms += 1
        if self.terms > self.max_terms:
            raise self.error(f"too many terms (at most {self.max_terms})", t.pos, "a shorter query")

    def number(self, t: Token, what: str) -> float:
        if t.kind != "WORD" or not _FLOAT_RE.match(t.text):
            raise self.error(f"the {what} must be a number, not {_describe(t)}", t.pos, f"a number for the {what}")
        x = float(t.text)
        if not math.isfinite(x):
            raise self.error(f"{what} {t.text!r} is out of range", t.pos, "a finite number")
        return x

    # -- grammar
    def parse(self) -> Node:
        if self.cur.kind == "EOF":
            raise self.error("empty query", 0, "a term, a filter or '('")
        node = self.or_expr(0)
        t = self.cur
        if t.kind == "RPAREN":
            raise self.error("unmatched ')'", t.pos, "AND, OR or end of query")
        if t.kind != "EOF":
            raise self.unexpected("AND, OR or end of query")
        return node

    def or_expr(self, depth: int) -> Node:
        kids = [self.and_expr(depth)]
        while self.cur.kind == "OR":
            self.advance()
            kids.append(self.and_expr(depth))
        return kids[0] if len(kids) == 1 else Or(tuple(kids))

    def and_expr(self, depth: int) -> Node:
        kids = [self.unary(depth)]
        while self.cur.kind == "AND":
            self.advance()
            kids.append(self.unary(depth))
        return kids[0] if len(kids) == 1 else And(tuple(kids))

    def unary(self, depth: int) -> Node:
        t = self.cur
        if t.kind == "NOT":
            if depth >= self.max_depth:
                raise self.error(f"query nested too deeply (at most {self.max_depth} levels)", t.pos, "a flatter query")
            self.advance()
            return Not(self.unary(depth + 1))
        return self.primary(depth)

    def primary(self, depth: int) -> Node:
        t = self.cur
        if t.kind == "LPAREN":
            if depth >= self.max_depth:
                raise self.error(f"query nested too deeply (at most {self.max_depth} levels)", t.pos, "a flatter query")
            self.advance()
            if self.cur.kind == "RPAREN":
                raise self.unexpected("a term, a filter or '('")
            node = self.or_expr(depth + 1)
            if self.cur.kind != "RPAREN":
                raise self.unexpected(f"AND, OR or ')' to close the '(' at position {t.pos}")
            self.advance()
            return node
        if self.at_example():
            return self.example(1.0)
        if t.kind == "WORD" and self.peek().kind == "OP":
            return self.filter()
        if t.kind == "WORD" and self.peek().kind == "STAR":
            w = self.number(t, "weight")
            if not 0 < w <= MAX_WEIGHT:
                raise self.error(f"weight must be in (0, {MAX_WEIGHT:g}], got {t.text}", t.pos,
                                 f"a weight in (0, {MAX_WEIGHT:g}]")
            self.advance()
            self.advance()
            nxt = self.cur
            if self.at_example():
                return self.example(w)
            if nxt.kind == "WORD" and self.peek().kind == "OP":
                raise self.error("a weight applies to a concept, not a filter", nxt.pos, "a term after '*'")
            if nxt.kind not in ("WORD", "STRING"):
                raise self.unexpected("a term after '*'")
            return self.concept(w)
        if t.kind in ("WORD", "STRING"):
            return self.concept(1.0)
        raise self.unexpected("a term, a filter or '('")

    def concept(self, weight: float) -> Concept:
        t = self.advance()
        if t.kind == "STRING":
            if not t.text.strip():
                raise self.error("empty quoted phrase", t.pos, "a non-empty phrase")
            text = t.text
        else:
            words = [t.text]
            while self.cur.kind == "WORD" and self.peek().kind not in ("OP", "STAR"):
                words.append(self.advance().text)
            text = " ".join(words)
        threshold = None
        if self.cur.kind == "AT":
            self.advance()
            nt = self.cur
            threshold = self.number(nt, "threshold")
            if not -1.0 <= threshold <= 1.0:
                raise self.error(f"threshold must be a cosine score in [-1, 1], got {nt.text}", nt.pos,
                                 "a threshold in [-1, 1]")
            self.advance()
        self.count_term(t)
        return Concept(text, weight, threshold)

    def at_example(self) -> bool:
        """True at ``like:`` (an example leaf, never a filter on a column named like)."""
        return self.cur.kind == "WORD" and self.cur.text == "like" and self.peek().kind == "OP" \
            and self.peek().text == ":"

    def example(self, weight: float) -> Example:
        t = self.advance()
        self.advance()
        vt = self.cur
        threshold_text = None
        if vt.kind == "STRING":
            if not vt.text.strip():
                raise self.error("empty image name after like:", vt.pos, "an image id or a quoted file name")
            ref: int | str = vt.text
            self.advance()
            if self.cur.kind == "AT":
                self.advance()
                threshold_text = self.cur
                self.advance()
        elif vt.kind == "VALUE":
            text, at, thr = vt.text.rpartition("@")
            if not at or not _FLOAT_RE.match(thr):  # no threshold: the whole value names the image
                text, at, thr = vt.text, "", ""
            if not text:
                raise self.error("missing image after like:", vt.pos, "an image id or a quoted file name")
            ref = int(text) if text.isdigit() else text
            if at:
                threshold_text = Token("WORD", thr, vt.pos + len(text) + 1, vt.end)
            self.advance()
        else:
            raise self.unexpected("an image id or a quoted file name after 'like:'")
        threshold = None
        if threshold_text is not None:
            threshold = self.number(threshold_text, "threshold")
            if not -1.0 <= threshold <= 1.0:
                raise self.error(f"threshold must be a cosine score in [-1, 1], got {threshold_text.text}",
                                 threshold_text.pos, "a threshold in [-1, 1]")
        self.count_term(t)
        return Example(ref, weight, threshold)

    def filter(self) -> Filter:
        col = self.advance()
        if not IDENTIFIER.match(col.text):
            raise self.error(f"column name must be an identifier, got {col.text!r}", col.pos,
                             "a column name like width, path or added (quote text that contains ':' or '=')")
        op = self.advance()
        vt = self.cur
        if vt.kind == "STRING":
            value: object = vt.text
        elif vt.kind == "VALUE":
            value = vt.text if op.text == ":" else self.typed_value(vt)
        else:
            raise self.unexpected(f"a value after '{op.text}'")
        self.advance()
        self.count_term(col)
        return Filter(col.text, op.text, value)

    def typed_value(self, t: Token):
        s = t.text
        try:
            if _INT_RE.match(s):
                return int(s)
            if _FLOAT_RE.match(s):
                x = float(s)
                if not math.isfinite(x):
                    raise self.error(f"number {s!r} is out of range", t.pos, "a finite number")
                return x
            if _DATE_RE.match(s):
                return date.fromisoformat(s)
            if _DATETIME_RE.match(s):
                return datetime.fromisoformat(s)
        except ValueError as e:
            raise self.error(f"invalid value {s!r} ({e})", t.pos, "a valid number, date (YYYY-MM-DD) or quoted string")
        return s


def parse(text: str, *, max_length: int = 2000, max_terms: int = 32, max_depth: int = MAX_DEPTH) -> Node:
    """Parse a query string into a tree of frozen dataclasses (see the module docstring for the grammar).

    Args:
        text: the query, e.g. ``'red circle AND NOT (square OR triangle) AND width>=512'``.
        max_length: longest query accepted, in characters.
        max_terms: most concepts + filters accepted.
        max_depth: deepest nesting of parentheses and NOTs accepted.
    Returns:
        A Concept, Filter, And, Or or Not node.
    Raises:
        QuerySyntaxError: with ``.position`` (0-based), ``.expected`` and ``.query``; for bad syntax, an empty
            query, too many terms or too deep nesting.
        InvalidInput: the query is not a string or is longer than ``max_length``.
    Example:
        >>> parse("red circle AND width>=512")
        And(children=(Concept(text='red circle', weight=1.0, threshold=None), Filter(column='width', op='>=', value=512)))
    """
    if not isinstance(text, str):
        raise InvalidInput(f"query must be a string, got {type(text).__name__}")
    if len(text) > max_length:
        raise InvalidInput(f"query is too long: {len(text)} characters (at most {max_length})",
                           "shorten the query or split it into several")
    return _Parser(text, max_terms, max_depth).parse()


# ------------------------------------------------------------------------------------------- formatting
def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(float(x))


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _bare_ok(text: str) -> bool:
    if not text or text != " ".join(text.split()):
        return False
    return all(w not in KEYWORDS and all(_is_word_char(c) for c in w) for w in text.split(" "))


def _value(v) -> str:
    if isinstance(v, str):
        return _quote(v)
    if isinstance(v, date):
        return v.isoformat()
    if isinstance(v, float):
        return repr(v)
    return str(v)


class _Formatter(Visitor):
    """Query text of a tree; ``min_prec`` is the binding strength the context needs (parenthesise below it)."""

    def visit_concept(self, node: Concept, min_prec: int) -> str:
        s = (f"{_num(node.weight)}*" if node.weight != 1.0 else "") + \
            (node.text if _bare_ok(node.text) else _quote(node.text))
        return s + (f"@{_num(node.threshold)}" if node.threshold is not None else "")

    def visit_example(self, node: Example, min_prec: int) -> str:
        s = (f"{_num(node.weight)}*" if node.weight != 1.0 else "") + node.text
        return s + (f"@{_num(node.threshold)}" if node.threshold is not None else "")

    def visit_filter(self, node: Filter, min_prec: int) -> str:
        return f"{node.column}{node.op}{_value(node.value)}"

    def visit_not(self, node: Not, min_prec: int) -> str:
        s = "NOT " + self.visit(node.child, 3)
        return f"({s})" if 3 < min_prec else s

    def visit_bool(self, node, min_prec: int) -> str:
        p = 2 if isinstance(node, And) else 1
        s = (" AND " if p == 2 else " OR ").join(self.visit(c, p + 1) for c in node.children)
        return f"({s})" if p < min_prec else s


def format(node: Node) -> str:  # noqa: A001 - the natural name; shadows the builtin only in this module
    """Pretty-print a tree as query text; ``parse(format(tree)) == tree`` for every valid tree."""
    if not isinstance(node, Node):
        raise InvalidInput(f"not a query node: {type(node).__name__}")
    return _Formatter().visit(node, 0)
