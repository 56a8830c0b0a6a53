"""The GraphQL document checker: the UI's four queries pass, everything else the UI never sends is refused."""

from __future__ import annotations

import glob
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
from graphql import GraphQLSchema, build_schema, parse, print_ast

from gateway.auth.principal import Principal
from gateway.errors import BadRequest, GatewayError, NotFound, PermissionDenied
from gateway.policy import graphql as gql
from gateway.policy.core import Exchange
from gateway.policy.graphql_schema import SCHEMA_SDL
from tests.graphql_ui import BULK_INTERVAL, DOCUMENTS, GET_EXPERIMENT, GET_RUN, SEARCH_RUNS, with_typenames

RUN = "a" * 32
OTHER_RUN = "b" * 32

# The variables the UI sends with each document (read off the bundle's hooks).
UI_VARIABLES: dict[str, dict[str, Any]] = {
    "GetRun": {"data": {"runId": RUN}},
    "SearchRuns": {"data": {"filter": "attributes.run_id = 'x'", "experimentIds": ["7"]}},
    "MlflowGetExperimentQuery": {"input": {"experimentId": "7"}},
    "GetMetricHistoryBulkInterval": {
        "data": {"runIds": [RUN, OTHER_RUN], "metricKey": "loss", "startStep": None, "endStep": None, "maxResults": 320}
    },
}
UI_ROOT_FIELDS = {
    "GetRun": "mlflowGetRun",
    "SearchRuns": "mlflowSearchRuns",
    "MlflowGetExperimentQuery": "mlflowGetExperiment",
    "GetMetricHistoryBulkInterval": "mlflowGetMetricHistoryBulkInterval",
}

SMALL_RUN_QUERY = "query Q($data: MlflowGetRunInput!) { mlflowGetRun(input: $data) { run { info { runId } } } }"


def run_query(selection: str, *, after: str = "", run_id: str = RUN) -> str:
    """``query { mlflowGetRun(input: {runId: "<run_id>"}) { <selection> } <after> }``."""
    return 'query { mlflowGetRun(input: {runId: "' + run_id + '"}) { ' + selection + " } " + after + " }"


def _refused(query: str, variables: object = None, operation_name: object = None) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        gql.check_document(query, variables, operation_name)
    assert 400 <= caught.value.status < 500
    return caught.value


def _bad_request(query: str, variables: object = None, operation_name: object = None) -> str:
    error = _refused(query, variables, operation_name)
    assert isinstance(error, BadRequest), error
    return error.message


def _denied(query: str, variables: object = None) -> str:
    error = _refused(query, variables)
    assert isinstance(error, PermissionDenied), error
    return error.message


# -- the UI's own documents ------------------------------------------------------------------------------


def _bundle_documents() -> set[str]:
    import mlflow.server

    build = Path(mlflow.server.__file__).parent / "js" / "build" / "static" / "js"
    found: set[str] = set()
    for path in glob.glob(str(build / "*.js")):
        text = Path(path).read_text(encoding="utf-8")
        for match in re.finditer(r"\.J1`([^`]*)`", text):
            found.add(match.group(1).replace("\\n", "\n"))
    return found


def test_the_documents_are_the_ones_the_installed_ui_bundle_sends() -> None:
    assert _bundle_documents() == set(DOCUMENTS.values())


def test_the_allowed_root_fields_are_exactly_those_of_the_ui_documents() -> None:
    roots = set()
    for document in DOCUMENTS.values():
        (operation,) = parse(document).definitions
        roots |= {selection.name.value for selection in operation.selection_set.selections}  # type: ignore[attr-defined]
    assert roots == gql.ROOT_FIELDS == set(UI_ROOT_FIELDS.values())


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
@pytest.mark.parametrize("apollo", [False, True], ids=["verbatim", "apollo-typenames"])
def test_ui_documents_are_accepted(name: str, apollo: bool) -> None:
    document = with_typenames(DOCUMENTS[name]) if apollo else DOCUMENTS[name]
    variables = UI_VARIABLES[name]
    checked = gql.check_document(document, variables, name)
    assert checked.root_field == UI_ROOT_FIELDS[name]
    (variable,) = variables
    assert checked.input_variable == variable
    assert {key: value for key, value in checked.input.items() if value is not None} == {
        key: value for key, value in variables[variable].items() if value is not None
    }


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_forwarded_body_is_the_printed_ast_with_only_the_checked_input(name: str) -> None:
    client_text = "# a comment the upstream must not see\n" + DOCUMENTS[name]
    variables = {**UI_VARIABLES[name], "unused": {"runId": OTHER_RUN}}
    checked = gql.check_document(client_text, variables, name)
    body = checked.forwarded_body({"replaced": True})
    assert body == {
        "query": print_ast(parse(DOCUMENTS[name])),
        "variables": {checked.input_variable: {"replaced": True}},
        "operationName": name,
    }
    assert "comment" not in body["query"]


def test_inline_input_is_replaced_by_the_checked_value() -> None:
    query = '{ mlflowGetRun(input: {runUuid: "' + RUN + '"}) { run { info { runId } } } }'
    checked = gql.check_document(query)
    assert checked.input_variable is None
    assert checked.input == {"runUuid": RUN}
    body = checked.forwarded_body({"runId": OTHER_RUN})
    assert body == {
        "query": print_ast(parse('{ mlflowGetRun(input: {runId: "' + OTHER_RUN + '"}) { run { info { runId } } } }')),
        "variables": {},
    }


def test_inline_enum_and_lists_survive_re_serialisation() -> None:
    query = '{ mlflowSearchRuns(input: {experimentIds: "7", runViewType: ALL, maxResults: 5}) { nextPageToken } }'
    checked = gql.check_document(query)
    assert checked.input == {"experimentIds": ["7"], "runViewType": "ALL", "maxResults": 5}
    printed = checked.forwarded_body({**checked.input, "experimentIds": ["9", "10"]})["query"]
    assert 'input: {experimentIds: ["9", "10"], runViewType: ALL, maxResults: 5}' in printed


def test_typename_beside_the_root_field_is_accepted() -> None:
    query = "query Q($data: MlflowGetRunInput!) { __typename mlflowGetRun(input: $data) { __typename } }"
    assert gql.check_document(query, {"data": {"runId": RUN}}).root_field == "mlflowGetRun"


# -- refused: shape of the request ---------------------------------------------------------------------


@pytest.mark.parametrize("query", [None, "", "   ", 3, ["{ __typename }"], {"query": "{ __typename }"}])
def test_query_must_be_a_non_empty_string(query: object) -> None:
    assert "query" in _bad_request(query)  # type: ignore[arg-type]


@pytest.mark.parametrize("variables", [[{"data": {"runId": RUN}}], '{"data": {"runId": "x"}}', 5])
def test_variables_must_be_an_object(variables: object) -> None:
    assert "variables" in _bad_request(SMALL_RUN_QUERY, variables)


def test_batched_documents_are_refused() -> None:
    assert "query" in _bad_request([SMALL_RUN_QUERY, SMALL_RUN_QUERY])  # type: ignore[arg-type]


def test_syntax_errors_are_a_400() -> None:
    assert "Invalid GraphQL document" in _bad_request("query { mlflowGetRun(")


def test_oversized_documents_are_refused_before_validation() -> None:
    fields = " ".join(["runId"] * 3000)
    assert "tokens" in _bad_request(
        f'{{ mlflowGetRun(input: {{runId: "{RUN}"}}) {{ run {{ info {{ {fields} }} }} }} }}'
    )


@pytest.mark.parametrize("depth", [300, 650])
def test_deeply_nested_documents_are_a_400_not_a_crash(depth: int) -> None:
    assert "nested too deeply" in _bad_request(run_query("run " + "{ a " * depth + "}" * depth))
    assert "nested too deeply" in _bad_request(
        "{ mlflowGetRun(input: " + "[" * depth + "]" * depth + ") { __typename } }"
    )


def test_operation_name_must_match_the_one_operation() -> None:
    assert "Unknown GraphQL operation" in _bad_request(SMALL_RUN_QUERY, {"data": {"runId": RUN}}, "Other")
    assert "operationName" in _bad_request(SMALL_RUN_QUERY, {"data": {"runId": RUN}}, 5)


# -- refused: operations and root fields --------------------------------------------------------------


def test_two_operations_are_refused() -> None:
    query = SMALL_RUN_QUERY + ' query Other { mlflowGetExperiment(input: {experimentId: "1"}) { __typename } }'
    assert "exactly one operation" in _bad_request(query, {"data": {"runId": RUN}}, "Q")


def test_two_root_fields_are_refused() -> None:
    query = run_query("__typename", after='mlflowGetExperiment(input: {experimentId: "1"}) { __typename }')
    assert "exactly one of" in _bad_request(query)


def test_the_same_root_field_twice_is_refused() -> None:
    second = 'mlflowGetRun(input: {runId: "' + OTHER_RUN + '"}) { run { info { runId } } }'
    assert "exactly one of" in _bad_request(run_query("__typename", after=second))


def test_only_typename_at_the_root_is_refused() -> None:
    assert "exactly one of" in _bad_request("{ __typename }")


@pytest.mark.parametrize(
    "field",
    [
        'mlflowListArtifacts(input: {runId: "x"}) { files { path } }',
        "mlflowSearchModelVersions(input: {filter: \"name LIKE '%%'\"}) { modelVersions { name } }",
        'test(inputString: "x") { output }',
        "noSuchField",
    ],
)
def test_root_fields_outside_the_ui_four_are_denied(field: str) -> None:
    name = field.split("(")[0].split(" ")[0]
    assert _denied(f"query {{ {field} }}") == f"GraphQL field '{name}' is not available through the gateway"


@pytest.mark.parametrize(
    "query",
    [
        'mutation { mlflowSearchRuns(input: {experimentIds: ["1"]}) { runs { info { runId } } } }',
        'mutation { mlflowSearchDatasets(input: {experimentIds: ["1"]}) { datasetSummaries { name } } }',
        'mutation { testMutation(inputString: "x") { output } }',
        "subscription { mlflowGetRun { __typename } }",
    ],
)
def test_mutations_and_subscriptions_are_denied(query: str) -> None:
    assert "not available through the gateway" in _denied(query)


@pytest.mark.parametrize(
    "query",
    [
        "{ __schema { types { name } } }",
        '{ __type(name: "Query") { fields { name } } }',
        run_query("__typename", after="__schema { queryType { name } }"),
        run_query('run { __type(name: "Query") { name } }'),
    ],
)
def test_introspection_beyond_typename_is_denied(query: str) -> None:
    assert _denied(query) == "GraphQL introspection is disabled by the gateway"


# -- refused: aliases, fragments, directives ------------------------------------------------------------


def test_aliases_on_root_fields_are_refused() -> None:
    query = 'query { a: mlflowGetExperiment(input: {experimentId: "1"}) { experiment { name } } }'
    assert "aliases" in _bad_request(query)


def test_aliased_root_fields_reading_several_objects_are_refused() -> None:
    # mlflow-api.md §8.3: an aliased query read experiments 1 and 2 in one request.
    query = (
        'query { a: mlflowGetExperiment(input: {experimentId: "1"}) { experiment { name } } '
        'b: mlflowGetExperiment(input: {experimentId: "2"}) { experiment { name } } }'
    )
    assert "aliases" in _bad_request(query)


@pytest.mark.parametrize(
    "nested",
    ["run { mv: modelVersions { name } }", "run { experiment { n: name } }", "run { x: experiment { name } }"],
)
def test_aliases_anywhere_are_refused(nested: str) -> None:
    assert "aliases" in _bad_request(run_query(nested))


def test_fragment_smuggling_another_root_field_is_refused() -> None:
    query = (
        run_query("__typename", after="...F")
        + ' fragment F on Query { mlflowListArtifacts(input: {runId: "x"}) { files { path } } }'
    )
    assert "fragments" in _bad_request(query)


def test_fragment_definitions_are_refused_even_when_harmless() -> None:
    query = run_query("run { ...R }") + " fragment R on MlflowRunExtension { info { runId } }"
    assert "fragments" in _bad_request(query)


def test_inline_fragment_at_the_root_is_refused() -> None:
    query = run_query(
        "__typename",
        after='... on Query { mlflowSearchModelVersions(input: {filter: ""}) { modelVersions { name } } }',
    )
    assert "fragments" in _bad_request(query)


def test_inline_fragment_below_the_root_is_refused() -> None:
    assert "fragments" in _bad_request(run_query("run { ... on MlflowRunExtension { modelVersions { name } } }"))


@pytest.mark.parametrize(
    "selection",
    [
        "modelVersions { name @skip(if: true) source }",
        "modelVersions @include(if: true) { name }",
        "experiment { name @include(if: false) }",
    ],
)
def test_field_directives_are_refused(selection: str) -> None:
    assert "directives" in _bad_request(run_query("run { " + selection + " }"))


def test_model_versions_must_select_the_name_the_gateway_filters_on() -> None:
    assert "'name'" in _bad_request(run_query("run { modelVersions { source version } }"))


def test_operation_directives_other_than_component_are_refused() -> None:
    assert "@skip" in _bad_request(run_query("__typename").replace("query", "query @skip(if: true)", 1))
    query = run_query("__typename").replace("query", "query Q($n: String!) @component(name: $n)", 1)
    assert "@component" in _bad_request(query, {"n": "x"})


# -- refused: inputs and variables ------------------------------------------------------------------


def test_unknown_nested_fields_fail_validation() -> None:
    assert "Cannot query field" in _bad_request(run_query("run { secret }"))


def test_unknown_input_fields_are_refused() -> None:
    assert "run_id" in _bad_request(SMALL_RUN_QUERY, {"data": {"run_id": RUN}})


def test_wrongly_typed_variables_are_refused() -> None:
    assert "Invalid GraphQL variables" in _bad_request(SMALL_RUN_QUERY, {"data": {"runId": 5}})


def test_variables_inside_an_inline_input_are_refused() -> None:
    query = "query Q($id: String) { mlflowGetRun(input: {runId: $id}) { __typename } }"
    assert "one variable" in _bad_request(query, {"id": RUN})


def test_a_second_variable_definition_is_refused() -> None:
    query = "query Q($data: MlflowGetRunInput!, $other: String) { mlflowGetRun(input: $data) { __typename } }"
    assert "$other" in _bad_request(query, {"data": {"runId": RUN}, "other": "x"})


def test_missing_input_is_refused() -> None:
    assert "'input'" in _bad_request("query { mlflowGetRun { __typename } }")
    assert "'input'" in _bad_request("query Q($d: MlflowGetRunInput) { mlflowGetRun(input: $d) { __typename } }")


# -- the registry prefix -------------------------------------------------------------------------------


def test_registered_model_prefix_uses_the_registry_separator() -> None:
    assert gql.registered_model_prefix("acme") == "acme."


# -- the schema copy is MLflow's -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_schema() -> GraphQLSchema:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mlflow.server.graphql.graphql_schema_extensions import schema

    return schema.graphql_schema  # type: ignore[no-any-return]


def _shape(schema: GraphQLSchema, name: str) -> object:
    kind = schema.type_map[name]
    if hasattr(kind, "values"):
        return ("enum", sorted(kind.values))
    if hasattr(kind, "fields"):
        return {
            field_name: (
                str(field.type),
                {arg: str(a.type) for arg, a in getattr(field, "args", {}).items()},
                getattr(field, "default_value", None),
            )
            for field_name, field in kind.fields.items()
        }
    return ("scalar", name)


def test_the_schema_copy_matches_the_installed_mlflow(mlflow_schema: GraphQLSchema) -> None:
    ours = build_schema(SCHEMA_SDL)
    for name in ours.type_map:
        if name.startswith("__") or name == "Query":
            continue
        assert name in mlflow_schema.type_map, name
        assert _shape(ours, name) == _shape(mlflow_schema, name), name
    assert ours.query_type is not None and mlflow_schema.query_type is not None
    for name, field in ours.query_type.fields.items():
        theirs = mlflow_schema.query_type.fields[name]
        assert str(field.type) == str(theirs.type)
        assert {arg: str(a.type) for arg, a in field.args.items()} == {
            arg: str(a.type) for arg, a in theirs.args.items()
        }
    assert set(ours.query_type.fields) == gql.ROOT_FIELDS
    assert ours.mutation_type is None


def test_mlflow_still_resolves_model_versions_across_every_registered_model() -> None:
    """The reason for the response filter: MLflow's resolver searches all models by run id."""
    import inspect

    from mlflow.server.graphql.graphql_schema_extensions import MlflowRunExtension

    source = inspect.getsource(MlflowRunExtension.resolve_model_versions)
    assert "run_id='{run_id}'" in source
    assert "search_model_versions_impl" in source


# -- response rewriting --------------------------------------------------------------------------------


def _exchange(root: str, tenant: str = "acme") -> Exchange:
    ex = Exchange(
        principal=Principal(tenant=tenant, user="alice"),
        method="POST",
        path="/graphql",
        path_params={},
        query={},
        body={},
        services=None,  # type: ignore[arg-type]
        request_id="test",
    )
    ex.notes[gql.NOTE_ROOT_FIELD] = root
    return ex


def _run(experiment_name: str, *version_names: str) -> dict[str, Any]:
    return {
        "info": {"runUuid": RUN},
        "experiment": {"experimentId": "7", "name": experiment_name},
        "modelVersions": [{"name": name, "version": "1", "source": "s3://b/k"} for name in version_names],
    }


def test_get_run_response_strips_names_and_drops_foreign_model_versions() -> None:
    body: dict[str, Any] = {
        "data": {
            "mlflowGetRun": {"apiError": None, "run": _run("acme/exp", "acme.mine", "globex.evil", "legacy", "acme.")}
        },
        "errors": None,
    }
    gql.rewrite_graphql_response(_exchange("mlflowGetRun"), 200, body)
    run = body["data"]["mlflowGetRun"]["run"]
    assert run["experiment"]["name"] == "exp"
    assert run["modelVersions"] == [{"name": "mine", "version": "1", "source": "s3://b/k"}]


def test_search_runs_response_rewrites_every_run() -> None:
    body: dict[str, Any] = {
        "data": {
            "mlflowSearchRuns": {"runs": [_run("acme/a", "globex.x"), _run("acme/b/c", "acme.m")], "apiError": None}
        }
    }
    gql.rewrite_graphql_response(_exchange("mlflowSearchRuns"), 200, body)
    runs = body["data"]["mlflowSearchRuns"]["runs"]
    assert [run["experiment"]["name"] for run in runs] == ["a", "b/c"]
    assert [run["modelVersions"] for run in runs] == [[], [{"name": "m", "version": "1", "source": "s3://b/k"}]]


def test_get_experiment_response_strips_the_name() -> None:
    body: dict[str, Any] = {"data": {"mlflowGetExperiment": {"experiment": {"name": "acme/Default"}}}}
    gql.rewrite_graphql_response(_exchange("mlflowGetExperiment"), 200, body)
    assert body["data"]["mlflowGetExperiment"]["experiment"]["name"] == "Default"


@pytest.mark.parametrize("name", ["globex/exp", "acmex/exp", "exp", "Default"])
def test_a_foreign_experiment_in_a_response_is_answered_as_missing(name: str) -> None:
    body: dict[str, Any] = {"data": {"mlflowGetExperiment": {"experiment": {"name": name}}}}
    with pytest.raises(NotFound):
        gql.rewrite_graphql_response(_exchange("mlflowGetExperiment"), 200, body)


def test_error_strings_lose_the_callers_prefix() -> None:
    body: dict[str, Any] = {
        "data": {"mlflowGetExperiment": {"apiError": {"code": "X", "message": "Experiment 'acme/x' is gone"}}},
        "errors": ["Experiment acme/x failed", {"message": "name=acme/y"}, 5],
    }
    gql.rewrite_graphql_response(_exchange("mlflowGetExperiment"), 200, body)
    assert body["errors"] == ["Experiment x failed", {"message": "name=y"}, 5]
    assert body["data"]["mlflowGetExperiment"]["apiError"]["message"] == "Experiment 'x' is gone"


def test_null_data_is_left_alone() -> None:
    body: dict[str, Any] = {"data": None, "errors": ["Run with id=x not found"]}
    gql.rewrite_graphql_response(_exchange("mlflowGetRun"), 200, body)
    assert body == {"data": None, "errors": ["Run with id=x not found"]}


def test_the_documents_module_exports_every_ui_document() -> None:
    assert {GET_RUN, SEARCH_RUNS, GET_EXPERIMENT, BULK_INTERVAL} == set(DOCUMENTS.values())
