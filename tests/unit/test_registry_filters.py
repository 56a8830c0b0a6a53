"""The registry search grammars agree with MLflow's own parser on what a scoped filter means."""

from __future__ import annotations

import pytest
from mlflow.utils.search_utils import SearchModelUtils, SearchModelVersionUtils

from gateway.policy.filters import FilterError, Grammar, parse_filter
from gateway.policy.registry import MODEL_VERSIONS, REGISTERED_MODELS, scope_registry_filter

CASES: list[tuple[Grammar, type[SearchModelUtils] | type[SearchModelVersionUtils], str]] = [
    (REGISTERED_MODELS, SearchModelUtils, ""),
    (REGISTERED_MODELS, SearchModelUtils, "name = 'x'"),
    (REGISTERED_MODELS, SearchModelUtils, "name ILIKE '%x%'"),
    (REGISTERED_MODELS, SearchModelUtils, "name IN ('a', 'b')"),
    (REGISTERED_MODELS, SearchModelUtils, "tags.`mlflow.prompt.is_prompt` = 'true' AND name = 'p'"),
    (REGISTERED_MODELS, SearchModelUtils, "tag.`mlflow.prompt.is_prompt` != 'true'"),
    (MODEL_VERSIONS, SearchModelVersionUtils, "run_id = 'abc'"),
    (MODEL_VERSIONS, SearchModelVersionUtils, "name = 'x' AND version_number >= 2"),
    (MODEL_VERSIONS, SearchModelVersionUtils, "run_id IN ('a', 'b') AND tags.k LIKE 'v%'"),
    (MODEL_VERSIONS, SearchModelVersionUtils, "source_path = 'runs:/abc/model'"),
]


@pytest.mark.parametrize(("grammar", "utils", "text"), CASES)
def test_scoped_filter_means_to_mlflow_what_the_gateway_parsed(
    grammar: Grammar, utils: type[SearchModelUtils], text: str
) -> None:
    scoped = scope_registry_filter(text, "acme", grammar)
    parsed = utils.parse_search_filter(scoped)
    assert parsed == [comparison.as_mlflow() for comparison in parse_filter(scoped, grammar)]
    assert parsed[-1] == {"type": "attribute", "key": "name", "comparator": "LIKE", "value": "acme.%"}
    for clause in parsed[:-1]:
        if clause["type"] == "attribute" and clause["key"] == "name":
            values = clause["value"] if isinstance(clause["value"], list | tuple) else [clause["value"]]
            assert all(value.startswith("acme.") for value in values)


@pytest.mark.parametrize(
    "text",
    [
        "name = 'x' OR name = 'y'",
        "name = 'x' name = 'y'",
        "creation_timestamp > 1",
        "tags.k IS NULL",
        "run_id = 'a'",  # a model-version attribute, not a registered-model one
        "tags.k IN ('a')",
    ],
)
def test_registered_model_filters_outside_the_grammar_are_refused(text: str) -> None:
    with pytest.raises(FilterError):
        scope_registry_filter(text, "acme", REGISTERED_MODELS)
