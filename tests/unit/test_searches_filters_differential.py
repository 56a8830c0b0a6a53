"""Differential tests: the gateway's filter parser against MLflow's own (``mlflow.utils.search_utils``).

Random filters are generated from the search-filter grammar, with every production MLflow's
``sqlparse``-based parser knows (and some it does not): keys in each quoting style, keywords as
keys, every comparator spelling, strings holding quotes, backslashes and wildcards, numbers in each
lexical form, ``IN`` lists, whitespace variants, and joiners (``AND``, ``OR``, ``;``, comments).

MLflow's verdict is its parser *plus* the store's checks of comparators and values
(``_get_search_experiments_filter_clauses``, ``_get_sqlalchemy_filter_clauses``): that is what
decides whether the upstream answers 200 or 400. For every generated filter:

* the gateway accepts it  iff  MLflow accepts it, and the parsed comparisons are identical;
* productions that are *outside* the gateway's grammar although MLflow tolerates some of them
  (stray or missing ``AND``, Python escapes and implicit concatenation inside ``IN`` lists, spaces
  around the ``.`` of an identifier, mixed quoting inside one key, sqlparse's aliased identifiers,
  lists compared with ``=``) are tagged by the generator: the gateway refuses those (pinned by
  :data:`MLFLOW_LOOSER`), and if it accepts a tagged filter at all it must agree with MLflow;
* whatever the gateway accepts, its canonical re-serialisation means the same to MLflow, and the
  experiment-scoped rewrite means "the same comparisons, names prefixed, plus the tenant clause".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy
import sqlparse
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from mlflow.store.tracking.sqlalchemy_store import (
    _get_search_experiments_filter_clauses,
    _get_sqlalchemy_filter_clauses,
)
from mlflow.utils.search_utils import SearchExperimentsUtils, SearchUtils
from sqlalchemy.orm import Session
from sqlparse.sql import Identifier, TokenList

from gateway.policy import filters
from gateway.policy.filters import EXPERIMENTS, RUNS, FilterError, Grammar

_SESSION = Session(sqlalchemy.create_engine("sqlite://"))
SETTINGS = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def mlflow_parse(text: str, grammar: Grammar) -> list[dict[str, Any]] | None:
    """MLflow's verdict: the parsed comparisons (comparators upper-cased, as the store reads them), or None."""
    try:
        if grammar is EXPERIMENTS:
            parsed = SearchExperimentsUtils.parse_search_filter(text)
            _get_search_experiments_filter_clauses(parsed, "sqlite")
        else:
            parsed = SearchUtils.parse_search_filter(text)
            _get_sqlalchemy_filter_clauses(parsed, _SESSION, "sqlite")
    except Exception:
        return None
    if any(overflows(comparison) for comparison in parsed):
        return None  # the database refuses to bind it: the upstream answers 500, never results
    return [{**comparison, "comparator": comparison["comparator"].upper()} for comparison in parsed]


def overflows(comparison: dict[str, Any]) -> bool:
    """An integer the store binds to a 64-bit column (numeric attributes, experiment ids) that does not fit."""
    values = comparison["value"] if isinstance(comparison["value"], tuple) else (comparison["value"],)
    if comparison["type"] != "attribute":
        return False
    if comparison["key"] == "experiment_id":
        values = tuple(int(v) for v in values)
    return any(isinstance(v, int) and not -(2**63) <= v < 2**63 for v in values)


def gateway_parse(text: str, grammar: Grammar) -> list[dict[str, Any]] | None:
    try:
        return [comparison.as_mlflow() for comparison in filters.parse_filter(text, grammar)]
    except FilterError:
        return None


# -- the generator ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """Generated filter text, and whether it uses a production outside the gateway's grammar."""

    text: str
    outside: bool = False

    def __add__(self, other: Piece) -> Piece:
        return Piece(self.text + other.text, self.outside or other.outside)


def piece(text: str, outside: bool = False) -> Piece:
    return Piece(text, outside)


# Characters that stress quoting: both quotes, backslash, backtick, LIKE wildcards, separators,
# whitespace, SQL comment starts, non-ASCII.
CONTENT = st.lists(
    st.sampled_from([*"ab_%/.' \"\\`-;()*,=é\t\n", "x", "Z", "0", "--", "/*", "''", '""', "\u2028"]), max_size=6
).map("".join)
WORDS = [
    "x", "loss", "acc_1", "_p", "mlflow", "runName", "name", "status",
    "from", "FROM", "in", "as", "case", "using", "values",  # sqlparse keywords that break identifiers
    "and", "AND", "or", "not", "null", "like", "select", "order", "desc", "end", "join", "is",
]  # fmt: skip
WHITESPACE = st.sampled_from([" ", " ", " ", "  ", "\t", "\n", "\r\n"])


@st.composite
def keys(draw: st.DrawFn) -> Piece:
    """The key after ``entity.``: dotted words or one quoted token."""
    style = draw(st.sampled_from(["word", "dotted", "backtick", "dquote", "squote", "mixed", "spaced", "aliased"]))
    if style == "word":
        return piece(draw(st.sampled_from(WORDS)))
    if style == "dotted":
        parts = draw(st.lists(st.sampled_from(WORDS), min_size=2, max_size=3))
        # sqlparse keywords inside a dotted key: MLflow accepts some positions, the gateway none.
        return piece(".".join(parts), outside=any(part.upper() in filters._UNQUOTABLE_KEY_WORDS for part in parts))
    if style == "mixed":
        return piece(draw(st.sampled_from(WORDS)) + ".`" + draw(st.sampled_from(WORDS)) + "`", outside=True)
    if style == "spaced":
        return piece(" " + draw(st.sampled_from(WORDS)), outside=True)
    if style == "aliased":  # sqlparse's "identifier alias": MLflow reads "x y" as one key before IS NULL
        return piece(draw(st.sampled_from(WORDS)) + " " + draw(st.sampled_from(["y", "`y`"])), outside=True)
    quote = {"backtick": "`", "dquote": '"', "squote": "'"}[style]
    content = draw(CONTENT)
    # Its own quote inside a quoted key ends the token early: sqlparse then reads several tokens, which
    # MLflow sometimes glues back into a key (`"".""` is the key `"."`); the gateway refuses such keys.
    return piece(quote + content + quote, outside=quote in content)


def identifiers(grammar: Grammar) -> st.SearchStrategy[Piece]:
    attributes = [*sorted(grammar.attributes), "foo", "NAME", "Name", "run name", "timestamp", "id"]
    entities = [*grammar.entities, "Tags", "foo", "metric", "param", "attribute", "dataset", "`tags`", '"tags"']

    @st.composite
    def build(draw: st.DrawFn) -> Piece:
        style = draw(st.sampled_from(["bare", "bare", "quoted", "entity", "entity", "entity"]))
        if style == "bare":
            return piece(draw(st.sampled_from(attributes)))
        if style == "quoted":
            quote = draw(st.sampled_from(["`", '"', "'"]))
            return piece(quote + draw(st.sampled_from(attributes)) + quote)
        return piece(draw(st.sampled_from(entities)) + ".") + draw(keys())

    return build()


NUMBERS = ["1", "0", "-5", "007", "1.5", "1.", ".5", "-.5", "1e3", "1.5E-3", "0x1F", "99999999999999999999", "5a"]


@st.composite
def strings(draw: st.DrawFn) -> Piece:
    quote = draw(st.sampled_from(["'", '"']))
    content = draw(CONTENT)
    # Its own quote inside ends the token early, as in keys: sqlparse may then read a dotted name that
    # MLflow takes as the value (`"".""` is the value "."); the gateway refuses what it cannot read as
    # one string. Where it accepts, it must still agree (check_agreement).
    return piece(quote + content + quote, outside=quote in content.replace(quote * 2, ""))


@st.composite
def lists(draw: st.DrawFn) -> Piece:
    style = draw(st.sampled_from(["ids", "ids", "strings", "empty", "trailing", "concat", "numbers"]))
    if style == "empty":
        return piece("()")
    if style == "numbers":
        return piece("(1, 2)")
    if style == "concat":
        return piece("('1' '2')", outside=True)
    if style == "ids":
        items = [piece(f"'{value}'") for value in draw(st.lists(st.sampled_from(["1", "22", "x", " 3"]), min_size=1))]
    else:
        items = draw(st.lists(strings(), min_size=1, max_size=3))
    # Python literal semantics inside a list: escapes, and a doubled quote is implicit concatenation.
    outside = any("\\" in item.text[1:-1] or item.text[0] in item.text[1:-1] for item in items)
    text = "(" + ", ".join(item.text for item in items) + ("," if style == "trailing" else "") + ")"
    return Piece(text, outside or any(item.outside for item in items))


@st.composite
def comparisons(draw: st.DrawFn, grammar: Grammar) -> Piece:
    identifier = draw(identifiers(grammar))
    ws = draw(WHITESPACE)
    style = draw(st.sampled_from(["op", "op", "op", "in", "null"]))
    if style == "null":
        return identifier + piece(draw(st.sampled_from([" IS NULL", " is null", " IS NOT NULL", " IS NOT  NULL"])))
    if style == "in":
        operator = draw(st.sampled_from(["IN", "in", "NOT IN", "not in", "NOT  IN"]))
        return identifier + piece(ws + operator + ws) + draw(lists())
    operator = draw(
        st.sampled_from(["=", "!=", "<", "<=", ">", ">=", "==", "<>", "LIKE", "like", "ILIKE", "NOT LIKE", "RLIKE"])
    )
    value_style = draw(st.sampled_from(["string", "string", "number", "word", "list"]))
    if value_style == "list":
        # MLflow compares a list with =, != or LIKE (a row value in SQL); the gateway refuses that.
        list_value = draw(lists())
        value = Piece(list_value.text, outside=True)
    elif value_style == "string":
        value = draw(strings())
    elif value_style == "number":
        value = piece(draw(st.sampled_from(NUMBERS)))
    else:
        value = piece(draw(st.sampled_from(["abc", "NULL", "`x`"])))
    return identifier + piece(ws + operator + ws) + value


JOINERS = [
    (" AND ", False), (" and ", False), ("\nAND\t", False), (" AND AND ", True), (" ", True),
    (" OR ", False), ("; ", False), (" -- c\nAND ", False), (" /* c */ AND ", False), (" AND NOT ", False),
]  # fmt: skip


@st.composite
def filter_texts(draw: st.DrawFn, grammar: Grammar) -> Piece:
    parts = draw(st.lists(comparisons(grammar), min_size=1, max_size=3))
    result = parts[0]
    for part in parts[1:]:
        joiner, outside = draw(st.sampled_from(JOINERS))
        result = result + piece(joiner, outside) + part
    ending = draw(st.sampled_from([("", False), ("", False), (" ", False), (" AND", True), (";", False)]))
    start = draw(st.sampled_from([("", False), ("", False), (" ", False), ("AND ", True), ("(", False)]))
    return piece(*start) + result + piece(*ending)


def unquotable(value: object) -> bool:
    """A string MLflow reads verbatim that no quoting can reproduce: both quotes, or a trailing backslash."""
    items = value if isinstance(value, tuple) else (value,)
    return any(
        isinstance(item, str) and (("'" in item and '"' in item) or item.endswith("\\") or "`" in item)
        for item in items
    )


# -- properties ------------------------------------------------------------------------------------


def aliased(text: str) -> bool:
    """True when sqlparse groups an identifier with an alias (``tags.x y IS NULL`` reads key "x y")."""

    def walk(tokens: TokenList) -> bool:
        for token in tokens.tokens:
            if isinstance(token, Identifier) and token.get_alias() is not None:
                return True
            if isinstance(token, TokenList) and walk(token):
                return True
        return False

    return walk(sqlparse.parse(text)[0])


def check_agreement(generated: Piece, grammar: Grammar) -> None:
    text = generated.text
    ours = gateway_parse(text, grammar)
    theirs = mlflow_parse(text, grammar)
    if generated.outside:
        # Refused on purpose (the tables below pin each such production); when quotes in the
        # generated content swallowed the production, what the gateway accepts must still agree.
        assert ours is None or ours == theirs, f"{text!r}: gateway {ours} != mlflow {theirs}"
        return
    if ours is None and theirs is not None and aliased(text):
        return  # an aliased identifier (the alias text becomes part of MLflow's key): refused on purpose
    assert ours == theirs, f"{text!r}: gateway {ours} != mlflow {theirs}"
    if ours is None:
        return
    try:
        canonical = filters.canonical_filter(text, grammar)
    except FilterError:
        # The one refusal of a filter MLflow accepts: a literal with no safe spelling.
        assert any(unquotable(c["value"]) or unquotable(c["key"]) for c in ours), text
        return
    assert mlflow_parse(canonical, grammar) == theirs, f"canonical {canonical!r} of {text!r} differs in MLflow"
    assert gateway_parse(canonical, grammar) == ours


@SETTINGS
@given(filter_texts(EXPERIMENTS))
@example(Piece("name = 'x' OR name LIKE '%'"))
@example(Piece("name = 'x\\' AND name LIKE '%'"))
@example(Piece("tags.`a``b` = \"it''s\""))
def test_experiment_filters_agree_with_mlflow(generated: Piece) -> None:
    check_agreement(generated, EXPERIMENTS)


@SETTINGS
@given(filter_texts(RUNS))
@example(Piece("metrics.x > 1e5AND params.y = 'z'"))
@example(Piece("`tags`.x = 'y' AND attributes.`Run Name` ILIKE '%a'"))
def test_run_filters_agree_with_mlflow(generated: Piece) -> None:
    check_agreement(generated, RUNS)


@SETTINGS
@given(filter_texts(EXPERIMENTS))
def test_scoped_experiment_filter_means_the_prefixed_comparisons_plus_the_tenant_clause(generated: Piece) -> None:
    ours = gateway_parse(generated.text, EXPERIMENTS)
    if ours is None:
        return
    try:
        scoped = filters.scope_experiment_filter(generated.text, "acme")
    except FilterError:
        # Only a literal with no safe spelling may be refused (a 400, never a silent change).
        assert any(unquotable(c["value"]) or unquotable(c["key"]) for c in ours), generated.text
        return
    expected = [
        {**c, "value": "acme/" + c["value"]} if c["type"] == "attribute" and c["key"] == "name" else c for c in ours
    ]
    expected.append({"type": "attribute", "key": "name", "comparator": "LIKE", "value": "acme/%"})
    assert mlflow_parse(scoped, EXPERIMENTS) == expected, scoped


# -- order_by --------------------------------------------------------------------------------------


def mlflow_order_by(entries: list[str], grammar: Grammar) -> list[tuple[str, str, bool]] | None:
    from mlflow.store.tracking.sqlalchemy_store import _get_orderby_clauses, _get_search_experiments_order_by_clauses

    try:
        if grammar is EXPERIMENTS:
            _get_search_experiments_order_by_clauses(entries)
            return [SearchExperimentsUtils.parse_order_by_for_search_experiments(e) for e in entries]
        _get_orderby_clauses(entries, _SESSION)
        return [SearchUtils.parse_order_by_for_search_runs(e) for e in entries]
    except Exception:
        return None


def gateway_order_by(entries: list[str], grammar: Grammar) -> list[tuple[str, str, bool]] | None:
    try:
        parsed = [filters.parse_order_by(e, grammar) for e in entries]
        filters.canonical_order_by(entries, grammar)
    except FilterError:
        return None
    return [(order.entity, order.key, order.ascending is not False) for order in parsed]


@st.composite
def order_by_entries(draw: st.DrawFn, grammar: Grammar) -> Piece:
    identifier = draw(identifiers(grammar))
    direction = draw(st.sampled_from(["", "", " ASC", " desc", " DESC", "  DESC", " DESC NULLS FIRST", " up"]))
    around = draw(st.sampled_from([("", ""), ("", ""), (" ", ""), ("", " ")]))
    # MLflow reads an order_by entry with shlex (backticks turned into double quotes) and then unquotes
    # the key again: keys holding quotes or backslashes, and backticked entities, are outside the
    # gateway's grammar.
    text = identifier.text
    key = text.partition(".")[2].strip("`")
    quoted = (
        any(q in text for q in ("'", '"', "\\"))
        or text.count("`") > 2
        or (text.startswith("`") and "." in text)
        or key != key.strip()
        # sqlparse keywords inside a dotted key: MLflow accepts a few positions, the gateway none.
        or any(part.upper() in filters._UNQUOTABLE_KEY_WORDS for part in text.split("."))
    )
    return Piece(around[0] + identifier.text + direction + around[1], identifier.outside or quoted)


@settings(max_examples=800, deadline=None)
@given(st.lists(order_by_entries(EXPERIMENTS), min_size=1, max_size=2))
def test_experiment_order_by_agrees_with_mlflow(entries: list[Piece]) -> None:
    check_order_by(entries, EXPERIMENTS)


@settings(max_examples=800, deadline=None)
@given(st.lists(order_by_entries(RUNS), min_size=1, max_size=2))
def test_run_order_by_agrees_with_mlflow(entries: list[Piece]) -> None:
    check_order_by(entries, RUNS)


def check_order_by(entries: list[Piece], grammar: Grammar) -> None:
    texts = [entry.text for entry in entries]
    ours = gateway_order_by(texts, grammar)
    if any(entry.outside for entry in entries):
        if ours is not None:  # the gateway may accept what it can re-quote safely
            assert mlflow_order_by(texts, grammar) == ours
        return
    theirs = mlflow_order_by(texts, grammar)
    assert ours == theirs, f"{texts!r}: gateway {ours} != mlflow {theirs}"
    if ours is not None:
        canonical = filters.canonical_order_by(texts, grammar)
        assert mlflow_order_by(canonical, grammar) == theirs, canonical


@pytest.mark.parametrize("word", ["AS", "CASE", "FROM", "IN", "USING", "VALUES"])
def test_unquotable_key_words_are_exactly_the_ones_sqlparse_breaks(word: str) -> None:
    for grammar, text in ((RUNS, f"tags.{word.lower()} = 'x'"), (EXPERIMENTS, f"tags.{word} = 'x'")):
        assert mlflow_parse(text, grammar) is None
        assert gateway_parse(text, grammar) is None
        quoted = f"tags.`{word}` = 'x'"
        assert mlflow_parse(quoted, grammar) == gateway_parse(quoted, grammar) is not None


# -- the hand-written tables, against MLflow -----------------------------------------------------------

# Filters the gateway refuses although MLflow's sqlparse-based parser tolerates them: stray or
# missing AND, Python literal semantics inside IN lists (implicit concatenation, escapes), a space
# after the dot of an identifier (the key then starts with a space), non-ASCII whitespace, a list
# compared with a scalar operator, an aliased identifier before IS NULL.
MLFLOW_LOOSER = {
    "name = 'x' AND",
    "AND name = 'x'",
    "name = 'x' AND AND name = 'y'",
    "name = 'x' name = 'y'",
    "experiment_id IN ('1' '2')",
    "experiment_id IN ('1\\x32')",
    "tags. x = 'y'",
    "name = 'x'\u00a0AND name = 'y'",
    "metrics.x > 1 AND",
    "experiment_id = ('1')",
    "run_id != ('a', 'b')",
    "tags.x y IS NULL",
}


def test_tables_agree_with_mlflow() -> None:
    from tests.unit import test_searches_filters as tables

    for grammar, accepted, refused in (
        (EXPERIMENTS, tables.ACCEPTED_EXPERIMENTS, tables.REFUSED_EXPERIMENTS),
        (RUNS, tables.ACCEPTED_RUNS, tables.REFUSED_RUNS),
    ):
        for text, canonical in accepted:
            if text:
                assert mlflow_parse(text, grammar) == gateway_parse(text, grammar), text
                assert mlflow_parse(canonical, grammar) == gateway_parse(text, grammar), canonical
        for text in refused:
            if text not in MLFLOW_LOOSER:
                assert mlflow_parse(text, grammar) is None, f"MLflow accepts {text!r}"
    for text in MLFLOW_LOOSER:
        grammar = RUNS if text.startswith(("metrics", "run_id", "tags.x y")) else EXPERIMENTS
        assert mlflow_parse(text, grammar) is not None, f"{text!r} is no longer accepted by MLflow: remove it"
        assert gateway_parse(text, grammar) is None
