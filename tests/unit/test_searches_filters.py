"""The search-filter parser and serialiser (gateway/policy/filters.py): accepted and refused tables."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import BadRequest, PermissionDenied
from gateway.policy import filters
from gateway.policy.filters import EXPERIMENTS, RUNS, FilterError

# (client filter, canonical form forwarded upstream)
ACCEPTED_EXPERIMENTS = [
    ("", ""),
    ("name = 'x'", "name = 'x'"),
    ('name = "x"', "name = 'x'"),
    ("name != 'x'", "name != 'x'"),
    ("name LIKE '%x_'", "name LIKE '%x_'"),
    ("name ILIKE 'X%'", "name ILIKE 'X%'"),
    ("attribute.name = 'x'", "name = 'x'"),
    ("`name` = 'x'", "name = 'x'"),
    ("\"name\" = 'x'", "name = 'x'"),
    ("name='a'AND tags.b='c'", "name = 'a' AND tags.b = 'c'"),
    ("name = 'a'\n\tand\ttags.b != 'c'", "name = 'a' AND tags.b != 'c'"),
    ("tags.team = 'a'", "tags.team = 'a'"),
    ("tag.`team x` = 'a'", "tags.`team x` = 'a'"),
    ("tags.'team x' LIKE 'a%'", "tags.`team x` LIKE 'a%'"),
    ("tags.\"a.b\" = 'v'", "tags.a.b = 'v'"),
    ("tags.`from` = 'x'", "tags.`from` = 'x'"),
    ("tags.`a``b` = 'x'", "tags.\"a``b\" = 'x'"),
    ("tags.mlflow.note = 'x'", "tags.mlflow.note = 'x'"),
    ("tags.x IS NULL", "tags.x IS NULL"),
    ("tags.x is not null", "tags.x IS NOT NULL"),
    ("experiment_id IN ('1', '2')", "experiment_id IN ('1', '2')"),
    ("experiment_id not in ('1',)", "experiment_id NOT IN ('1')"),
    ("experiment_id IN ( \"1\" , '2' )", "experiment_id IN ('1', '2')"),
    ("experiment_id = '7'", "experiment_id = '7'"),
    ("creation_time > 5 and last_update_time <= -1", "creation_time > 5 AND last_update_time <= -1"),
    ("last_update_time >= 007", "last_update_time >= 007"),
    # No escape processing, exactly like MLflow: the doubled quote and the backslash are data.
    ("name = 'it''s'", "name = \"it''s\""),
    ("name = 'a\\'b'", 'name = "a\\\'b"'),
    ('name = "it\'s"', 'name = "it\'s"'),
    ("name = 'a%_\\b'", "name = 'a%_\\b'"),
    ("name = ''", "name = ''"),
    ("name = 'été /* -- ; OR'", "name = 'été /* -- ; OR'"),
]

REFUSED_EXPERIMENTS = [
    "name = 'x' OR name LIKE '%'",
    "name = 'x' or name = 'y'",
    "NOT name = 'x'",
    "(name = 'x')",
    "name = 'x' AND (name = 'y')",
    "name = 'x' -- comment",
    "name = 'x' /* c */",
    "name = 'x'; DROP TABLE experiments",
    "name = 'x';",
    "name = 'x",  # unterminated
    "name = 'x\\' AND name LIKE '%'",  # the backslash swallows the closing quote: the rest is garbage
    'name = "x',
    "name = 'x' AND",
    "AND name = 'x'",
    "name = 'x' AND AND name = 'y'",
    "name = 'x' name = 'y'",
    "name like 'x'",  # MLflow compares the comparator case-sensitively for experiments
    "name NOT LIKE 'x'",
    "name RLIKE 'x'",
    "name IN ('a')",
    "name IS NULL",
    "name > 'a'",
    "name == 'x'",
    "name <> 'x'",
    "name = x",
    "name = `x`",
    "name = 5",
    "name = 0x1F",
    "name = $$x$$",
    "name = ?",
    "experiment_id LIKE '1'",
    "experiment_id = 'abc'",
    "experiment_id = 1",
    "experiment_id in ('1')",
    "experiment_id IN ()",
    "experiment_id IN (1, 2)",
    "experiment_id IN ('1' '2')",
    "experiment_id IN ('1\\x32')",
    "experiment_id = ('1')",
    "experiment_id IN ('99999999999999999999')",
    "creation_time > 1.5",
    "creation_time > 1e3",
    "creation_time > '5'",
    "creation_time LIKE 5",
    "creation_time > 99999999999999999999",
    "tags.x IS NOT  NULL",
    "tags.x IS NOT\tNULL",
    "tags.x IS 'a'",
    "tags.x > 'a'",
    "tags.x = 5",
    "tags.from = 'x'",
    "tags.x.in = 'x'",
    "tags. x = 'y'",
    "tags .x = 'y'",
    "Tags.x = 'y'",
    "`tags`.x = 'y'",
    "attributes.name = 'x'",
    "metrics.x > 1",
    "NAME = 'x'",
    "foo = 'x'",
    "'name' = 'x'",
    "\"a.name\" = 'x'",
    "   ",
    "name = 'x'\x00",
    "name = 'x'\u00a0AND name = 'y'",
    "name = 'x' AND name = 'y' OR name = 'z'",
]

ACCEPTED_RUNS = [
    ("metrics.loss < 0.5 AND params.lr = '0.01'", "metrics.loss < 0.5 AND params.lr = '0.01'"),
    ("metric.loss < .5", "metrics.loss < .5"),
    ("metrics.x > 1e3", "metrics.x > 1e3"),
    ("metrics.x >= -1.5E-3", "metrics.x >= -1.5E-3"),
    ("metrics.x > 1e5AND params.y = 'z'", "metrics.x > 1e5 AND params.y = 'z'"),
    ("tags.`mlflow.runName` = 'x'", "tags.mlflow.runName = 'x'"),
    ("`tags`.x = 'y'", "tags.x = 'y'"),
    ("attributes.status = 'FINISHED'", "status = 'FINISHED'"),
    ("run.user_id ILIKE 'A%'", "user_id ILIKE 'A%'"),
    ("run_id IN ('a', 'b')", "run_id IN ('a', 'b')"),
    ("attributes.run_id in ('a')", "run_id IN ('a')"),
    ("run_id NOT IN ('a')", "run_id NOT IN ('a')"),
    ("datasets.name LIKE 'train%'", "dataset.name LIKE 'train%'"),
    ("dataset.digest IN ('d1', 'd2')", "dataset.digest IN ('d1', 'd2')"),
    ("params.x IS NULL", "params.x IS NULL"),
    ("param.x is not null", "params.x IS NOT NULL"),
    ("attributes.`Run Name` = 'r'", "attributes.`Run Name` = 'r'"),
    ("run_name = 'r'", "run_name = 'r'"),
    ("created >= 1700000000000", "created >= 1700000000000"),
    ("start_time > 5.5", "start_time > 5.5"),
    ("tags.x like 'a%'", "tags.x LIKE 'a%'"),
    ("metrics.`my-loss` != 0", "metrics.`my-loss` != 0"),
]

REFUSED_RUNS = [
    "metrics.x IS NULL",
    "metrics.x = 'a'",
    "metrics.x LIKE 1",
    "params.x > '1'",
    "params.x = 1",
    "status IN ('a')",
    "status > 'a'",
    "dataset.foo = 'x'",
    "dataset.name > 'x'",
    "foo.x = 'y'",
    "run_id = 5",
    "attributes.run_id IS NULL",
    "metrics.x > 1 OR metrics.y > 2",
    "`tags`.x = 'y' OR 1 = 1",
    "run name = 'x'",  # sqlparse's aliased identifier: refused
    "tags.x IN ('a')",
    "metrics.5 > 1",
    "metrics.a-b > 1",
    "start_time > '5'",
    "metrics.x > 1 AND",
    "run_id != ('a', 'b')",
    "tags.x y IS NULL",  # sqlparse's aliased identifier: MLflow reads the key "x y"
]


@pytest.mark.parametrize(("text", "canonical"), ACCEPTED_EXPERIMENTS)
def test_accepted_experiment_filters(text: str, canonical: str) -> None:
    assert filters.canonical_filter(text, EXPERIMENTS) == canonical


@pytest.mark.parametrize("text", REFUSED_EXPERIMENTS)
def test_refused_experiment_filters(text: str) -> None:
    with pytest.raises(FilterError) as refused:
        filters.parse_filter(text, EXPERIMENTS)
    assert refused.value.status == 400 and refused.value.error_code == "INVALID_PARAMETER_VALUE"


@pytest.mark.parametrize(("text", "canonical"), ACCEPTED_RUNS)
def test_accepted_run_filters(text: str, canonical: str) -> None:
    assert filters.canonical_filter(text, RUNS) == canonical


@pytest.mark.parametrize("text", REFUSED_RUNS)
def test_refused_run_filters(text: str) -> None:
    with pytest.raises(FilterError):
        filters.parse_filter(text, RUNS)


def test_canonical_filters_are_remembered_per_grammar_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(filters, "_CANONICAL_FILTERS", {})
    monkeypatch.setattr(filters, "CANONICAL_FILTER_CACHE_SIZE", 3)
    parses: list[str] = []
    real_parse = filters.parse_filter
    monkeypatch.setattr(filters, "parse_filter", lambda text, grammar: parses.append(text) or real_parse(text, grammar))
    text = "metrics.acc > 0.5 and tags.x = 'y'"
    assert filters.canonical_filter(text, RUNS) == "metrics.acc > 0.5 AND tags.x = 'y'"
    parsed_once = len(parses)
    assert filters.canonical_filter(text, RUNS) == "metrics.acc > 0.5 AND tags.x = 'y'"
    assert len(parses) == parsed_once  # the second time from memory
    # The same text under another grammar is that grammar's answer, not the remembered one.
    with pytest.raises(FilterError):
        filters.canonical_filter(text, EXPERIMENTS)
    # A refused filter is refused every time (never remembered).
    for _ in range(2):
        with pytest.raises(FilterError):
            filters.canonical_filter("metrics.acc > 'x'", RUNS)
    for index in range(10):
        filters.canonical_filter(f"tags.t{index} = 'v'", RUNS)
    assert len(filters._CANONICAL_FILTERS) == 3
    assert ("runs", "tags.t9 = 'v'") in filters._CANONICAL_FILTERS and ("runs", text) not in filters._CANONICAL_FILTERS
    long_filter = " AND ".join(f"tags.k{index} = 'v'" for index in range(100))
    assert len(long_filter) > filters.CACHED_FILTER_MAX_LENGTH
    assert filters.canonical_filter(long_filter, RUNS) == long_filter
    assert ("runs", long_filter) not in filters._CANONICAL_FILTERS


def test_parsed_form_is_mlflows() -> None:
    parsed = filters.parse_filter(
        "name LIKE 'a%' AND tags.t IS NULL AND experiment_id IN ('1') AND creation_time > 5", EXPERIMENTS
    )
    assert [c.as_mlflow() for c in parsed] == [
        {"type": "attribute", "key": "name", "comparator": "LIKE", "value": "a%"},
        {"type": "tag", "key": "t", "comparator": "IS NULL", "value": None},
        {"type": "attribute", "key": "experiment_id", "comparator": "IN", "value": ("1",)},
        {"type": "attribute", "key": "creation_time", "comparator": ">", "value": 5},
    ]
    parsed = filters.parse_filter('metrics.m <= 1e3 AND params.p = "v"', RUNS)
    assert [c.as_mlflow() for c in parsed] == [
        {"type": "metric", "key": "m", "comparator": "<=", "value": "1e3"},
        {"type": "parameter", "key": "p", "comparator": "=", "value": "v"},
    ]


def test_filter_limits() -> None:
    with pytest.raises(FilterError, match="exceeds"):
        filters.parse_filter("name = '" + "x" * filters.MAX_FILTER_LENGTH + "'", EXPERIMENTS)
    with pytest.raises(FilterError, match="tokens"):
        filters.parse_filter("name = 'x'" + " " * filters.MAX_FILTER_TOKENS, EXPERIMENTS)
    with pytest.raises(FilterError, match="string"):
        filters.parse_filter(5, EXPERIMENTS)  # type: ignore[arg-type]


# -- quoting -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "quoted"),
    [("a", "'a'"), ("", "''"), ("it's", '"it\'s"'), ('say "hi"', "'say \"hi\"'"), ("a\\b", "'a\\b'")],
)
def test_quote_string(value: str, quoted: str) -> None:
    assert filters.quote_string(value) == quoted


@pytest.mark.parametrize("value", ['it\'s "x"', "a\\", "'\\", "x\\"])
def test_values_without_a_safe_spelling_are_refused(value: str) -> None:
    with pytest.raises(FilterError, match="cannot be quoted safely"):
        filters.quote_string(value)


def test_a_value_that_mlflow_reads_but_cannot_be_requoted_is_a_400() -> None:
    # MLflow reads 'a\' at the very end of a filter as the value a\ ; the gateway appends a clause
    # after it, where the backslash would swallow the closing quote: no safe spelling exists.
    assert [c.value for c in filters.parse_filter("name = 'a\\'", EXPERIMENTS)] == ["a\\"]
    with pytest.raises(FilterError, match="quoted safely"):
        filters.scope_experiment_filter("name = 'a\\'", "acme")
    with pytest.raises(FilterError, match="quoted safely"):
        filters.scope_experiment_filter("name = 'it''s \"x\"'", "acme")


# -- experiment scoping --------------------------------------------------------------------------------

SCOPED = [
    ("", "name LIKE 'acme/%'"),
    ("name = 'x'", "name = 'acme/x' AND name LIKE 'acme/%'"),
    ("name != 'x'", "name != 'acme/x' AND name LIKE 'acme/%'"),
    ("name LIKE '%x'", "name LIKE 'acme/%x' AND name LIKE 'acme/%'"),
    ("name LIKE '%'", "name LIKE 'acme/%' AND name LIKE 'acme/%'"),
    ("name LIKE '_cme/%'", "name LIKE 'acme/_cme/%' AND name LIKE 'acme/%'"),
    ("name ILIKE 'ACME/%'", "name ILIKE 'acme/ACME/%' AND name LIKE 'acme/%'"),
    ('name = "it\'s"', "name = \"acme/it's\" AND name LIKE 'acme/%'"),
    ("attribute.`name` = 'x' AND tags.t = 'v'", "name = 'acme/x' AND tags.t = 'v' AND name LIKE 'acme/%'"),
    ("experiment_id IN ('1','2')", "experiment_id IN ('1', '2') AND name LIKE 'acme/%'"),
    ("experiment_id = '0'", "experiment_id = '0' AND name LIKE 'acme/%'"),
    ("tags.`name` = 'x'", "tags.name = 'x' AND name LIKE 'acme/%'"),  # a tag called "name" is not the name
]


@pytest.mark.parametrize(("text", "scoped"), SCOPED)
def test_scope_experiment_filter(text: str, scoped: str) -> None:
    assert filters.scope_experiment_filter(text, "acme") == scoped


@pytest.mark.parametrize("tenant", ["ACME", "ac_e", "ac%e", "a/b", "", "acme'", "x" * 64])
def test_scoping_refuses_tenant_ids_that_are_not_like_safe(tenant: str) -> None:
    with pytest.raises(PermissionDenied):
        filters.scope_experiment_filter("", tenant)


@pytest.mark.parametrize("text", REFUSED_EXPERIMENTS)
def test_scoping_refuses_what_the_parser_refuses(text: str) -> None:
    with pytest.raises(BadRequest):
        filters.scope_experiment_filter(text, "acme")


# -- order_by ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "canonical"),
    [
        ("name", "name"),
        ("name DESC", "name DESC"),
        ("attribute.name asc", "name ASC"),
        ("creation_time desc", "creation_time DESC"),
        ("experiment_id", "experiment_id"),
        ("`last_update_time`   ASC", "last_update_time ASC"),
    ],
)
def test_experiment_order_by(entry: str, canonical: str) -> None:
    assert filters.canonical_order_by([entry], EXPERIMENTS) == [canonical]


@pytest.mark.parametrize(
    "entry",
    [
        "tags.x",
        "name UP",
        " name",
        "name ",
        "foo",
        "name DESC NULLS FIRST",
        "name; drop",
        "name, creation_time",
        "name DESC ASC",
        "name\nDESC",
        "metrics.x",
        "",
        "'name'",
        "name -- x",
    ],
)
def test_refused_experiment_order_by(entry: str) -> None:
    with pytest.raises(FilterError):
        filters.canonical_order_by([entry], EXPERIMENTS)


@pytest.mark.parametrize(
    ("entry", "canonical"),
    [
        ("metrics.loss DESC", "metrics.loss DESC"),
        ("metric.`my loss` ASC", "metrics.`my loss` ASC"),
        ("start_time", "start_time"),
        ("attributes.created", "created"),
        ("params.lr", "params.lr"),
        ("tags.t desc", "tags.t DESC"),
        ("tags.mlflow.runName", "tags.mlflow.runName"),
        ("tags.`from`", "tags.`from`"),
    ],
)
def test_run_order_by(entry: str, canonical: str) -> None:
    assert filters.canonical_order_by([entry], RUNS) == [canonical]


@pytest.mark.parametrize(
    "entries",
    [
        ["dataset.name"],
        ["start_time", "created DESC"],  # the same column twice: MLflow would answer 500
        ["metrics.a", "metric.a DESC"],
        ['metrics.`a"b`'],
        ["metrics.`a'b`"],
        ["metrics.` a`"],
        ["timestamp"],
        ["metrics.x DESC ASC"],
        ["metrics.from"],
        "metrics.x",  # not a list
        [5],
    ],
)
def test_refused_run_order_by(entries: object) -> None:
    with pytest.raises(FilterError):
        filters.canonical_order_by(entries, RUNS)


def _tokenize_pattern_by_pattern(text: str) -> list[tuple[str, str, int]]:
    """tokenize() as first written: each pattern of _TOKEN_PATTERNS tried in turn."""
    tokens, position = [], 0
    while position < len(text):
        if filters._HEX.match(text, position):
            raise FilterError("hex")
        for kind, pattern in filters._TOKEN_PATTERNS:
            match = pattern.match(text, position)
            if match:
                tokens.append((kind, match.group(), position))
                position = match.end()
                break
        else:
            raise FilterError("unexpected")
    return tokens


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("aZ_0x9.-eE '\"`()<>=!~,\n\tÀé;%*")), max_size=25))
def test_tokenize_with_one_pattern_agrees_with_pattern_by_pattern(text: str) -> None:
    try:
        expected: object = _tokenize_pattern_by_pattern(text)
    except FilterError as refused:
        expected = str(refused)
    try:
        actual: object = [(token.kind, token.text, token.position) for token in filters.tokenize(text)]
    except FilterError as refused:
        actual = "hex" if "Hexadecimal" in str(refused) else "unexpected"
    assert actual == expected
