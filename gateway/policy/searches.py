"""Searches: experiment search scoped by a rewritten filter, run search with a canonical filter.

* ``experiments/search`` (GET and POST): MLflow lists every tenant's experiments. The client's
  filter is parsed (:mod:`gateway.policy.filters`), its ``name`` literals are prefixed with
  ``<tenant>/``, and ``AND name LIKE '<tenant>/%'`` is appended, so the *upstream* query returns the
  tenant's experiments only: page sizes, offsets and page tokens work exactly as upstream, nothing
  is dropped from a page. Names are stripped in the response and every listed id primes the
  ownership cache.
* ``runs/search``: isolation comes from ``experiment_ids`` (each must be owned); the filter and
  ``order_by`` are still parsed and forwarded in canonical form, so MLflow only ever reads a filter
  the gateway understood.
* ``experiments/search-datasets`` (UI only): every experiment id must be owned.
* ``runs/create-promptlab-run`` (UI only) stays denied: see :data:`PROMPTLAB_RUN`.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from gateway.errors import BadRequest, NotFound
from gateway.http.canonical import JsonObject, single_value
from gateway.policy import filters
from gateway.policy.core import Access, Body, Deny, Exchange, Policy, RequestStep
from gateway.policy.experiments import experiment_prefix, strip_experiment_names, strip_prefix_in_error
from gateway.policy.filters import EXPERIMENTS, RUNS
from gateway.policy.ownership import EXPERIMENT_SEPARATOR
from gateway.policy.runs import require_owned_experiments

logger = logging.getLogger("gateway.searches")

# The request fields MLflow reads (protos SearchExperiments / SearchRuns / SearchDatasets); the
# gateway forwards these and nothing else.
EXPERIMENT_SEARCH_FIELDS = ("filter", "max_results", "page_token", "order_by", "view_type")
RUN_SEARCH_FIELDS = ("experiment_ids", "filter", "run_view_type", "max_results", "order_by", "page_token")
REPEATED_FIELDS = frozenset({"order_by", "experiment_ids"})
MAX_RUN_SEARCH_RESULTS = 50_000  # handlers._search_runs
MAX_DATASET_SEARCH_EXPERIMENTS = 20  # handlers.search_datasets_impl
_INTLIKE = re.compile(r"-?[0-9]{1,19}")


def _request_fields(ex: Exchange, names: tuple[str, ...]) -> dict[str, Any]:
    """The search fields of the request (query for GET, JSON body for POST); other fields are dropped.

    MLflow ignores unknown fields, and for GET reads only the snake_case names: forwarding just the
    fields the gateway checked changes nothing MLflow would do, and leaves nothing unchecked.
    """
    fields: dict[str, Any] = {}
    if ex.body is None:
        for name in names:
            if name in REPEATED_FIELDS:
                if name in ex.query:
                    fields[name] = list(ex.query[name])
            else:
                value = single_value(ex.query, name)
                if value is not None:
                    fields[name] = value
    else:
        for name in names:
            if ex.body.get(name) is not None:
                fields[name] = ex.body[name]
    return fields


def _write_fields(ex: Exchange, fields: dict[str, Any]) -> None:
    """Replace the request's search fields with the checked ones (a POST forwards no query string)."""
    if ex.body is None:
        ex.query = {name: list(value) if isinstance(value, list) else [str(value)] for name, value in fields.items()}
    else:
        ex.body = dict(fields)
        ex.query = {}


def _check_string(fields: dict[str, Any], name: str) -> None:
    if name in fields and not isinstance(fields[name], str):
        raise BadRequest(f"Field '{name}' must be a string")


def _check_intlike(fields: dict[str, Any], name: str) -> int | None:
    """MLflow's ``_assert_intlike``: an integer, or a string holding one (forwarded as given)."""
    if name not in fields:
        return None
    value = fields[name]
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _INTLIKE.fullmatch(value):
        return int(value)
    raise BadRequest(f"Field '{name}' must be an integer")


def _check_view_type(fields: dict[str, Any], name: str) -> None:
    value = fields.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, str | int)):
        raise BadRequest(f"Field '{name}' must be a view type")


# -- experiments/search ------------------------------------------------------------------------------


async def scope_experiment_search(ex: Exchange) -> None:
    """Restrict an experiment search to the caller's experiments, upstream (works for GET and POST).

    Rewrites ``filter`` into its canonical form with every ``name`` literal prefixed by
    ``<tenant>/`` and ``AND name LIKE '<tenant>/%'`` appended (:func:`filters.scope_experiment_filter`).
    Safe because the forwarded filter is serialised by the gateway from parsed comparisons, never
    spliced from client text, and the appended clause alone already excludes every other tenant and
    MLflow's shared Default experiment (``Default`` has no prefix). ``order_by`` entries are
    validated and re-serialised; ``max_results``, ``page_token`` and ``view_type`` pass unchanged
    (offset page tokens carry no identity: a forged one only moves within the scoped result).
    """
    fields = _request_fields(ex, EXPERIMENT_SEARCH_FIELDS)
    filter_text = fields.get("filter", "")
    if not isinstance(filter_text, str):
        raise BadRequest("Field 'filter' must be a string")
    fields["filter"] = filters.scope_experiment_filter(filter_text, ex.tenant, EXPERIMENT_SEPARATOR)
    if "order_by" in fields:
        fields["order_by"] = filters.canonical_order_by(fields["order_by"], EXPERIMENTS)
    _check_intlike(fields, "max_results")
    _check_string(fields, "page_token")
    _check_view_type(fields, "view_type")
    _write_fields(ex, fields)


def remember_listed_experiments(ex: Exchange, status: int, body: JsonObject) -> None:
    """Prime the experiment -> tenant cache from a search page, after checking it is all the caller's.

    The scoped filter guarantees every listed experiment carries the caller's prefix; one that does
    not means the upstream ignored the filter: that is logged as an alarm and the page is refused
    (answered like a missing experiment), never passed on.
    """
    if status >= 300:
        return
    listed = body.get("experiments", [])
    if not isinstance(listed, list):
        return
    prefix = experiment_prefix(ex.tenant)
    owned: list[str] = []
    for experiment in listed:
        name = experiment.get("name") if isinstance(experiment, dict) else None
        experiment_id = experiment.get("experiment_id") if isinstance(experiment, dict) else None
        if not isinstance(name, str) or not name.startswith(prefix) or not isinstance(experiment_id, str):
            logger.error(
                "ALARM: experiment search for tenant %r returned an experiment outside its scope (request id %s)",
                ex.tenant,
                ex.request_id,
            )
            raise NotFound("Experiment does not exist")
        owned.append(experiment_id)
    for experiment_id in owned:
        ex.services.ownership.remember_experiment(experiment_id, ex.tenant)


_EXPERIMENT_SEARCH_RESPONSE = (
    remember_listed_experiments,
    strip_experiment_names("experiments[]"),
    strip_prefix_in_error,
)
SEARCH_EXPERIMENTS_GET = Policy(
    request=(scope_experiment_search,),
    response=_EXPERIMENT_SEARCH_RESPONSE,
    body=Body.NONE,
    access=Access.READ,
    description="SR: name literals prefixed, AND name LIKE '<tenant>/%' appended; names stripped",
)
SEARCH_EXPERIMENTS_POST = Policy(
    request=(scope_experiment_search,),
    response=_EXPERIMENT_SEARCH_RESPONSE,
    access=Access.READ,
    description="SR: name literals prefixed, AND name LIKE '<tenant>/%' appended; names stripped",
)


# -- runs/search -------------------------------------------------------------------------------------


async def canonicalise_run_search(ex: Exchange) -> None:
    """Parse the run-search ``filter`` and ``order_by`` and forward them in canonical form.

    Tenant isolation of a run search comes from ``experiment_ids`` (checked by the next step; the
    filter has no key that reaches another experiment). The filter is still parsed with MLflow's
    grammar and re-serialised, so MLflow only ever evaluates a filter the gateway understood;
    anything else is a 400. ``max_results`` must be within MLflow's 1..50000.
    """
    fields = _request_fields(ex, RUN_SEARCH_FIELDS)
    if "filter" in fields:
        if not isinstance(fields["filter"], str):
            raise BadRequest("Field 'filter' must be a string")
        canonical = filters.canonical_filter(fields["filter"], RUNS)
        if canonical:
            fields["filter"] = canonical
        else:
            del fields["filter"]
    if "order_by" in fields:
        fields["order_by"] = filters.canonical_order_by(fields["order_by"], RUNS)
    max_results = _check_intlike(fields, "max_results")
    if max_results is not None:
        if not 1 <= max_results <= MAX_RUN_SEARCH_RESULTS:
            raise BadRequest(
                f"Invalid value {max_results} for parameter 'max_results' supplied. It must be between 1 "
                f"and {MAX_RUN_SEARCH_RESULTS}"
            )
        fields["max_results"] = max_results
    _check_string(fields, "page_token")
    _check_view_type(fields, "run_view_type")
    _write_fields(ex, fields)


SEARCH_RUNS = Policy(
    request=(canonicalise_run_search, require_owned_experiments("experiment_ids")),
    access=Access.READ,
    description="OE on every experiment id; filter and order_by parsed and forwarded canonically",
)


# -- experiments/search-datasets (UI) ----------------------------------------------------------------


def limit_experiment_ids(field: str, maximum: int) -> RequestStep:
    """Require 1..``maximum`` ids in ``field`` (MLflow's own bounds and messages) and forward only them."""

    async def step(ex: Exchange) -> None:
        ids = ex.json_body().get(field)
        if ids is None or ids == []:
            raise BadRequest("SearchDatasets request must specify at least one experiment_id.")
        if not isinstance(ids, list):
            raise BadRequest(f"Field '{field}' must be a list")
        if len(ids) > maximum:
            raise BadRequest(
                f"SearchDatasets request cannot specify more than {maximum} experiment_ids. "
                f"Received {len(ids)} experiment_ids."
            )
        ex.body = {field: ids}
        ex.query = {}

    return step


SEARCH_DATASETS = Policy(
    request=(
        limit_experiment_ids("experiment_ids", MAX_DATASET_SEARCH_EXPERIMENTS),
        require_owned_experiments("experiment_ids"),
    ),
    access=Access.READ,
    description="OE on every experiment id (1..20)",
)


# -- runs/create-promptlab-run (UI) ------------------------------------------------------------------

PROMPTLAB_RUN = Deny(
    "prompt-lab runs cannot carry the gateway's provenance tags: MLflow's handler passes the raw JSON "
    "'tags' to create_run, so any tag fails upstream (verified: HTTP 500), and the run would be created "
    "without matih.tenant_id/matih.user_id; the prompt lab also needs the AI Gateway proxy, which is denied"
)
