"""The web UI's GraphQL endpoint (``POST /graphql``): one checked query, every id owned, names stripped.

The UI sends exactly four operations (``GetRun``, ``SearchRuns``, ``MlflowGetExperimentQuery``,
``GetMetricHistoryBulkInterval``; mlflow-api.md §8.3). The gateway parses the document with
graphql-core, validates it against the part of MLflow's schema those operations use
(:mod:`gateway.policy.graphql_schema`) and accepts only:

- one operation, and it is a ``query``: MLflow's ``Mutation`` type only holds read-only searches
  (``mlflowSearchRuns``, ``mlflowSearchDatasets``) and an echo, none of which the UI sends;
- exactly one root field among :data:`ROOT_FIELDS` (``__typename`` may sit beside it), unaliased;
- no alias, fragment, inline fragment or directive anywhere (``@component`` on the operation, with a
  literal name, excepted). Response keys are then exactly the schema's field names, so the response
  phase finds every experiment name and model version, and ``@skip``/``@include`` cannot hide the
  ``name`` it filters on;
- no introspection besides ``__typename``.

Every id of the root field's ``input`` argument, inline or in ``variables``, is checked like its REST
twin: experiment ids owned (``0`` maps to the tenant's Default), run ids owned. The upstream receives
only what was checked: the document printed from the checked AST (never the client's text), the
checked ``input`` as the operation's one variable (or inlined when the client inlined it), and the
operation's name. A missing id and another tenant's id get the same 404 with MLflow's own message.

Responses are buffered and rewritten: ``experiment.name`` loses the ``<tenant>/`` prefix, and
``modelVersions`` keeps only versions of the tenant's own registered models. MLflow resolves that
field with ``search_model_versions("run_id='<run>'")`` across every registered model, so a version of
another tenant's model whose source run is this tenant's run would otherwise show (verified on
MLflow 3.17.2). Registered models are named ``<tenant>.<name>`` upstream (:data:`REGISTRY_SEPARATOR`,
the prefix the registry policies use); the prefix is stripped from the versions kept. Dropping them
breaks no paging: the nested list is not paginated and its query cannot be scoped upstream.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from graphql import (
    ArgumentNode,
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    GraphQLError,
    GraphQLField,
    GraphQLSchema,
    ListValueNode,
    NameNode,
    ObjectValueNode,
    OperationDefinitionNode,
    OperationType,
    SelectionSetNode,
    StringValueNode,
    ValueNode,
    VariableNode,
    ast_from_value,
    build_schema,
    parse,
    print_ast,
    validate,
)
from graphql.execution import get_argument_values, get_variable_values

from gateway.errors import BadRequest, NotFound, PermissionDenied
from gateway.http.canonical import JsonObject
from gateway.policy.core import Access, Deny, Exchange, Policy
from gateway.policy.experiments import experiment_prefix, strip_prefix_in_error
from gateway.policy.graphql_schema import SCHEMA_SDL
from gateway.policy.registry import registered_model_prefix
from gateway.policy.runs import MAX_IDS_PER_REQUEST

logger = logging.getLogger(__name__)

GET_EXPERIMENT = "mlflowGetExperiment"
GET_RUN = "mlflowGetRun"
SEARCH_RUNS = "mlflowSearchRuns"
BULK_INTERVAL = "mlflowGetMetricHistoryBulkInterval"
# The root fields of the UI's four operations (each operation has exactly one).
ROOT_FIELDS = frozenset({GET_EXPERIMENT, GET_RUN, SEARCH_RUNS, BULK_INTERVAL})
TYPENAME = "__typename"
INTROSPECTION_FIELDS = frozenset({"__schema", "__type"})
OPERATION_DIRECTIVE = "component"  # MLflow's @component(name: ...) marker, on every UI query but one
INPUT_ARGUMENT = "input"
# The UI's largest document (GetRun, with Apollo's __typename on every selection set) is ~250 tokens.
MAX_TOKENS = 2_000
# The JSON keys of a GraphQL request, after the gateway's snake_case normalisation of `operationName`.
REQUEST_FIELDS = frozenset({"query", "variables", "operation_name"})
NOTE_ROOT_FIELD = "graphql_root_field"

SCHEMA = build_schema(SCHEMA_SDL)


def _query_fields(schema: GraphQLSchema) -> dict[str, GraphQLField]:
    if schema.query_type is None:  # pragma: no cover - the SDL defines Query
        raise RuntimeError("the GraphQL schema has no Query type")
    return dict(schema.query_type.fields)


QUERY_FIELDS = _query_fields(SCHEMA)


# -- the document checker (pure: no I/O) ----------------------------------------------------------


@dataclass
class CheckedOperation:
    """A request that passed :func:`check_document`: one query with one allowed root field."""

    document: DocumentNode
    operation: OperationDefinitionNode
    root: FieldNode
    # The root field's `input` argument, coerced against the schema (camelCase keys).
    input: dict[str, Any]
    # The variable that holds the whole `input`, or None when the client wrote it inline.
    input_variable: str | None

    @property
    def root_field(self) -> str:
        """The name of the one root field queried."""
        return self.root.name.value

    def forwarded_body(self, checked_input: dict[str, Any]) -> JsonObject:
        """The request sent upstream: the checked AST printed again, with ``checked_input`` as input.

        The input travels the way the client sent it (as its one variable, or inline), but it is the
        gateway's checked value either way; other client variables are not forwarded.
        """
        variables: dict[str, Any] = {}
        if self.input_variable is not None:
            variables[self.input_variable] = checked_input
        else:
            input_type = QUERY_FIELDS[self.root_field].args[INPUT_ARGUMENT].type
            value = ast_from_value(checked_input, input_type)
            if value is None:  # pragma: no cover - a coerced input always prints
                raise BadRequest("GraphQL input cannot be re-serialised")
            self.root.arguments = (ArgumentNode(name=NameNode(value=INPUT_ARGUMENT), value=value),)
        body: JsonObject = {"query": print_ast(self.document), "variables": variables}
        if self.operation.name is not None:
            body["operationName"] = self.operation.name.value
        return body


def check_document(query: object, variables: object = None, operation_name: object = None) -> CheckedOperation:
    """Parse and check a GraphQL request; 403 for what the gateway refuses, 400 for what is malformed."""
    if not isinstance(query, str) or not query.strip():
        raise BadRequest("Missing value for required parameter 'query'.")
    if variables is None:
        variables = {}
    if not isinstance(variables, dict):
        raise BadRequest("GraphQL 'variables' must be a JSON object")
    if operation_name is not None and not isinstance(operation_name, str):
        raise BadRequest("GraphQL 'operationName' must be a string")
    try:
        document = parse(query, no_location=True, max_tokens=MAX_TOKENS)
    except GraphQLError as error:
        raise BadRequest(f"Invalid GraphQL document: {error.message}") from None
    operation = _single_query(document, operation_name)
    root = _root_field(operation.selection_set)
    _check_selections(root.selection_set)
    errors = validate(SCHEMA, document)
    if errors:
        raise BadRequest(f"Invalid GraphQL document: {errors[0].message}")
    input_variable = _input_variable(root, operation)
    coerced = get_variable_values(SCHEMA, operation.variable_definitions, variables)
    if isinstance(coerced, list):
        raise BadRequest(f"Invalid GraphQL variables: {coerced[0].message}")
    field = QUERY_FIELDS[root.name.value]
    value = get_argument_values(field, root, coerced).get(INPUT_ARGUMENT)
    if not isinstance(value, dict):
        raise BadRequest(f"GraphQL field '{root.name.value}' needs its '{INPUT_ARGUMENT}' argument")
    return CheckedOperation(document, operation, root, value, input_variable)


def _single_query(document: DocumentNode, operation_name: str | None) -> OperationDefinitionNode:
    """The document's one operation; it must be a query with no directive but ``@component``."""
    if any(isinstance(definition, FragmentDefinitionNode) for definition in document.definitions):
        raise BadRequest("GraphQL fragments are not allowed by the gateway")
    operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    if len(document.definitions) != 1 or len(operations) != 1:
        raise BadRequest("A GraphQL request through the gateway must hold exactly one operation")
    operation = operations[0]
    if operation.operation is not OperationType.QUERY:
        raise PermissionDenied(f"GraphQL {operation.operation.value}s are not available through the gateway")
    name = operation.name.value if operation.name is not None else None
    if operation_name is not None and operation_name != name:
        raise BadRequest(f"Unknown GraphQL operation named '{operation_name}'")
    for directive in operation.directives:
        literal = all(isinstance(argument.value, StringValueNode) for argument in directive.arguments)
        if directive.name.value != OPERATION_DIRECTIVE or not literal:
            raise BadRequest(f"GraphQL directive '@{directive.name.value}' is not allowed by the gateway")
    for definition in operation.variable_definitions:
        if definition.directives:
            raise BadRequest("GraphQL directives on variables are not allowed by the gateway")
    return operation


def _root_field(selection_set: SelectionSetNode) -> FieldNode:
    """The one allowed root field (``__typename`` may be queried beside it)."""
    found: list[FieldNode] = []
    for selection in selection_set.selections:
        field = _plain_field(selection)
        name = field.name.value
        if name == TYPENAME:
            continue
        if name not in ROOT_FIELDS:
            raise PermissionDenied(f"GraphQL field '{name}' is not available through the gateway")
        found.append(field)
    if len(found) != 1:
        allowed = ", ".join(sorted(ROOT_FIELDS))
        raise BadRequest(f"A GraphQL request through the gateway must query exactly one of {allowed}")
    return found[0]


def _check_selections(selection_set: SelectionSetNode | None) -> None:
    """Below the root: plain fields only; a ``modelVersions`` selection must include ``name``."""
    if selection_set is None:
        return
    for selection in selection_set.selections:
        field = _plain_field(selection)
        if field.name.value == "modelVersions" and field.selection_set is not None:
            names = {_plain_field(child).name.value for child in field.selection_set.selections}
            if "name" not in names:
                raise BadRequest("GraphQL 'modelVersions' must select 'name' (the gateway filters on it)")
        _check_selections(field.selection_set)


def _plain_field(selection: object) -> FieldNode:
    """A field with no alias and no directive; fragments and introspection are refused."""
    if not isinstance(selection, FieldNode):
        raise BadRequest("GraphQL fragments are not allowed by the gateway")
    name = selection.name.value
    if name in INTROSPECTION_FIELDS:
        raise PermissionDenied("GraphQL introspection is disabled by the gateway")
    if selection.alias is not None:
        raise BadRequest(f"GraphQL aliases are not allowed by the gateway ('{selection.alias.value}: {name}')")
    if selection.directives:
        raise BadRequest(f"GraphQL directives on fields are not allowed by the gateway ('{name}')")
    return selection


def _input_variable(root: FieldNode, operation: OperationDefinitionNode) -> str | None:
    """The variable holding the root field's whole ``input``, or None for an input written inline.

    Variables may not appear inside an inline input: the checked value replaces the argument, so
    each id is checked and forwarded in exactly one place.
    """
    argument = next((arg for arg in root.arguments if arg.name.value == INPUT_ARGUMENT), None)
    if argument is None:
        raise BadRequest(f"GraphQL field '{root.name.value}' needs its '{INPUT_ARGUMENT}' argument")
    defined = [definition.variable.name.value for definition in operation.variable_definitions]
    if isinstance(argument.value, VariableNode):
        name = argument.value.name.value
        if defined != [name]:
            raise BadRequest(f"A GraphQL operation through the gateway may only define the variable ${name}")
        return name
    if defined or _contains_variable(argument.value):
        raise BadRequest(f"Pass GraphQL '{INPUT_ARGUMENT}' as one variable, or inline it without variables")
    return None


def _contains_variable(value: ValueNode) -> bool:
    if isinstance(value, VariableNode):
        return True
    if isinstance(value, ListValueNode):
        return any(_contains_variable(item) for item in value.values)
    if isinstance(value, ObjectValueNode):
        return any(_contains_variable(field.value) for field in value.fields)
    return False


# -- ownership of the ids in the input --------------------------------------------------------------


async def _owned_experiment(ex: Exchange, checked: dict[str, Any]) -> dict[str, Any]:
    """``mlflowGetExperiment``: ``experimentId`` owned (``0`` -> the tenant's Default)."""
    raw = checked.get("experimentId")
    if not isinstance(raw, str) or not raw:
        raise BadRequest("Missing value for required parameter 'experiment_id'.")
    ownership = ex.services.ownership
    experiment_id = await ownership.resolve_experiment_id(ex.tenant, raw)
    await ownership.require_experiment(ex.tenant, experiment_id)
    return {**checked, "experimentId": experiment_id}


async def _owned_run(ex: Exchange, checked: dict[str, Any]) -> dict[str, Any]:
    """``mlflowGetRun``: ``runId``/``runUuid`` (MLflow reads either) must agree and be owned."""
    given = {value for key in ("runId", "runUuid") if (value := checked.get(key)) not in (None, "")}
    if len(given) > 1:
        raise BadRequest("Fields run_id, run_uuid name different objects")
    run_id = next(iter(given), None)
    if not isinstance(run_id, str):
        raise BadRequest("Missing value for required parameter 'run_id'.")
    await ex.services.ownership.require_run(ex.tenant, run_id)
    return {"runId": run_id}


async def _owned_experiments(ex: Exchange, checked: dict[str, Any]) -> dict[str, Any]:
    """``mlflowSearchRuns``: every ``experimentIds`` entry owned; an unscoped search is refused."""
    ids = _id_list(checked, "experimentIds", "experiment_ids")
    ownership = ex.services.ownership
    resolved: list[str] = []
    for raw in ids:
        experiment_id = await ownership.resolve_experiment_id(ex.tenant, raw)
        await ownership.require_experiment(ex.tenant, experiment_id)
        resolved.append(experiment_id)
    return {**checked, "experimentIds": list(dict.fromkeys(resolved))}


async def _owned_runs(ex: Exchange, checked: dict[str, Any]) -> dict[str, Any]:
    """``mlflowGetMetricHistoryBulkInterval``: every ``runIds`` entry owned (at most 100, MLflow's cap)."""
    ids = list(dict.fromkeys(_id_list(checked, "runIds", "run_ids")))
    if len(ids) > MAX_IDS_PER_REQUEST:
        raise BadRequest(f"At most {MAX_IDS_PER_REQUEST} values of 'run_ids' are allowed")
    for run_id in ids:
        await ex.services.ownership.require_run(ex.tenant, run_id)
    return {**checked, "runIds": ids}


def _id_list(checked: dict[str, Any], key: str, shown: str) -> list[str]:
    ids = checked.get(key)
    if not isinstance(ids, list) or not ids:
        raise BadRequest(f"Missing value for required parameter '{shown}'.")
    if not all(isinstance(item, str) and item for item in ids):
        raise BadRequest(f"Every value of '{shown}' must be a non-empty string")
    return ids


_OWNERSHIP: dict[str, Callable[[Exchange, dict[str, Any]], Awaitable[dict[str, Any]]]] = {
    GET_EXPERIMENT: _owned_experiment,
    GET_RUN: _owned_run,
    SEARCH_RUNS: _owned_experiments,
    BULK_INTERVAL: _owned_runs,
}


async def check_graphql_request(ex: Exchange) -> None:
    """Check the GraphQL request and replace the body with its checked re-serialisation.

    Safe because the upstream only ever executes the document the gateway printed from an AST it
    walked in full, with inputs whose every id was checked; a query string is refused (MLflow's bulk
    metric resolver reads ``max_results``/``start_step``/``end_step`` from it).
    """
    if ex.query:
        raise BadRequest("A GraphQL request must not carry a query string")
    body = ex.json_body()
    unknown = sorted(set(body) - REQUEST_FIELDS)
    if unknown:
        raise BadRequest(f"Unsupported GraphQL request field '{unknown[0]}'")
    checked = check_document(body.get("query"), body.get("variables"), body.get("operation_name"))
    checked_input = await _OWNERSHIP[checked.root_field](ex, checked.input)
    ex.body = checked.forwarded_body(checked_input)
    ex.notes[NOTE_ROOT_FIELD] = checked.root_field


# -- the response ---------------------------------------------------------------------------------


def rewrite_graphql_response(ex: Exchange, status: int, body: JsonObject) -> None:
    """Strip tenant prefixes from a 2xx GraphQL response and drop other tenants' model versions.

    ``experiment.name`` must carry the caller's prefix (the ids were checked, so it does); one that
    does not is an alarm and the answer is "does not exist". Error strings lose the caller's prefix.
    """
    if status >= 300:
        return
    root = ex.notes.get(NOTE_ROOT_FIELD)
    data = body.get("data")
    payload = data.get(root) if isinstance(data, dict) and isinstance(root, str) else None
    if isinstance(payload, dict):
        if root == GET_EXPERIMENT:
            _strip_experiment(ex, payload.get("experiment"))
        elif root == GET_RUN:
            _rewrite_run(ex, payload.get("run"))
        elif root == SEARCH_RUNS:
            runs = payload.get("runs")
            for run in runs if isinstance(runs, list) else []:
                _rewrite_run(ex, run)
        api_error = payload.get("apiError")
        if isinstance(api_error, dict) and isinstance(api_error.get("message"), str):
            api_error["message"] = _strip_in_text(ex, api_error["message"])
    errors = body.get("errors")
    if isinstance(errors, list):
        body["errors"] = [_strip_error(ex, error) for error in errors]


def _rewrite_run(ex: Exchange, run: object) -> None:
    if not isinstance(run, dict):
        return
    _strip_experiment(ex, run.get("experiment"))
    versions = run.get("modelVersions")
    if isinstance(versions, list):
        prefix = registered_model_prefix(ex.tenant)
        kept: list[Any] = []
        for version in versions:
            name = version.get("name") if isinstance(version, dict) else None
            if isinstance(name, str) and name.startswith(prefix) and len(name) > len(prefix):
                kept.append({**version, "name": name[len(prefix) :]})
        run["modelVersions"] = kept


def _strip_experiment(ex: Exchange, experiment: object) -> None:
    if not isinstance(experiment, dict) or not isinstance(experiment.get("name"), str):
        return
    name: str = experiment["name"]
    prefix = experiment_prefix(ex.tenant)
    if not name.startswith(prefix):
        logger.error("GraphQL response named an experiment outside tenant %s (request id %s)", ex.tenant, ex.request_id)
        raise NotFound("Experiment does not exist")
    experiment["name"] = name[len(prefix) :]


def _strip_error(ex: Exchange, error: object) -> object:
    if isinstance(error, str):
        return _strip_in_text(ex, error)
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return {**error, "message": _strip_in_text(ex, error["message"])}
    return error


def _strip_in_text(ex: Exchange, text: str) -> str:
    """Remove the caller's own ``<tenant>/`` prefix where it starts a name in a message."""
    return re.sub(r"(?<![\w/.-])" + re.escape(experiment_prefix(ex.tenant)), "", text)


QUERY = Policy(
    request=(check_graphql_request,),
    response=(rewrite_graphql_response, strip_prefix_in_error),
    access=Access.READ,
    description="UI GraphQL: one of the UI's 4 queries; OE/OR on every id; names stripped, foreign versions dropped",
)
GET_DENIED = Deny(
    "GraphQL over GET is not supported: MLflow only reads a GET's query from a JSON body, which the gateway "
    "never forwards; send a POST"
)
