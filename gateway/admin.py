"""``mlflow-gateway admin``: move existing MLflow data under tenants, list tenants, audit invariants.

These commands talk to the UPSTREAM MLflow server directly, with operator credentials
(``--upstream-url`` or ``GATEWAY_UPSTREAM_URL``; ``MLFLOW_TRACKING_TOKEN`` or
``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` when the upstream needs them), never
through the gateway: they change what the gateway considers owned.

Ownership is what the gateway reads: an experiment named ``<tenant>/<name>`` belongs to ``tenant``
(:func:`gateway.policy.ownership.tenant_of_experiment_name`), a registered model named
``<tenant>.<name>`` likewise; runs belong to their experiment. ``adopt`` renames and tags objects
so they follow those rules; it refuses anything another tenant already owns (by name prefix or by
``matih.tenant_id`` tag), is idempotent (a second run plans nothing) and prints its plan with
``--dry-run`` without changing anything.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.auth.principal import is_valid_tenant_id
from gateway.policy.ownership import EXPERIMENT_SEPARATOR, TENANT_TAG, tenant_of_experiment_name
from gateway.policy.registry import REGISTRY_SEPARATOR, registered_model_prefix

UPSTREAM_ENV = "GATEWAY_UPSTREAM_URL"
DEFAULT_EXPERIMENT_ID = "0"
_PAGE = 1000
_MODEL_PAGE = 1000


class AdminError(Exception):
    """An upstream call failed or the command was misused (exit status 2)."""

    def __init__(self, message: str, error_code: str | None = None) -> None:
        super().__init__(message)
        self.error_code = error_code


JsonDict = dict[str, Any]


class Upstream:
    """A minimal MLflow REST client over urllib (the runtime has no requests/httpx)."""

    def __init__(self, base_url: str, *, token: str | None = None, basic: tuple[str, str] | None = None) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise AdminError(f"upstream URL must be http(s): {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        elif basic:
            pair = base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode()
            self._headers["Authorization"] = f"Basic {pair}"

    @classmethod
    def from_environment(cls, url: str | None) -> Upstream:
        """Operator credentials from the flags and the environment."""
        base = url or os.environ.get(UPSTREAM_ENV)
        if not base:
            raise AdminError(f"set --upstream-url or {UPSTREAM_ENV} to the upstream MLflow server")
        user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
        basic = (user, password) if user and password else None
        return cls(base, token=os.environ.get("MLFLOW_TRACKING_TOKEN") or None, basic=basic)

    def call(self, method: str, endpoint: str, body: JsonDict | None = None) -> JsonDict:
        """One REST call (``endpoint`` below ``/api/2.0/mlflow/``); MLflow errors raise :class:`AdminError`."""
        url = f"{self.base_url}/api/2.0/mlflow/{endpoint}"
        data = None
        if method == "GET" and body:
            url += "?" + urllib.parse.urlencode({k: v for k, v in body.items() if v is not None}, doseq=True)
        elif body is not None:
            data = json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method, headers=self._headers)  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 (http(s) checked above)
                payload = response.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode("utf-8", "replace")
            try:
                error = json.loads(text)
            except ValueError:
                error = {"message": text[:300]}
            raise AdminError(
                f"{method} {endpoint}: HTTP {exc.code}: {error.get('message', '')}", error.get("error_code")
            ) from None
        except urllib.error.URLError as exc:
            raise AdminError(f"{method} {endpoint}: upstream unreachable: {exc.reason}") from None
        result = json.loads(payload) if payload else {}
        return result if isinstance(result, dict) else {}

    # -- reads ------------------------------------------------------------------------------------

    def _pages(self, method: str, endpoint: str, body: JsonDict, key: str) -> Iterator[JsonDict]:
        token: str | None = None
        while True:
            page = self.call(method, endpoint, {**body, "page_token": token} if token else body)
            yield from page.get(key, [])
            token = page.get("next_page_token")
            if not token:
                return

    def experiments(self) -> list[JsonDict]:
        """Every active experiment."""
        body = {"max_results": _PAGE, "view_type": "ACTIVE_ONLY"}
        return list(self._pages("POST", "experiments/search", body, "experiments"))

    def experiment(self, *, experiment_id: str | None = None, name: str | None = None) -> JsonDict | None:
        """One experiment by id or name, ``None`` when it does not exist."""
        try:
            if experiment_id is not None:
                found = self.call("GET", "experiments/get", {"experiment_id": experiment_id})
            else:
                found = self.call("GET", "experiments/get-by-name", {"experiment_name": name})
        except AdminError as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        experiment = found.get("experiment")
        return experiment if isinstance(experiment, dict) else None

    def runs(self, experiment_ids: Sequence[str], filter_string: str = "") -> list[JsonDict]:
        """Every run (active and deleted) of the experiments, ``filter_string`` applied upstream."""
        runs: list[JsonDict] = []
        ids = list(experiment_ids)
        for start in range(0, len(ids), 100):
            body: JsonDict = {"experiment_ids": ids[start : start + 100], "max_results": _PAGE, "run_view_type": "ALL"}
            if filter_string:
                body["filter"] = filter_string
            runs.extend(self._pages("POST", "runs/search", body, "runs"))
        return runs

    def run(self, run_id: str) -> JsonDict | None:
        """One run, ``None`` when it does not exist."""
        try:
            run = self.call("GET", "runs/get", {"run_id": run_id}).get("run")
        except AdminError as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return run if isinstance(run, dict) else None

    def registered_models(self) -> list[JsonDict]:
        """Every registered model (prompts included)."""
        return list(self._pages("GET", "registered-models/search", {"max_results": _MODEL_PAGE}, "registered_models"))

    def model_versions(self, name: str) -> list[JsonDict]:
        """Every version of the registered model ``name``."""
        quoted = name.replace("'", "\\'")
        body = {"filter": f"name='{quoted}'", "max_results": _MODEL_PAGE}
        return list(self._pages("GET", "model-versions/search", body, "model_versions"))


def _tags(obj: JsonDict) -> dict[str, str]:
    tags = obj.get("tags") or (obj.get("data") or {}).get("tags") or []
    return {tag["key"]: tag.get("value", "") for tag in tags if isinstance(tag, dict) and "key" in tag}


def model_tenant(name: str) -> str | None:
    """The tenant prefix of an upstream registered-model name, or ``None``."""
    tenant, separator, rest = name.partition(REGISTRY_SEPARATOR)
    return tenant if separator and rest and is_valid_tenant_id(tenant) else None


def experiment_tenant(name: str) -> str | None:
    """The tenant prefix of an upstream experiment name (what the gateway reads), or ``None``."""
    return tenant_of_experiment_name(name)


# -- plans ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    """One change ``adopt`` makes: ``kind`` is rename-experiment|tag-experiment|tag-run|rename-model|tag-model."""

    kind: str
    target: str
    detail: str
    call: tuple[str, str, JsonDict] = field(compare=False)


@dataclass(frozen=True)
class Finding:
    """An object that is refused (adopt) or breaks an invariant (audit)."""

    kind: str
    target: str
    problem: str


@dataclass
class Plan:
    """What ``adopt`` will do, and what it refuses."""

    actions: list[Action] = field(default_factory=list)
    refused: list[Finding] = field(default_factory=list)


def plan_adoption(
    upstream: Upstream,
    tenant: str,
    *,
    names: Iterable[str] = (),
    ids: Iterable[str] = (),
    models: bool = False,
) -> Plan:
    """Plan moving the experiments (and with ``models`` their registered models) under ``tenant``."""
    if not is_valid_tenant_id(tenant):
        raise AdminError(f"invalid tenant id {tenant!r}: lowercase letters, digits and '-' only")
    plan = Plan()
    prefix = tenant + EXPERIMENT_SEPARATOR
    adopted: dict[str, JsonDict] = {}
    for label, experiment in [(f"name {n!r}", upstream.experiment(name=n)) for n in names] + [
        (f"id {i}", upstream.experiment(experiment_id=i)) for i in ids
    ]:
        if experiment is None:
            plan.refused.append(Finding("experiment", label, "does not exist"))
            continue
        experiment_id, name = str(experiment["experiment_id"]), str(experiment["name"])
        target = f"experiment {experiment_id} ({name})"
        owner, tag_owner = experiment_tenant(name), _tags(experiment).get(TENANT_TAG)
        if experiment_id == DEFAULT_EXPERIMENT_ID:
            plan.refused.append(Finding("experiment", target, "the shared Default experiment cannot be adopted"))
            continue
        if owner not in (None, tenant):
            plan.refused.append(Finding("experiment", target, f"already owned by tenant {owner!r} (name prefix)"))
            continue
        if tag_owner not in (None, tenant):
            plan.refused.append(Finding("experiment", target, f"tagged {TENANT_TAG}={tag_owner!r}"))
            continue
        runs = upstream.runs([experiment_id])
        foreign = [r for r in runs if _tags(r).get(TENANT_TAG) not in (None, tenant)]
        if foreign:
            plan.refused.append(
                Finding("experiment", target, f"{len(foreign)} run(s) tagged with another tenant's {TENANT_TAG}")
            )
            continue
        new_name = name if owner == tenant else prefix + name
        if owner is None:
            if upstream.experiment(name=new_name) is not None:
                plan.refused.append(Finding("experiment", target, f"target name {new_name!r} already exists"))
                continue
            body = {"experiment_id": experiment_id, "new_name": new_name}
            plan.actions.append(
                Action("rename-experiment", target, f"-> {new_name}", ("POST", "experiments/update", body))
            )
        if tag_owner is None:
            body = {"experiment_id": experiment_id, "key": TENANT_TAG, "value": tenant}
            plan.actions.append(
                Action(
                    "tag-experiment", target, f"{TENANT_TAG}={tenant}", ("POST", "experiments/set-experiment-tag", body)
                )
            )
        for run in runs:
            if _tags(run).get(TENANT_TAG) is None:
                run_id = run["info"]["run_id"]
                body = {"run_id": run_id, "key": TENANT_TAG, "value": tenant}
                plan.actions.append(
                    Action("tag-run", f"run {run_id}", f"{TENANT_TAG}={tenant}", ("POST", "runs/set-tag", body))
                )
        adopted[experiment_id] = experiment
    if models and adopted:
        _plan_models(upstream, tenant, adopted, plan)
    return plan


def _plan_models(upstream: Upstream, tenant: str, adopted: dict[str, JsonDict], plan: Plan) -> None:
    """Registered models with a version from an adopted experiment follow it (when all their versions can)."""
    run_experiment: dict[str, str | None] = {}
    for run in upstream.runs(list(adopted)):
        run_experiment[run["info"]["run_id"]] = str(run["info"]["experiment_id"])
    locations = {eid: str(e.get("artifact_location", "")).rstrip("/") + "/" for eid, e in adopted.items()}
    prefix = registered_model_prefix(tenant)

    def version_experiment(version: JsonDict) -> str | None:
        run_id = version.get("run_id")
        if run_id:
            if run_id not in run_experiment:
                run = upstream.run(run_id)
                run_experiment[run_id] = str(run["info"]["experiment_id"]) if run else None
            return run_experiment[run_id]
        source = str(version.get("source", ""))
        return next((eid for eid, location in locations.items() if source.startswith(location)), None)

    for model in upstream.registered_models():
        name = str(model["name"])
        versions = upstream.model_versions(name)
        experiments = {e for e in (version_experiment(v) for v in versions) if e is not None}
        if not experiments & set(adopted):
            continue
        target = f"registered model {name}"
        owner, tag_owner = model_tenant(name), _tags(model).get(TENANT_TAG)
        outside = sorted(e for e in experiments if e not in adopted and not _owned(upstream, e, tenant))
        if owner not in (None, tenant):
            plan.refused.append(Finding("registered model", target, f"already owned by tenant {owner!r} (name prefix)"))
        elif tag_owner not in (None, tenant):
            plan.refused.append(Finding("registered model", target, f"tagged {TENANT_TAG}={tag_owner!r}"))
        elif outside:
            plan.refused.append(
                Finding("registered model", target, f"has versions from experiments not owned by {tenant}: {outside}")
            )
        else:
            if owner is None:
                body = {"name": name, "new_name": prefix + name}
                plan.actions.append(
                    Action("rename-model", target, f"-> {prefix + name}", ("POST", "registered-models/rename", body))
                )
            if tag_owner is None:
                body = {"name": prefix + name if owner is None else name, "key": TENANT_TAG, "value": tenant}
                plan.actions.append(
                    Action("tag-model", target, f"{TENANT_TAG}={tenant}", ("POST", "registered-models/set-tag", body))
                )


def _owned(upstream: Upstream, experiment_id: str, tenant: str) -> bool:
    experiment = upstream.experiment(experiment_id=experiment_id)
    return experiment is not None and experiment_tenant(str(experiment["name"])) == tenant


def apply_plan(upstream: Upstream, plan: Plan, *, progress: bool = True) -> Counter[str]:
    """Run the plan's actions in order (renames before tags); counts per kind."""
    done: Counter[str] = Counter()
    for action in _progress(plan.actions, "adopting", enabled=progress):
        method, endpoint, body = action.call
        upstream.call(method, endpoint, body)
        done[action.kind] += 1
    return done


def _progress(items: Sequence[Action], description: str, *, enabled: bool) -> Iterable[Action]:
    if not enabled or not items:
        return items
    from tqdm import tqdm  # type: ignore[import-untyped]

    bar: Iterable[Action] = tqdm(items, desc=description, unit="change", file=sys.stderr)
    return bar


# -- tenants and audit ----------------------------------------------------------------------------


def tenant_counts(upstream: Upstream) -> dict[str, Counter[str]]:
    """Per tenant (from experiment name prefixes; ``(none)`` for unprefixed): experiments, runs, models."""
    counts: dict[str, Counter[str]] = {}
    by_tenant: dict[str, list[str]] = {}
    for experiment in upstream.experiments():
        tenant = experiment_tenant(str(experiment["name"])) or "(none)"
        by_tenant.setdefault(tenant, []).append(str(experiment["experiment_id"]))
        counts.setdefault(tenant, Counter())["experiments"] += 1
    for tenant, ids in by_tenant.items():
        counts[tenant]["runs"] = len(upstream.runs(ids))
    for model in upstream.registered_models():
        owner = model_tenant(str(model["name"]))
        tenant = owner if owner in counts else "(none)"
        counts.setdefault(tenant, Counter())["registered models"] += 1
    return counts


def audit(upstream: Upstream, tenant: str) -> list[Finding]:
    """Objects of ``tenant`` that break the invariants the gateway relies on."""
    if not is_valid_tenant_id(tenant):
        raise AdminError(f"invalid tenant id {tenant!r}: lowercase letters, digits and '-' only")
    findings: list[Finding] = []
    experiments = upstream.experiments()
    owned = {str(e["experiment_id"]): e for e in experiments if experiment_tenant(str(e["name"])) == tenant}
    others = [str(e["experiment_id"]) for e in experiments if str(e["experiment_id"]) not in owned]
    for experiment in experiments:
        eid, name, tag = str(experiment["experiment_id"]), str(experiment["name"]), _tags(experiment).get(TENANT_TAG)
        target = f"experiment {eid} ({name})"
        if eid in owned and tag != tenant:
            problem = f"missing {TENANT_TAG} tag" if tag is None else f"tagged {TENANT_TAG}={tag!r}"
            findings.append(Finding("experiment", target, problem))
        elif eid not in owned and tag == tenant:
            findings.append(Finding("experiment", target, f"tagged {tenant} but named outside the '{tenant}/' prefix"))
    for run in upstream.runs(list(owned)) if owned else []:
        tag = _tags(run).get(TENANT_TAG)
        if tag != tenant:
            problem = f"missing {TENANT_TAG} tag" if tag is None else f"tagged {TENANT_TAG}={tag!r}"
            findings.append(Finding("run", f"run {run['info']['run_id']}", problem))
    if others:
        clause = f"tags.`{TENANT_TAG}` = '{tenant}'"
        for run in upstream.runs(others, clause):
            target = f"run {run['info']['run_id']}"
            findings.append(Finding("run", target, f"tagged {tenant} but its experiment is outside the prefix"))
    findings.extend(_audit_models(upstream, tenant, owned))
    return findings


def _audit_models(upstream: Upstream, tenant: str, owned: dict[str, JsonDict]) -> Iterator[Finding]:
    locations = {str(e.get("artifact_location", "")).rstrip("/") + "/" for e in owned.values()}
    run_owner: dict[str, bool] = {}
    for model in upstream.registered_models():
        name, tag = str(model["name"]), _tags(model).get(TENANT_TAG)
        target = f"registered model {name}"
        if model_tenant(name) != tenant:
            if tag == tenant:
                yield Finding("registered model", target, f"tagged {tenant} but named outside the '{tenant}.' prefix")
            continue
        if tag != tenant:
            yield Finding("registered model", target, f"missing {TENANT_TAG} tag" if tag is None else f"tagged {tag!r}")
        for version in upstream.model_versions(name):
            run_id, source = version.get("run_id"), str(version.get("source", ""))
            vtarget = f"model version {name}/{version.get('version')}"
            if run_id:
                if run_id not in run_owner:
                    run = upstream.run(run_id)
                    run_owner[run_id] = run is not None and str(run["info"]["experiment_id"]) in owned
                if not run_owner[run_id]:
                    yield Finding("model version", vtarget, f"run {run_id} is not in an experiment of {tenant}")
            elif _is_run_artifact_source(source) and not any(source.startswith(loc) for loc in locations):
                yield Finding("model version", vtarget, f"source {source} is outside {tenant}'s experiments")


def _is_run_artifact_source(source: str) -> bool:
    return source.startswith(("mlflow-artifacts:", "s3://", "file:", "runs:/"))


# -- command line ---------------------------------------------------------------------------------


def add_admin_parser(commands: Any) -> None:
    """Add ``admin adopt|tenants|audit`` to the ``mlflow-gateway`` sub-command parser."""
    admin = commands.add_parser("admin", help="operator tools on the upstream MLflow (adopt, tenants, audit)")
    admin.add_argument("--upstream-url", help=f"the upstream MLflow server (env {UPSTREAM_ENV})")
    actions = admin.add_subparsers(dest="admin_command", required=True)
    adopt = actions.add_parser("adopt", help="move existing experiments (and models) under a tenant")
    adopt.add_argument("--tenant", required=True)
    adopt.add_argument("--experiment", action="append", default=[], help="experiment name (repeatable)")
    adopt.add_argument("--experiment-id", action="append", default=[], help="experiment id (repeatable)")
    adopt.add_argument("--models", action="store_true", help="also adopt registered models with versions from them")
    adopt.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    actions.add_parser("tenants", help="list tenants with object counts")
    audit_parser = actions.add_parser("audit", help="report objects of a tenant that break the invariants")
    audit_parser.add_argument("--tenant", required=True)


def run_admin(args: argparse.Namespace) -> int:
    """Run an ``admin`` sub-command: 0 success, 1 refusals or findings, 2 usage or upstream error."""
    try:
        upstream = Upstream.from_environment(args.upstream_url)
        handlers: dict[str, Callable[[Upstream, argparse.Namespace], int]] = {
            "adopt": _adopt,
            "tenants": _tenants,
            "audit": _audit,
        }
        return handlers[args.admin_command](upstream, args)
    except AdminError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _adopt(upstream: Upstream, args: argparse.Namespace) -> int:
    if not args.experiment and not args.experiment_id:
        raise AdminError("name at least one --experiment or --experiment-id")
    plan = plan_adoption(upstream, args.tenant, names=args.experiment, ids=args.experiment_id, models=args.models)
    for action in plan.actions:
        print(f"{'plan' if args.dry_run else 'do'}: {action.kind:18} {action.target} {action.detail}")
    for finding in plan.refused:
        print(f"refused: {finding.target}: {finding.problem}")
    planned = Counter(action.kind for action in plan.actions)
    done = Counter[str]() if args.dry_run else apply_plan(upstream, plan, progress=sys.stderr.isatty())
    kinds = ["rename-experiment", "tag-experiment", "tag-run", "rename-model", "tag-model"]
    rows = [[kind, str(planned[kind]), str(done[kind])] for kind in kinds]
    rows.append(["refused", str(len(plan.refused)), "-"])
    print(format_table(["change", "planned", "applied"], rows))
    if args.dry_run:
        print("dry run: nothing was changed")
    elif not plan.actions and not plan.refused:
        print("nothing to do: already adopted")
    return 1 if plan.refused else 0


def _tenants(upstream: Upstream, args: argparse.Namespace) -> int:
    counts = tenant_counts(upstream)
    keys = ["experiments", "runs", "registered models"]
    rows = [[tenant, *(str(counts[tenant][k]) for k in keys)] for tenant in sorted(counts)]
    print(format_table(["tenant", *keys], rows))
    return 0


def _audit(upstream: Upstream, args: argparse.Namespace) -> int:
    findings = audit(upstream, args.tenant)
    if findings:
        print(format_table(["kind", "object", "problem"], [[f.kind, f.target, f.problem] for f in findings]))
    summary = Counter(f.kind for f in findings)
    rows = [[kind, str(summary[kind])] for kind in ("experiment", "run", "registered model", "model version")]
    print(format_table(["object kind", "findings"], rows))
    print(f"{len(findings)} finding(s) for tenant {args.tenant}")
    return 1 if findings else 0


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain aligned text table (no terminal dependency)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]
    line = "+".join("-" * (w + 2) for w in widths)
    render = [" | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in [headers, *rows]]
    return "\n".join([render[0], line, *render[1:]])
