"""MLflow's search-filter grammar: a strict tokenizer and parser, and a canonical serialiser.

MLflow parses ``filter`` strings with ``sqlparse`` (``mlflow/utils/search_utils.py``), which accepts
far more than the documented grammar: adjacent comparisons without ``AND``, stray ``AND`` tokens,
aliased identifiers, Python escapes inside ``IN (...)`` lists. The gateway parses a filter with the
small grammar below, refuses everything else with 400 ``INVALID_PARAMETER_VALUE``, rewrites the
parsed comparisons, and forwards a filter it *serialised itself* from them. No text the client wrote
is ever spliced into the forwarded filter, so quote-swallowing tricks (an unterminated ``'``, a
trailing ``\\`` before the closing quote, comments, ``OR``) cannot absorb an appended clause.

Grammar (keywords are case-insensitive, whitespace is ``[ \\t\\r\\n]``)::

    filter      := comparison ( AND comparison )*
    comparison  := identifier ( op value | IN list | NOT IN list | IS NULL | IS NOT NULL )
    op          := = | != | < | <= | > | >= | LIKE | ILIKE
    identifier  := attribute | entity "." key
    key         := word ( "." word )* | `backticked` | "double-quoted" | 'single-quoted'
    value       := 'string' | "string" | number
    list        := "(" string ( "," string )* [","] ")"

Each token is matched with the very regular expression ``sqlparse`` uses at that position, so a
filter this module accepts is tokenised identically by MLflow. Strings have no escape processing
(MLflow only trims the quotes), exactly as upstream. Which keys, comparators and value types are
valid is MLflow's own rule set for each search (``SearchExperimentsUtils`` and
``_get_search_experiments_filter_clauses``; ``SearchUtils`` and ``_get_sqlalchemy_filter_clauses``),
so an accepted filter is one MLflow accepts too (tests/unit/test_searches_filters_differential.py
checks both directions against MLflow's own parser).

Order-by entries (``[entity.]key [ASC|DESC]``) are validated the same way and re-serialised.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from gateway.errors import BadRequest, PermissionDenied

# sqlparse refuses to group a statement of more than 10000 tokens (every whitespace character is
# one token there), and MLflow then refuses the filter; the gateway refuses earlier and cheaper.
MAX_FILTER_LENGTH = 65_536
MAX_FILTER_TOKENS = 10_000
MAX_ORDER_BY_LENGTH = 1_000

Value = str | int | float | tuple[str, ...] | None


class FilterError(BadRequest):
    """A filter or order-by entry the gateway does not understand (400 INVALID_PARAMETER_VALUE)."""


# -- tokens -----------------------------------------------------------------------------------------

WS, WORD, BACKTICK, SQUOTE, DQUOTE, INT, FLOAT, OP, LPAREN, RPAREN, COMMA, DOT = (
    "whitespace",
    "word",
    "backticked name",
    "single-quoted string",
    "double-quoted string",
    "integer",
    "number",
    "operator",
    "(",
    ")",
    ",",
    ".",
)

# In the order sqlparse tries them (sqlparse/keywords.py:SQL_REGEX, IGNORECASE); everything that
# sqlparse would read as anything else (comments, placeholders, JSON operators, `;`, `$`, `#`, `%`,
# `*`, non-ASCII outside quotes...) matches none of these and is refused.
_HEX = re.compile(r"-?0x[0-9A-F]+", re.IGNORECASE)
_TOKEN_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (WS, re.compile(r"[ \t\r\n]+")),
    (BACKTICK, re.compile(r"`(?:``|[^`])*`")),
    (FLOAT, re.compile(r"-?[0-9]+(?:\.[0-9]+)?E-?[0-9]+", re.IGNORECASE)),
    (FLOAT, re.compile(r"(?![_A-ZÀ-Ü])-?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?![_A-ZÀ-Ü])", re.IGNORECASE)),
    (INT, re.compile(r"(?![_A-ZÀ-Ü])-?[0-9]+(?![_A-ZÀ-Ü])", re.IGNORECASE)),
    (SQUOTE, re.compile(r"'(?:''|\\'|[^'])*'")),
    (DQUOTE, re.compile(r'"(?:""|\\"|[^"])*"')),
    (WORD, re.compile(r"[A-Za-z_][A-Za-z0-9_]*")),
    (LPAREN, re.compile(r"\(")),
    (RPAREN, re.compile(r"\)")),
    (COMMA, re.compile(r",")),
    (DOT, re.compile(r"\.")),
    (OP, re.compile(r"[<>=~!]+")),
)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# The same, as one pattern tried once per token (~3x faster than trying each): the alternatives in
# the same order, since an alternation takes the first that matches; _HEX first, as it is checked
# first. Group i is the i-th alternative: group 1 is _HEX, group i + 2 is _TOKEN_PATTERNS[i].
_TOKEN_KINDS: tuple[str, ...] = ("", "", *(kind for kind, _ in _TOKEN_PATTERNS))
_TOKEN = re.compile(
    "|".join(
        f"({'(?i:' + pattern.pattern + ')' if pattern.flags & re.IGNORECASE else pattern.pattern})"
        for pattern in (_HEX, *(pattern for _, pattern in _TOKEN_PATTERNS))
    )
)


class Token(NamedTuple):
    """One lexical token and where it starts in the filter (a named tuple: made ~4x faster than a frozen dataclass)."""

    kind: str
    text: str
    position: int

    def is_word(self, *words: str) -> bool:
        """True for a bare word equal (case-insensitively) to one of ``words``."""
        return self.kind == WORD and self.text.upper() in words


def tokenize(text: str) -> list[Token]:
    """Split a filter into tokens exactly as sqlparse's lexer would; anything else is a 400."""
    if _CONTROL.search(text):
        raise FilterError("Filter contains a control character")
    tokens: list[Token] = []
    position = 0
    weight = 0
    end = len(text)
    while position < end:
        match = _TOKEN.match(text, position)
        if match is None:
            raise FilterError(f"Unexpected character {text[position]!r} at position {position} in filter")
        if match.lastindex == 1:
            raise FilterError(f"Hexadecimal numbers are not supported in filters (at position {position})")
        kind = _TOKEN_KINDS[match.lastindex]  # type: ignore[index]  # one group per alternative
        token_text = match.group()
        tokens.append(Token(kind, token_text, position))
        weight += len(token_text) if kind == WS else 1
        position = match.end()
    if weight > MAX_FILTER_TOKENS:
        raise FilterError(f"Filter has more than {MAX_FILTER_TOKENS} tokens")
    return tokens


def _inner(token: Token) -> str:
    """The text between the quotes of a quoted token (no escape processing, like MLflow)."""
    return token.text[1:-1]


def _trim_backticks(text: str) -> str:
    """MLflow's ``_trim_backticks``: one layer of surrounding backticks is removed."""
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] == "`" else text


def _strip_quotes(text: str) -> str:
    """MLflow's ``_strip_quotes`` for keys: one layer of surrounding ' or " is removed."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


# -- parsed form ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """One parsed comparison, in MLflow's own representation (``parse_search_filter`` output).

    ``entity`` is MLflow's canonical type (``attribute``, ``tag``, ``metric``, ``parameter``,
    ``dataset``); ``value`` is a string, a number (experiments' numeric attributes, run numeric
    attributes), the raw numeric text (run metrics), a tuple of strings (``IN`` lists) or ``None``
    (``IS [NOT] NULL``). ``comparator`` is canonical upper case.
    """

    entity: str
    key: str
    comparator: str
    value: Value
    # The number as the client wrote it (numeric attributes): it is what gets re-serialised.
    number_text: str | None = field(default=None, compare=False)

    def as_mlflow(self) -> dict[str, object]:
        """The dict MLflow's ``parse_search_filter`` returns for this comparison."""
        return {"type": self.entity, "key": self.key, "comparator": self.comparator, "value": self.value}


@dataclass(frozen=True)
class _Operand:
    kind: str  # SQUOTE, DQUOTE, INT, FLOAT, "list", or "" for IS [NOT] NULL
    text: str = ""
    items: tuple[str, ...] = ()


@dataclass(frozen=True)
class _RawComparison:
    entity: str | None  # None: a bare attribute
    key: str
    comparator: str  # as MLflow records it (raw operator text, "IN" as written, "NOT IN", "IS NULL"...)
    operand: _Operand
    position: int


# -- grammars ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grammar:
    """One MLflow search's filter rules (which entities, keys, comparators and values are valid)."""

    name: str
    entities: Mapping[str, str]  # entity word as written -> MLflow's canonical type
    backticked_entity: bool  # SearchUtils trims backticks from the entity, SearchExperimentsUtils does not
    attributes: frozenset[str]
    order_by_attributes: frozenset[str]
    numeric_attributes: frozenset[str]
    list_attributes: frozenset[str]
    comparators: Callable[[str, str], frozenset[str]]  # (type, key) -> valid comparators
    upper_case_comparators: bool  # the store upper-cases comparators before checking them (runs)
    check_value: Callable[[Comparison], Comparison]
    canonical_entity: Mapping[str, str]  # type -> entity word written in the canonical filter
    order_by_types: frozenset[str]


_MAX_INT64 = 2**63  # larger integers overflow the database column (an upstream 500)
_STRING_OPS = frozenset({"=", "!=", "LIKE", "ILIKE"})
_NUMERIC_OPS = frozenset({"=", "!=", "<", "<=", ">", ">="})
_NULL_OPS = frozenset({"IS NULL", "IS NOT NULL"})
_LIST_OPS = frozenset({"IN", "NOT IN"})


def _experiment_comparators(entity: str, key: str) -> frozenset[str]:
    if entity == "tag":
        return _STRING_OPS | _NULL_OPS
    if key == "experiment_id":
        return frozenset({"=", "!="}) | _LIST_OPS
    if key in EXPERIMENTS_NUMERIC:
        return _NUMERIC_OPS
    return _STRING_OPS


def _check_experiment_value(comparison: Comparison) -> Comparison:
    """The store's value checks (``_get_search_experiments_filter_clauses``)."""
    value = comparison.value
    if comparison.key == "experiment_id" and comparison.entity == "attribute":
        for item in value if isinstance(value, tuple) else (value,):
            try:
                number = int(str(item))  # exactly MLflow's _parse_experiment_id
            except ValueError:
                raise FilterError(f"Invalid experiment ID '{item}'. Experiment ID must be a valid integer.") from None
            if not -_MAX_INT64 <= number < _MAX_INT64:
                raise FilterError(f"Invalid experiment ID '{item}': out of range")
    if comparison.key in EXPERIMENTS_NUMERIC and isinstance(value, float):
        raise FilterError(f"Invalid value for numeric attribute '{comparison.key}': {str(value)!r}")
    return comparison


def _run_comparators(entity: str, key: str) -> frozenset[str]:
    if entity == "metric":
        return _NUMERIC_OPS
    if entity in ("parameter", "tag"):
        return _STRING_OPS | _NULL_OPS
    if entity == "dataset":
        return _STRING_OPS | _LIST_OPS
    if key in RUNS_NUMERIC:
        return _NUMERIC_OPS
    return _STRING_OPS | _LIST_OPS


def _check_run_value(comparison: Comparison) -> Comparison:
    return comparison


EXPERIMENTS_NUMERIC = frozenset({"creation_time", "last_update_time"})
RUNS_NUMERIC = frozenset({"start_time", "end_time", "created", "Created"})
_RUN_ATTRIBUTES = frozenset({"artifact_uri", "end_time", "run_id", "run_name", "start_time", "status", "user_id"})

EXPERIMENTS = Grammar(
    name="experiments",
    entities={"attribute": "attribute", "tag": "tag", "tags": "tag"},
    backticked_entity=False,
    attributes=frozenset({"name", "experiment_id", "creation_time", "last_update_time"}),
    order_by_attributes=frozenset({"name", "experiment_id", "creation_time", "last_update_time"}),
    numeric_attributes=EXPERIMENTS_NUMERIC,
    list_attributes=frozenset({"experiment_id"}),
    comparators=_experiment_comparators,
    upper_case_comparators=False,
    check_value=_check_experiment_value,
    canonical_entity={"attribute": "attribute", "tag": "tags"},
    order_by_types=frozenset({"attribute"}),
)

RUNS = Grammar(
    name="runs",
    entities={
        "metric": "metric",
        "metrics": "metric",
        "parameter": "parameter",
        "parameters": "parameter",
        "param": "parameter",
        "params": "parameter",
        "tag": "tag",
        "tags": "tag",
        "attribute": "attribute",
        "attributes": "attribute",
        "attr": "attribute",
        "run": "attribute",
        "dataset": "dataset",
        "datasets": "dataset",
    },
    backticked_entity=True,
    attributes=_RUN_ATTRIBUTES | {"created", "Created", "run name", "Run name", "Run Name"},
    order_by_attributes=_RUN_ATTRIBUTES | {"created", "Created"},
    numeric_attributes=RUNS_NUMERIC,
    list_attributes=frozenset({"run_id"}),
    comparators=_run_comparators,
    upper_case_comparators=True,
    check_value=_check_run_value,
    canonical_entity={
        "metric": "metrics",
        "parameter": "params",
        "tag": "tags",
        "attribute": "attributes",
        "dataset": "dataset",
    },
    order_by_types=frozenset({"attribute", "metric", "parameter", "tag"}),
)
_DATASET_KEYS = frozenset({"name", "digest", "context"})
_RUN_KEY_ALIASES = {"created": "start_time", "Created": "start_time"}
_RUN_FILTER_KEY_ALIASES = {**_RUN_KEY_ALIASES, "run name": "run_name", "Run name": "run_name", "Run Name": "run_name"}

# Words sqlparse lexes as keywords even right after a "." (its keyword regex runs before its name
# regexes), which breaks the identifier: `tags.from = 'x'` is refused by MLflow. They must be quoted.
_UNQUOTABLE_KEY_WORDS = frozenset({"AS", "CASE", "FROM", "IN", "USING", "VALUES"})
_SIMPLE_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# -- parser -----------------------------------------------------------------------------------------


class _Cursor:
    """Walks the token list; whitespace is skipped except where the grammar forbids it."""

    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens
        self.index = 0

    def peek(self, *, skip_ws: bool = True) -> Token | None:
        index = self.index
        while skip_ws and index < len(self.tokens) and self.tokens[index].kind == WS:
            index += 1
        return self.tokens[index] if index < len(self.tokens) else None

    def take(self, *, skip_ws: bool = True) -> Token:
        while skip_ws and self.index < len(self.tokens) and self.tokens[self.index].kind == WS:
            self.index += 1
        if self.index >= len(self.tokens):
            raise FilterError("Filter ends unexpectedly")
        token = self.tokens[self.index]
        self.index += 1
        return token

    def expect(self, description: str, *kinds: str, skip_ws: bool = True) -> Token:
        token = self.take(skip_ws=skip_ws)
        if token.kind not in kinds:
            raise FilterError(f"Expected {description} at position {token.position}, found {token.text!r}")
        return token

    def at_end(self) -> bool:
        return self.peek() is None


def _parse_identifier(cursor: _Cursor, grammar: Grammar) -> tuple[str | None, str, int]:
    """``(entity as written or None, key as MLflow reads it, position)``."""
    first = cursor.take()
    following = cursor.peek(skip_ws=False)
    if following is not None and following.kind == DOT:
        if first.kind == WORD:
            entity = first.text
        elif first.kind == BACKTICK and grammar.backticked_entity:
            entity = _trim_backticks(first.text)
        else:
            raise FilterError(f"Invalid identifier at position {first.position}")
        cursor.take(skip_ws=False)
        return entity, _parse_key(cursor), first.position
    if first.kind == WORD:
        return None, first.text, first.position
    if first.kind in (BACKTICK, DQUOTE) and "." not in first.text:
        # MLflow splits the identifier text on "." before unquoting: a quoted "a.b" is not a key.
        return None, _trim_backticks(_strip_quotes(first.text)), first.position
    raise FilterError(f"Expected an identifier at position {first.position}, found {first.text!r}")


def _parse_key(cursor: _Cursor) -> str:
    token = cursor.take(skip_ws=False)
    if token.kind in (BACKTICK, DQUOTE, SQUOTE):
        return _trim_backticks(_strip_quotes(token.text))
    if token.kind != WORD:
        raise FilterError(f"Expected a key at position {token.position}, found {token.text!r}")
    parts = [token]
    while True:
        following = cursor.peek(skip_ws=False)
        if following is None or following.kind != DOT:
            break
        cursor.take(skip_ws=False)
        parts.append(cursor.expect("a key", WORD, skip_ws=False))
    for part in parts:
        if part.text.upper() in _UNQUOTABLE_KEY_WORDS:
            raise FilterError(f"The key word {part.text!r} must be quoted with backticks (position {part.position})")
    return ".".join(part.text for part in parts)


def _parse_list(cursor: _Cursor) -> tuple[str, ...]:
    """``("a", "b")``; items are plain quoted strings (MLflow reads the list with ``ast.literal_eval``)."""
    cursor.expect("'('", LPAREN)
    items: list[str] = []
    while True:
        token = cursor.take()
        if token.kind not in (SQUOTE, DQUOTE):
            raise FilterError(f"Expected a quoted string in the list at position {token.position}")
        item = _inner(token)
        # Python string-literal rules: no escapes, no line breaks, no quote of the delimiter kind.
        if "\\" in item or "\n" in item or "\r" in item or token.text[0] in item:
            raise FilterError(f"List value at position {token.position} cannot contain quotes, backslashes or newlines")
        items.append(item)
        separator = cursor.take()
        if separator.kind == RPAREN:
            break
        if separator.kind != COMMA:
            raise FilterError(f"Expected ',' or ')' at position {separator.position}")
        closing = cursor.peek()
        if closing is not None and closing.kind == RPAREN:
            cursor.take()
            break
    return tuple(items)


def _parse_comparison(cursor: _Cursor, grammar: Grammar) -> _RawComparison:
    entity, key, position = _parse_identifier(cursor, grammar)
    token = cursor.take()
    if token.kind == OP or token.is_word("LIKE", "ILIKE"):
        operand = cursor.take()
        if operand.kind not in (SQUOTE, DQUOTE, INT, FLOAT):
            raise FilterError(f"Expected a quoted string or a number at position {operand.position}")
        return _RawComparison(entity, key, token.text, _Operand(operand.kind, operand.text), position)
    if token.is_word("IN"):
        return _RawComparison(entity, key, token.text, _Operand("list", items=_parse_list(cursor)), position)
    if token.is_word("NOT"):
        following = cursor.take()
        if not following.is_word("IN"):
            raise FilterError(f"Expected IN after NOT at position {following.position}")
        return _RawComparison(entity, key, "NOT IN", _Operand("list", items=_parse_list(cursor)), position)
    if token.is_word("IS"):
        following = cursor.take()
        if following.is_word("NULL"):
            return _RawComparison(entity, key, "IS NULL", _Operand(""), position)
        if following.is_word("NOT"):
            # sqlparse lexes "NOT NULL" as one keyword and MLflow compares it with "NOT NULL"
            # literally: exactly one space between the two words.
            space = cursor.take(skip_ws=False)
            null = cursor.take(skip_ws=False)
            if space.text == " " and null.is_word("NULL"):
                return _RawComparison(entity, key, "IS NOT NULL", _Operand(""), position)
        raise FilterError(f"Expected NULL or NOT NULL after IS at position {following.position}")
    raise FilterError(f"Expected a comparison operator at position {token.position}, found {token.text!r}")


def _resolve(raw: _RawComparison, grammar: Grammar) -> Comparison:
    """MLflow's ``_get_identifier``, ``_get_value`` and the store's comparator checks, in that order."""
    if raw.entity is None:
        entity = "attribute"
    elif raw.entity in grammar.entities:
        entity = grammar.entities[raw.entity]
    else:
        raise FilterError(f"Invalid entity type '{raw.entity}' at position {raw.position}")
    key = raw.key
    if entity == "attribute" and key not in grammar.attributes:
        raise FilterError(f"Invalid attribute key '{key}' specified. Valid keys are {sorted(grammar.attributes)}")
    if entity == "dataset" and key not in _DATASET_KEYS:
        raise FilterError(f"Invalid dataset key '{key}' specified. Valid keys are {sorted(_DATASET_KEYS)}")
    operand = raw.operand
    value: Value
    if operand.kind == "":
        if entity not in ("tag", "parameter"):
            raise FilterError(f"IS NULL / IS NOT NULL is not supported for {entity} '{key}'")
        value = None
    elif entity == "metric" or (entity == "attribute" and key in grammar.numeric_attributes):
        if operand.kind not in (INT, FLOAT):
            raise FilterError(f"Expected a numeric value for {entity} '{key}'")
        if entity == "metric":
            value = operand.text
        else:
            value = int(operand.text) if operand.kind == INT else float(operand.text)
            if isinstance(value, int) and not -_MAX_INT64 <= value < _MAX_INT64:
                raise FilterError(f"Value of numeric attribute '{key}' is out of range")
    elif operand.kind == "list":
        if entity == "attribute" and key not in grammar.list_attributes:
            raise FilterError(f"Only {sorted(grammar.list_attributes)} attributes support comparison with a list")
        if entity not in ("attribute", "dataset"):
            raise FilterError(f"Expected a quoted string value for {entity} '{key}'")
        value = operand.items
    elif operand.kind in (SQUOTE, DQUOTE):
        value = _inner(Token(operand.kind, operand.text, 0))
    else:
        raise FilterError(f"Expected a quoted string value for {entity} '{key}'")
    comparator = raw.comparator.upper() if grammar.upper_case_comparators else raw.comparator
    lookup_key = _RUN_FILTER_KEY_ALIASES.get(key, key) if grammar is RUNS else key
    if comparator not in grammar.comparators(entity, lookup_key):
        raise FilterError(f"Invalid comparator '{raw.comparator}' for {entity} '{key}'")
    number_text = operand.text if operand.kind in (INT, FLOAT) else None
    return grammar.check_value(Comparison(entity, key, comparator.upper(), value, number_text))


def parse_filter(text: str, grammar: Grammar) -> list[Comparison]:
    """Parse a filter strictly; an empty filter is no comparison (whitespace alone is refused, as upstream)."""
    if not isinstance(text, str):
        raise FilterError("Field 'filter' must be a string")
    if text == "":
        return []
    if len(text) > MAX_FILTER_LENGTH:
        raise FilterError(f"Filter exceeds {MAX_FILTER_LENGTH} characters")
    cursor = _Cursor(tokenize(text))
    if cursor.at_end():
        raise FilterError(f"Invalid filter '{text}'. Could not be parsed.")
    comparisons = [_resolve(_parse_comparison(cursor, grammar), grammar)]
    while not cursor.at_end():
        token = cursor.take()
        if not token.is_word("AND"):
            raise FilterError(
                f"Invalid clause in filter at position {token.position}: {token.text!r} (only AND is supported)"
            )
        comparisons.append(_resolve(_parse_comparison(cursor, grammar), grammar))
    return comparisons


# -- serialiser -------------------------------------------------------------------------------------


def quote_string(value: str) -> str:
    """``'value'`` (or ``"value"`` when it holds a ``'``), such that sqlparse reads back exactly ``value``.

    MLflow does no unescaping, so a value holding both quote characters, or ending in a backslash
    (``\\'`` would swallow the closing quote), has no safe spelling: 400.
    """
    for quote in ("'", '"'):
        if quote not in value and not value.endswith("\\"):
            return quote + value + quote
    raise FilterError("A filter value containing both ' and \" (or ending with a backslash) cannot be quoted safely")


def _quote_list_item(value: str) -> str:
    if "\\" in value or "\n" in value or "\r" in value:
        raise FilterError("A list value cannot contain backslashes or newlines")
    return quote_string(value)


def _key_text(key: str) -> str:
    """A key after ``entity.``: bare when it is plain dotted words, otherwise quoted."""
    parts = key.split(".")
    if all(_SIMPLE_WORD.fullmatch(part) and part.upper() not in _UNQUOTABLE_KEY_WORDS for part in parts):
        return key
    if "`" not in key:
        return f"`{key}`"
    if '"' not in key and not key.endswith("\\") and not (key.startswith("`") and key.endswith("`")):
        return f'"{key}"'
    raise FilterError('A key containing both ` and " cannot be quoted safely')


def _identifier_text(comparison: Comparison, grammar: Grammar) -> str:
    if comparison.entity == "attribute" and _SIMPLE_WORD.fullmatch(comparison.key):
        return comparison.key
    return f"{grammar.canonical_entity[comparison.entity]}.{_key_text(comparison.key)}"


def _value_text(value: Value) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(_quote_list_item(item) for item in value) + ")"
    if isinstance(value, bool) or value is None:
        raise FilterError("Invalid filter value")
    if isinstance(value, int | float):
        return repr(value)
    return quote_string(value)


def _comparison_text(comparison: Comparison, grammar: Grammar) -> str:
    identifier = _identifier_text(comparison, grammar)
    value = comparison.value
    if value is None:
        return f"{identifier} {comparison.comparator}"
    if comparison.entity == "metric" and isinstance(value, str):
        text = value  # a run metric: MLflow keeps the numeric token's text
    elif comparison.number_text is not None:
        text = comparison.number_text  # the client's numeric token (checked to parse back below)
    else:
        text = _value_text(value)
    return f"{identifier} {comparison.comparator} {text}"


def serialise_filter(comparisons: list[Comparison], grammar: Grammar) -> str:
    """The canonical filter for ``comparisons``, checked to parse back to exactly them."""
    parts = [_comparison_text(comparison, grammar) for comparison in comparisons]
    text = " AND ".join(parts)
    if parse_filter(text, grammar) != comparisons:
        raise FilterError("The filter cannot be re-serialised safely")
    return text


# Canonical forms of recent filters, by grammar and text: the same few filters come again and again
# (the UI's run table, a script's polling loop), and parsing one twice (serialise_filter) costs ~100 us.
_CANONICAL_FILTERS: dict[tuple[str, str], str] = {}
CANONICAL_FILTER_CACHE_SIZE = 1024
CACHED_FILTER_MAX_LENGTH = 1024  # characters; longer filters are parsed every time (a few MiB at worst)


def canonical_filter(text: str, grammar: Grammar) -> str:
    """Parse ``text`` and return its canonical form ("" for an empty filter)."""
    key = (grammar.name, text) if type(text) is str and len(text) <= CACHED_FILTER_MAX_LENGTH else None
    canonical = _CANONICAL_FILTERS.get(key) if key is not None else None
    if canonical is None:
        canonical = serialise_filter(parse_filter(text, grammar), grammar) if text else ""
        if key is not None:
            if len(_CANONICAL_FILTERS) >= CANONICAL_FILTER_CACHE_SIZE:
                del _CANONICAL_FILTERS[next(iter(_CANONICAL_FILTERS))]  # the oldest entry
            _CANONICAL_FILTERS[key] = canonical
    return canonical


# -- experiment-name scoping ------------------------------------------------------------------------

_TENANT_ID = re.compile(r"[a-z0-9-]{1,63}")


def _prefixed(value: Value, prefix: str) -> Value:
    if isinstance(value, tuple):
        return tuple(prefix + item for item in value)
    if isinstance(value, str):
        return prefix + value
    raise FilterError("Experiment names are compared with strings")


def scope_experiment_filter(text: str, tenant: str, separator: str = "/") -> str:
    """Rewrite a ``search_experiments`` filter so it can only match ``tenant``'s experiments.

    Every ``name`` literal gets the ``<tenant>/`` prefix (``=``/``!=`` values and ``LIKE``/``ILIKE``
    patterns alike, so a pattern is anchored inside the tenant's namespace: ``'%x'`` becomes
    ``'acme/%x'``), and ``name LIKE '<tenant>/%'`` is appended. The tenant id is ``[a-z0-9-]``: no
    LIKE wildcard, and the prefix ends with the separator, so ``acme`` never matches
    ``acmeco/...``. LIKE is case-sensitive on every MLflow backend, so ``ACME/...`` never matches.
    """
    if not _TENANT_ID.fullmatch(tenant):
        raise PermissionDenied("This tenant id cannot be used to scope a search")
    prefix = tenant + separator
    comparisons = [
        replace(comparison, value=_prefixed(comparison.value, prefix))
        if comparison.entity == "attribute" and comparison.key == "name"
        else comparison
        for comparison in parse_filter(text, EXPERIMENTS)
    ]
    comparisons.append(Comparison("attribute", "name", "LIKE", prefix + "%"))
    return serialise_filter(comparisons, EXPERIMENTS)


# -- order_by ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OrderBy:
    """One parsed ``order_by`` entry: MLflow's type, key, and direction (``None``: unspecified)."""

    entity: str
    key: str
    ascending: bool | None

    def text(self, grammar: Grammar) -> str:
        """The canonical entry (``name DESC``, ``metrics.`my loss` ASC``)."""
        if self.entity == "attribute" and _SIMPLE_WORD.fullmatch(self.key):
            identifier = self.key
        else:
            identifier = f"{grammar.canonical_entity[self.entity]}.{_order_key_text(self.key)}"
        if self.ascending is None:
            return identifier
        return f"{identifier} {'ASC' if self.ascending else 'DESC'}"


# MLflow reads an order_by entry with shlex after turning backticks into double quotes, then unquotes
# the key once more: a quoted key must not hold quotes of any kind or a backslash.
_ORDER_KEY_FORBIDDEN = re.compile(r"[`\"'\\]")


def _order_key_text(key: str) -> str:
    parts = key.split(".")
    if all(_SIMPLE_WORD.fullmatch(part) and part.upper() not in _UNQUOTABLE_KEY_WORDS for part in parts):
        return key
    if _ORDER_KEY_FORBIDDEN.search(key) or key != key.strip():
        raise FilterError("This order_by key cannot be quoted safely")
    return f"`{key}`"


def parse_order_by(entry: object, grammar: Grammar) -> OrderBy:
    """Parse one ``order_by`` entry: ``[entity.]key [ASC|DESC]`` (no leading or trailing space)."""
    if not isinstance(entry, str):
        raise FilterError("Field 'order_by' must be a list of strings")
    if not entry or len(entry) > MAX_ORDER_BY_LENGTH:
        raise FilterError(f"Invalid order_by clause '{entry[:100]}'.")
    tokens = tokenize(entry)
    if tokens[0].kind == WS or tokens[-1].kind == WS:
        raise FilterError(f"Invalid order_by clause '{entry}'. Could not be parsed.")
    cursor = _Cursor(tokens)
    entity_text, key, _ = _parse_identifier(cursor, grammar)
    if any(token.kind in (DQUOTE, SQUOTE) for token in tokens) or (
        entity_text is not None and tokens[0].kind == BACKTICK
    ):
        raise FilterError(f"Invalid order_by clause '{entry}': quote keys with backticks")
    if _ORDER_KEY_FORBIDDEN.search(key) or key != key.strip():
        raise FilterError(f"Invalid order_by clause '{entry}': the key cannot be quoted safely")
    ascending: bool | None = None
    if not cursor.at_end():
        space = cursor.take(skip_ws=False)
        direction = cursor.take(skip_ws=False)
        if space.kind != WS or space.text.strip(" ") or not direction.is_word("ASC", "DESC"):
            raise FilterError(f"Invalid ordering key in order_by clause '{entry}'.")
        ascending = direction.text.upper() == "ASC"
    if not cursor.at_end():
        raise FilterError(f"Invalid order_by clause '{entry}'. Could not be parsed.")
    if entity_text is None:
        entity = "attribute"
    elif entity_text in grammar.entities:
        entity = grammar.entities[entity_text]
    else:
        raise FilterError(f"Invalid entity type '{entity_text}' in order_by clause '{entry}'")
    if entity not in grammar.order_by_types:
        raise FilterError(f"Invalid order_by entity '{entity}' in clause '{entry}'")
    if entity == "attribute" and key not in grammar.order_by_attributes:
        valid = sorted(grammar.order_by_attributes)
        raise FilterError(f"Invalid attribute key '{key}' specified. Valid keys are {valid}")
    return OrderBy(entity, key, ascending)


def canonical_order_by(entries: object, grammar: Grammar) -> list[str]:
    """Validate a list of ``order_by`` entries and return their canonical spelling.

    For runs, two entries naming the same column are refused (MLflow would fail with a 500).
    """
    if not isinstance(entries, list):
        raise FilterError("Field 'order_by' must be a list of strings")
    parsed = [parse_order_by(entry, grammar) for entry in entries]
    if grammar is RUNS:
        seen: set[tuple[str, str]] = set()
        for order in parsed:
            column = (order.entity, _RUN_KEY_ALIASES.get(order.key, order.key))
            if column in seen:
                raise FilterError(f"`order_by` contains duplicate fields: {entries}")
            seen.add(column)
    return [order.text(grammar) for order in parsed]
