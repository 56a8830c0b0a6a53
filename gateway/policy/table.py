"""The route table: every route of MLflow 3.17 with its policy or an explicit deny and its reason.

Anything not in this table is refused (403 ``PERMISSION_DENIED``): MLflow grows endpoints every
release, and ``tests/unit/test_route_coverage.py`` compares this table with the installed MLflow's
own route list, so an upgrade cannot silently open a hole. The strategies are those of
``shared/mlflow-api.md`` §1; routes whose tenancy rules are not built yet are denied, not forwarded.
"""

from __future__ import annotations

from gateway import ui
from gateway.artifacts import routes as artifacts
from gateway.policy import datasets, experiments, graphql, logged_models, otlp, registry, runs, searches, traces
from gateway.policy.core import Access, Body, Deny, Local, Policy
from gateway.policy.router import B2, B3, J2, J3, ROOT, Route, RouteTable, api

# -- reasons ------------------------------------------------------------------------------------
DIRECT_CLOUD_ONLY = Deny("artifact roots are served by the gateway; use the mlflow-artifacts API")
PENDING_GENAI = Deny("GenAI evaluation objects are not tenant-scoped yet")
PROMPT_LINKS = Deny("linking traces to registered prompts waits for the prompt registry's tenancy")
WEBHOOKS = Deny("webhooks are server-global: they would fire on every tenant's registry events")
WORKSPACES = Deny("workspaces are managed by the platform, not by tenants")
AI_GATEWAY = Deny("the AI Gateway holds server-wide provider secrets and endpoints")
MCP = Deny("the MCP server registry is server-global")
ASSISTANT = Deny("the assistant runs agents and shell tools on the MLflow host")
DEMO = Deny("the demo experiment is shared by every tenant")
JOBS = Deny("server-side jobs take arbitrary parameters that bypass per-object checks")
TELEMETRY = Deny("UI telemetry is not forwarded")
LEGACY_PROXY = Deny("the legacy deployments proxy reaches a server-wide target")
NOT_IMPLEMENTED = Deny("MLflow does not implement this endpoint")

PUBLIC_STATIC = Policy(
    body=Body.NONE, access=Access.READ, authenticated=False, description="PUB: the open-source UI bundle"
)
PUBLIC_INFO = Policy(body=Body.NONE, access=Access.READ, description="PUB: capability probe")
HEALTH = Local("health")
READY = Local("ready")
# The gateway's own Prometheus metrics, answered by gateway.observability.ObservabilityMiddleware
# before authentication (its own token or network); the upstream's metrics are never forwarded.
METRICS = Local("metrics")
# Answered by gateway.ui.UiMiddleware before the route table; listed so the table names every path.
UI_PAGE = Local("ui-page")


def _deny(prefixes: tuple[str, ...], reason: Deny, *rows: tuple[str, str]) -> list[Route]:
    return [route for method, path in rows for route in api(method, prefixes, path, reason)]


_GATEWAY_CONFIG = [
    (method, f"/mlflow/gateway/{path}")
    for method, path in [
        ("POST", "budgets/create"), ("DELETE", "budgets/delete"), ("GET", "budgets/get"),
        ("GET", "budgets/list"), ("POST", "budgets/update"), ("GET", "budgets/windows"),
        ("POST", "endpoints/bindings/create"), ("DELETE", "endpoints/bindings/delete"),
        ("GET", "endpoints/bindings/list"), ("POST", "endpoints/create"), ("DELETE", "endpoints/delete"),
        ("DELETE", "endpoints/delete-tag"), ("GET", "endpoints/get"), ("GET", "endpoints/list"),
        ("POST", "endpoints/models/attach"), ("POST", "endpoints/models/detach"),
        ("POST", "endpoints/set-tag"), ("POST", "endpoints/update"),
        ("POST", "guardrails/add-to-endpoint"), ("POST", "guardrails/create"),
        ("DELETE", "guardrails/delete"), ("GET", "guardrails/get"), ("GET", "guardrails/list"),
        ("GET", "guardrails/list-for-endpoint"), ("DELETE", "guardrails/remove-from-endpoint"),
        ("PATCH", "guardrails/update-config"), ("POST", "model-definitions/create"),
        ("DELETE", "model-definitions/delete"), ("GET", "model-definitions/get"),
        ("GET", "model-definitions/list"), ("POST", "model-definitions/update"),
        ("POST", "secrets/create"), ("DELETE", "secrets/delete"), ("GET", "secrets/get"),
        ("GET", "secrets/list"), ("POST", "secrets/update"),
    ]
]  # fmt: skip

_MCP = [
    ("GET", "/mlflow/mcp-servers"), ("POST", "/mlflow/mcp-servers"), ("GET", "/mlflow/mcp-servers/endpoints"),
    ("DELETE", "/mlflow/mcp-servers/{name:path}"), ("GET", "/mlflow/mcp-servers/{name:path}"),
    ("PATCH", "/mlflow/mcp-servers/{name:path}"), ("POST", "/mlflow/mcp-servers/{name:path}/aliases"),
    ("DELETE", "/mlflow/mcp-servers/{name:path}/aliases/{alias:path}"),
    ("GET", "/mlflow/mcp-servers/{name:path}/aliases/{alias:path}"),
    ("GET", "/mlflow/mcp-servers/{name:path}/endpoints"), ("POST", "/mlflow/mcp-servers/{name:path}/endpoints"),
    ("DELETE", "/mlflow/mcp-servers/{name:path}/endpoints/{endpoint_id}"),
    ("GET", "/mlflow/mcp-servers/{name:path}/endpoints/{endpoint_id}"),
    ("PATCH", "/mlflow/mcp-servers/{name:path}/endpoints/{endpoint_id}"),
    ("POST", "/mlflow/mcp-servers/{name:path}/tags"), ("DELETE", "/mlflow/mcp-servers/{name:path}/tags/{key:path}"),
    ("GET", "/mlflow/mcp-servers/{name:path}/versions"), ("POST", "/mlflow/mcp-servers/{name:path}/versions"),
    ("DELETE", "/mlflow/mcp-servers/{name:path}/versions/{version:path}"),
    ("GET", "/mlflow/mcp-servers/{name:path}/versions/{version:path}"),
    ("PATCH", "/mlflow/mcp-servers/{name:path}/versions/{version:path}"),
    ("POST", "/mlflow/mcp-servers/{name:path}/versions/{version:path}/tags"),
    ("DELETE", "/mlflow/mcp-servers/{name:path}/versions/{version:path}/tags/{key:path}"),
]  # fmt: skip

_ASSISTANT = [
    ("GET", "/mlflow/assistant/config"), ("PUT", "/mlflow/assistant/config"), ("POST", "/mlflow/assistant/message"),
    ("GET", "/mlflow/assistant/providers"), ("GET", "/mlflow/assistant/providers/{provider}/health"),
    ("GET", "/mlflow/assistant/providers/{provider}/models"), ("PATCH", "/mlflow/assistant/sessions/{session_id}"),
    ("POST", "/mlflow/assistant/sessions/{session_id}/permission"),
    ("GET", "/mlflow/assistant/sessions/{session_id}/stream"),
    ("POST", "/mlflow/assistant/sessions/{session_id}/tool-result"), ("POST", "/mlflow/assistant/skills/install"),
]  # fmt: skip

_AI_GATEWAY_INVOCATIONS = [
    ("POST", "/gateway/anthropic/v1/messages"),
    ("POST", "/gateway/gemini/v1beta/models/{endpoint_name}:generateContent"),
    ("POST", "/gateway/gemini/v1beta/models/{endpoint_name}:streamGenerateContent"),
    ("POST", "/gateway/mlflow/v1/chat/completions"), ("GET", "/gateway/mlflow/v1/models"),
    ("POST", "/gateway/openai/v1/chat/completions"), ("POST", "/gateway/openai/v1/embeddings"),
    ("POST", "/gateway/openai/v1/responses"), ("POST", "/gateway/openai/v1/responses/compact"),
    ("POST", "/gateway/proxy/{endpoint_name}/{path:path}"), ("POST", "/gateway/typesafe/v1/systemone"),
    ("POST", "/gateway/{endpoint_name}/mlflow/invocations"),
]  # fmt: skip

ROUTES: list[Route] = [
    # -- served by the gateway itself, or public --------------------------------------------------
    *api("GET", ROOT, "/health", HEALTH),
    *api("GET", ROOT, "/ready", READY),
    *api("GET", ROOT, "/version", PUBLIC_INFO),
    *api("GET", B3, "/mlflow/server-info", artifacts.SERVER_INFO),
    *api("GET", ROOT, "/static-files/{path:path}", PUBLIC_STATIC),
    *api("GET", ROOT, "/build/{path:path}", PUBLIC_STATIC),
    *api("GET", ROOT, "/", ui.INDEX),
    *api("GET", ROOT, "/login", UI_PAGE),
    *api("POST", ROOT, "/login", UI_PAGE),
    *api("POST", ROOT, "/logout", UI_PAGE),
    *api("GET", J3, "/mlflow/ui-telemetry", ui.TELEMETRY_CONFIG),
    *api("POST", J3, "/mlflow/ui-telemetry", TELEMETRY),
    *api("GET", ROOT, "/graphql", graphql.GET_DENIED),
    *api("POST", ROOT, "/graphql", graphql.QUERY),
    *api("GET", ROOT, "/metrics", METRICS),
    # -- experiments ---------------------------------------------------------------------------
    *api("POST", B2, "/mlflow/experiments/create", experiments.CREATE),
    *api("GET", B2, "/mlflow/experiments/get-by-name", experiments.GET_BY_NAME),
    *api("GET", B2, "/mlflow/experiments/get", experiments.GET),
    *api("POST", B2, "/mlflow/experiments/delete", experiments.DELETE_OR_RESTORE),
    *api("POST", B2, "/mlflow/experiments/restore", experiments.DELETE_OR_RESTORE),
    *api("POST", B2, "/mlflow/experiments/update", experiments.UPDATE),
    *api("POST", B2, "/mlflow/experiments/set-experiment-tag", experiments.SET_OR_DELETE_TAG),
    *api("POST", B2, "/mlflow/experiments/delete-experiment-tag", experiments.SET_OR_DELETE_TAG),
    *api("GET", B2, "/mlflow/experiments/search", searches.SEARCH_EXPERIMENTS_GET),
    *api("POST", B2, "/mlflow/experiments/search", searches.SEARCH_EXPERIMENTS_POST),
    *api("POST", J2, "/mlflow/experiments/search-datasets", searches.SEARCH_DATASETS),
    # The proto path of SearchDatasets lacks a "/" (`/api/2.0mlflow/...`): MLflow answers 404.
    Route("POST", "/api/2.0mlflow/experiments/search-datasets", NOT_IMPLEMENTED),
    Route("POST", "/ajax-api/2.0mlflow/experiments/search-datasets", NOT_IMPLEMENTED),
    # -- runs, metrics, params ------------------------------------------------------------------
    *api("POST", B2, "/mlflow/runs/create", runs.CREATE),
    *api("GET", B2, "/mlflow/runs/get", runs.READ),
    *api("POST", B2, "/mlflow/runs/update", runs.WRITE),
    *api("POST", B2, "/mlflow/runs/delete", runs.WRITE),
    *api("POST", B2, "/mlflow/runs/restore", runs.WRITE),
    *api("POST", B2, "/mlflow/runs/log-metric", runs.LOG_METRIC),
    *api("POST", B2, "/mlflow/runs/log-parameter", runs.WRITE),
    *api("POST", B2, "/mlflow/runs/set-tag", runs.SET_OR_DELETE_TAG),
    *api("POST", B2, "/mlflow/runs/delete-tag", runs.SET_OR_DELETE_TAG),
    *api("POST", B2, "/mlflow/runs/log-batch", runs.LOG_BATCH),
    *api("POST", B2, "/mlflow/runs/log-model", runs.WRITE),
    *api("POST", B2, "/mlflow/runs/log-inputs", runs.LOG_INPUTS),
    *api("POST", B2, "/mlflow/runs/outputs", runs.LOG_INPUTS),
    *api("POST", B2, "/mlflow/runs/search", searches.SEARCH_RUNS),
    *api("GET", B2, "/mlflow/metrics/get-history", runs.READ),
    *api("GET", B2, "/mlflow/metrics/get-history-bulk-interval", runs.BULK_HISTORY_INTERVAL),
    *api("GET", J2, "/mlflow/metrics/get-history-bulk", runs.BULK_HISTORY),
    *api("POST", J2, "/mlflow/runs/create-promptlab-run", searches.PROMPTLAB_RUN),
    # -- run-level artifacts and the mlflow-artifacts service ------------------------------------
    # Served by the gateway itself from S3 (gateway/artifacts): bytes never pass through MLflow.
    *api("GET", B2, "/mlflow/artifacts/list", artifacts.RUN_LIST),
    *api("POST", B2, "/mlflow/artifacts/presigned-upload-url", DIRECT_CLOUD_ONLY),
    *api("POST", B2, "/mlflow/artifacts/presigned-download-url", DIRECT_CLOUD_ONLY),
    *api("GET", ROOT, "/get-artifact", artifacts.RUN_GET),
    *api("POST", J2, "/mlflow/upload-artifact", artifacts.UI_UPLOAD),
    *api("GET", B2, "/mlflow-artifacts/artifacts", artifacts.LIST),
    *api("GET", B2, "/mlflow-artifacts/artifacts/{artifact_path:path}", artifacts.DOWNLOAD),
    *api("PUT", B2, "/mlflow-artifacts/artifacts/{artifact_path:path}", artifacts.UPLOAD),
    *api("DELETE", B2, "/mlflow-artifacts/artifacts/{artifact_path:path}", artifacts.DELETE),
    *api("POST", B2, "/mlflow-artifacts/mpu/create/{artifact_path:path}", artifacts.MPU_CREATE),
    *api("POST", B2, "/mlflow-artifacts/mpu/complete/{artifact_path:path}", artifacts.MPU_COMPLETE),
    *api("POST", B2, "/mlflow-artifacts/mpu/abort/{artifact_path:path}", artifacts.MPU_ABORT),
    *api("GET", B2, "/mlflow-artifacts/presigned/{artifact_path:path}", artifacts.PRESIGNED_DOWNLOAD),
    # -- logged models ---------------------------------------------------------------------------
    *api("POST", B2, "/mlflow/logged-models", logged_models.CREATE),
    *api("GET", B2, "/mlflow/logged-models/{model_id}", logged_models.GET),
    *api("PATCH", B2, "/mlflow/logged-models/{model_id}", logged_models.FINALIZE),
    *api("DELETE", B2, "/mlflow/logged-models/{model_id}", logged_models.DELETE),
    *api("POST", B2, "/mlflow/logged-models/search", logged_models.SEARCH),
    *api("PATCH", B2, "/mlflow/logged-models/{model_id}/tags", logged_models.SET_TAGS),
    *api("DELETE", B2, "/mlflow/logged-models/{model_id}/tags/{tag_key}", logged_models.DELETE_TAG),
    *api("POST", B2, "/mlflow/logged-models/{model_id}/params", logged_models.LOG_PARAMS),
    *api("GET", B2, "/mlflow/logged-models/{model_id}/artifacts/directories", logged_models.LIST_ARTIFACTS),
    *api("GET", J2, "/mlflow/logged-models/{model_id}/artifacts/files", artifacts.LOGGED_MODEL_GET),
    # -- model registry and prompts --------------------------------------------------------------
    *api("POST", B2, "/mlflow/registered-models/create", registry.CREATE_MODEL),
    *api("POST", B2, "/mlflow/registered-models/rename", registry.RENAME_MODEL),
    *api("PATCH", B2, "/mlflow/registered-models/update", registry.UPDATE_MODEL),
    *api("DELETE", B2, "/mlflow/registered-models/delete", registry.DELETE_MODEL),
    *api("GET", B2, "/mlflow/registered-models/get", registry.READ_MODEL),
    *api("GET", B2, "/mlflow/registered-models/search", registry.SEARCH_MODELS),
    *api("GET", B2, "/mlflow/registered-models/get-latest-versions", registry.READ_MODEL),
    *api("POST", B2, "/mlflow/registered-models/get-latest-versions", registry.READ_MODEL_POST),
    *api("POST", B2, "/mlflow/registered-models/alias", registry.WRITE_MODEL),
    *api("DELETE", B2, "/mlflow/registered-models/alias", registry.DELETE_ALIAS),
    *api("GET", B2, "/mlflow/registered-models/alias", registry.READ_MODEL),
    *api("POST", B2, "/mlflow/registered-models/set-tag", registry.MODEL_TAG),
    *api("DELETE", B2, "/mlflow/registered-models/delete-tag", registry.MODEL_TAG),
    *api("POST", B2, "/mlflow/model-versions/create", registry.CREATE_VERSION),
    *api("PATCH", B2, "/mlflow/model-versions/update", registry.WRITE_VERSION),
    *api("POST", B2, "/mlflow/model-versions/transition-stage", registry.WRITE_VERSION),
    *api("DELETE", B2, "/mlflow/model-versions/delete", registry.DELETE_VERSION),
    *api("GET", B2, "/mlflow/model-versions/get", registry.READ_VERSION),
    *api("GET", B2, "/mlflow/model-versions/search", registry.SEARCH_VERSIONS),
    *api("GET", B2, "/mlflow/model-versions/get-download-uri", registry.DOWNLOAD_URI),
    *api("POST", B2, "/mlflow/model-versions/set-tag", registry.VERSION_TAG),
    *api("DELETE", B2, "/mlflow/model-versions/delete-tag", registry.VERSION_TAG),
    *api("GET", ROOT, "/model-versions/get-artifact", registry.GET_ARTIFACT),
    *_deny(B2, WEBHOOKS, ("GET", "/mlflow/webhooks"), ("POST", "/mlflow/webhooks")),
    *_deny(
        B2,
        WEBHOOKS,
        ("GET", "/mlflow/webhooks/{webhook_id}"),
        ("PATCH", "/mlflow/webhooks/{webhook_id}"),
        ("DELETE", "/mlflow/webhooks/{webhook_id}"),
        ("POST", "/mlflow/webhooks/{webhook_id}/test"),
    ),
    # -- traces, assessments, OTLP ---------------------------------------------------------------
    # legacy v2 (MLflow picks v2 request ids; a path id must be `tr-<hex>` or 32 hex: router.PARAM_PATTERNS)
    *api("POST", B2, "/mlflow/traces", traces.START_V2),
    *api("PATCH", B2, "/mlflow/traces/{request_id}", traces.END_V2),
    *api("GET", B2, "/mlflow/traces/{request_id}/info", traces.GET_INFO_V2),
    *api("GET", B2, "/mlflow/traces", traces.SEARCH_V2),
    *api("PATCH", B2, "/mlflow/traces/{request_id}/tags", traces.SET_TAG_V2),
    *api("DELETE", B2, "/mlflow/traces/{request_id}/tags", traces.DELETE_TAG_V2),
    *api("POST", B2, "/mlflow/traces/delete-traces", traces.DELETE_TRACES),
    *api("POST", B2, "/mlflow/traces/link-to-run", traces.LINK_TO_RUN),
    *api("POST", B2, "/mlflow/traces/link-prompts", PROMPT_LINKS),
    # v3
    *api("POST", B3, "/mlflow/traces", traces.START_V3),
    *api("GET", B3, "/mlflow/traces/{trace_id}", traces.GET_INFO_V3),
    *api("GET", B3, "/mlflow/traces/get", traces.GET_TRACE),
    *api("GET", B3, "/mlflow/traces/batchGet", traces.BATCH_GET),
    *api("POST", B3, "/mlflow/traces/batchGetInfos", traces.BATCH_GET_INFOS),
    *api("POST", B3, "/mlflow/traces/search", traces.SEARCH_V3),
    *api("POST", B3, "/mlflow/traces/delete-traces", traces.DELETE_TRACES),
    *api("POST", B3, "/mlflow/traces/calculate-filter-correlation", traces.EXPERIMENT_QUERY),
    *api("POST", B3, "/mlflow/traces/metrics", traces.EXPERIMENT_QUERY),
    *api("PATCH", B3, "/mlflow/traces/{trace_id}/tags", traces.SET_TAG_V3),
    *api("DELETE", B3, "/mlflow/traces/{trace_id}/tags", traces.DELETE_TAG_V3),
    *api("POST", B3, "/mlflow/traces/{trace_id}/assessments", traces.CREATE_ASSESSMENT),
    *api("GET", B3, "/mlflow/traces/{trace_id}/assessments/{assessment_id}", traces.GET_ASSESSMENT),
    *api("PATCH", B3, "/mlflow/traces/{trace_id}/assessments/{assessment_id}", traces.UPDATE_ASSESSMENT),
    *api("DELETE", B3, "/mlflow/traces/{trace_id}/assessments/{assessment_id}", traces.DELETE_ASSESSMENT),
    *api("GET", J2, "/mlflow/get-trace-artifact", traces.TRACE_ARTIFACT),
    *api("GET", J3, "/mlflow/get-trace-artifact", traces.TRACE_ARTIFACT),
    *api("POST", ROOT, "/v1/traces", otlp.OTLP_EXPORT),
    # -- GenAI: evaluation datasets --------------------------------------------------------------
    *api("POST", B3, "/mlflow/datasets/create", datasets.CREATE),
    *api("GET", B3, "/mlflow/datasets/search", datasets.SEARCH_GET),
    *api("POST", B3, "/mlflow/datasets/search", datasets.SEARCH_POST),
    *api("GET", B3, "/mlflow/datasets/{dataset_id}", datasets.GET),
    *api("DELETE", B3, "/mlflow/datasets/{dataset_id}", datasets.DELETE),
    *api("PATCH", B3, "/mlflow/datasets/{dataset_id}/tags", datasets.SET_TAGS),
    *api("DELETE", B3, "/mlflow/datasets/{dataset_id}/tags/{key}", datasets.DELETE_TAG),
    *api("POST", B3, "/mlflow/datasets/{dataset_id}/records", datasets.UPSERT_RECORDS),
    *api("GET", B3, "/mlflow/datasets/{dataset_id}/records", datasets.GET_RECORDS),
    *api("DELETE", B3, "/mlflow/datasets/{dataset_id}/records", datasets.DELETE_RECORDS),
    *api("GET", B3, "/mlflow/datasets/{dataset_id}/experiment-ids", datasets.GET_EXPERIMENT_IDS),
    *api("POST", B3, "/mlflow/datasets/{dataset_id}/add-experiments", datasets.ADD_EXPERIMENTS),
    *api("POST", B3, "/mlflow/datasets/{dataset_id}/remove-experiments", datasets.REMOVE_EXPERIMENTS),
    # -- GenAI: scorers, issues, label schemas, review queues, prompt optimisation ----------------
    *_deny(
        B3,
        PENDING_GENAI,
        ("POST", "/mlflow/scorers/register"),
        ("GET", "/mlflow/scorers/list"),
        ("GET", "/mlflow/scorers/versions"),
        ("GET", "/mlflow/scorers/get"),
        ("DELETE", "/mlflow/scorers/delete"),
        ("GET", "/mlflow/scorers/online-configs"),
        ("PUT", "/mlflow/scorers/online-config"),
        ("POST", "/mlflow/issues"),
        ("GET", "/mlflow/issues/{issue_id}"),
        ("PATCH", "/mlflow/issues/{issue_id}"),
        ("POST", "/mlflow/issues/search"),
        ("POST", "/mlflow/label-schemas/create"),
        ("GET", "/mlflow/label-schemas/get"),
        ("GET", "/mlflow/label-schemas/get-by-name"),
        ("GET", "/mlflow/label-schemas/list"),
        ("PATCH", "/mlflow/label-schemas/update"),
        ("DELETE", "/mlflow/label-schemas/delete"),
        ("POST", "/mlflow/review-queues/create"),
        ("POST", "/mlflow/review-queues/get-or-create-user"),
        ("GET", "/mlflow/review-queues/get"),
        ("GET", "/mlflow/review-queues/get-by-name"),
        ("GET", "/mlflow/review-queues/list"),
        ("POST", "/mlflow/review-queues/update"),
        ("POST", "/mlflow/review-queues/delete"),
        ("POST", "/mlflow/review-queues/items/add"),
        ("POST", "/mlflow/review-queues/items/remove"),
        ("GET", "/mlflow/review-queues/items/list"),
        ("POST", "/mlflow/review-queues/items/set-status"),
        ("POST", "/mlflow/prompt-optimization/jobs"),
        ("GET", "/mlflow/prompt-optimization/jobs/{job_id}"),
        ("DELETE", "/mlflow/prompt-optimization/jobs/{job_id}"),
        ("POST", "/mlflow/prompt-optimization/jobs/{job_id}/cancel"),
        ("GET", "/mlflow/prompt-optimization/jobs/search"),
        ("POST", "/mlflow/prompt-optimization/jobs/search"),
    ),
    *_deny(
        J3,
        JOBS,
        ("POST", "/mlflow/scorer/invoke"),
        ("POST", "/mlflow/issues/invoke"),
        ("POST", "/mlflow/genai/evaluate/invoke"),
        ("GET", "/mlflow/jobs/{job_id}"),
        ("PATCH", "/mlflow/jobs/cancel/{job_id}"),
        ("POST", "/jobs/"),
        ("POST", "/jobs/search"),
        ("GET", "/jobs/{job_id}"),
        ("PATCH", "/jobs/cancel/{job_id}"),
    ),
    # -- server-global features --------------------------------------------------------------------
    *_deny(B3, AI_GATEWAY, *_GATEWAY_CONFIG),
    *_deny(
        J3,
        AI_GATEWAY,
        ("GET", "/mlflow/gateway/provider-config"),
        ("GET", "/mlflow/gateway/secrets/config"),
        ("GET", "/mlflow/gateway/supported-models"),
        ("GET", "/mlflow/gateway/supported-providers"),
    ),
    *_deny(ROOT, AI_GATEWAY, *_AI_GATEWAY_INVOCATIONS),
    *_deny(J2, LEGACY_PROXY, ("GET", "/mlflow/gateway-proxy"), ("POST", "/mlflow/gateway-proxy")),
    *_deny(B3, MCP, *_MCP),
    *_deny(J3, ASSISTANT, *_ASSISTANT),
    *_deny(J3, DEMO, ("POST", "/mlflow/demo/generate"), ("POST", "/mlflow/demo/delete")),
    *_deny(
        B3,
        WORKSPACES,
        ("GET", "/mlflow/workspaces"),
        ("POST", "/mlflow/workspaces"),
        ("GET", "/mlflow/workspaces/{workspace_name}"),
        ("PATCH", "/mlflow/workspaces/{workspace_name}"),
        ("DELETE", "/mlflow/workspaces/{workspace_name}"),
    ),
    *_deny(
        B2,
        NOT_IMPLEMENTED,
        ("GET", "/mlflow/unified-traces"),
        ("GET", "/mlflow/get-online-trace-details"),
    ),
]

TABLE = RouteTable(ROUTES)
