"""Evaluation datasets: a dataset is the tenant's when every experiment it is linked to is.

Every dataset id must be owned, searches must name owned experiments (MLflow's search with none
returns every tenant's datasets), ``matih.*`` is reserved in dataset and record tags, creators come
from the token, and records may only cite the tenant's own traces. Foreign ids are answered exactly
like missing ones, and refused requests never reach MLflow (only ownership look-ups may).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.app.conftest import (
    ACME,
    GLOBEX,
    FakeUpstream,
    GatewayUnderTest,
    Received,
    Reply,
    assert_mlflow_error,
)
from tests.factories import bearer

API3 = "/api/3.0/mlflow"
AJAX3 = "/ajax-api/3.0/mlflow"
DATASETS = f"{API3}/datasets"


def _new_dataset_id() -> str:
    return f"d-{uuid.uuid4().hex}"


def _trace_id() -> str:
    return f"tr-{uuid.uuid4().hex}"


class FakeDatasets:
    """Datasets and traces held by the fake MLflow: dataset id -> linked experiment ids."""

    def __init__(self, fake: FakeUpstream) -> None:
        self.fake = fake
        self.links: dict[str, list[str]] = {}
        self.traces: dict[str, str] = {}

    def add(self, *experiment_ids: str) -> str:
        """A dataset linked to ``experiment_ids`` upstream."""
        dataset_id = _new_dataset_id()
        self.links[dataset_id] = list(experiment_ids)
        return dataset_id

    def add_trace(self, experiment_id: str) -> str:
        """A trace in ``experiment_id`` upstream."""
        trace_id = _trace_id()
        self.traces[trace_id] = experiment_id
        return trace_id

    def install(self) -> None:
        for prefix in (API3, AJAX3):
            base = re.escape(f"{prefix}/datasets")
            for method in ("GET", "POST", "PATCH", "DELETE"):  # registered first: the last match wins
                self.fake.on(method, rf"{base}/.+", self._ok, regex=True)
            self.fake.on("POST", f"{prefix}/datasets/create", self._create)
            self.fake.on("GET", rf"{base}/[^/]+/experiment-ids", self._experiment_ids, regex=True)
            self.fake.on("GET", rf"{re.escape(prefix)}/traces/[^/]+", self._trace, regex=True)
            self.fake.on("POST", f"{prefix}/datasets/search", Reply(200, {"datasets": []}))
            self.fake.on("GET", f"{prefix}/datasets/search", Reply(200, {"datasets": []}))

    def _create(self, request: Received) -> Reply:
        body = request.json()
        dataset_id = _new_dataset_id()
        self.links[dataset_id] = list(body.get("experiment_ids", []))
        return Reply(200, {"dataset": {"dataset_id": dataset_id, "name": body["name"], "tags": body.get("tags")}})

    def _experiment_ids(self, request: Received) -> Reply:
        dataset_id = request.path.split("/")[5]
        ids = self.links.get(dataset_id, [])
        return Reply(200, {"experiment_ids": ids} if ids else {})

    def _trace(self, request: Received) -> Reply:
        trace_id = request.path.rsplit("/", 1)[1]
        if trace_id not in self.traces:
            return Reply(
                404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"Trace with ID '{trace_id}' not found."}
            )
        location = {"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": self.traces[trace_id]}}
        return Reply(200, {"trace": {"trace_info": {"trace_id": trace_id, "trace_location": location}}})

    @staticmethod
    def _ok(request: Received) -> Reply:
        return Reply(200, {})


@pytest.fixture
def datasets(fake: FakeUpstream) -> Iterator[FakeDatasets]:
    """The fake MLflow with dataset and trace handlers."""
    store = FakeDatasets(fake)
    store.install()
    yield store


def _own_and_foreign(fake: FakeUpstream, datasets: FakeDatasets) -> tuple[str, str, str]:
    """(acme experiment, acme dataset, globex dataset)."""
    experiment = fake.add_experiment("acme", "eval")
    return experiment, datasets.add(experiment), datasets.add(fake.add_experiment("globex", "victim"))


def _json_field(request: Received, field: str) -> Any:
    return json.loads(request.json()[field])


# -- create ------------------------------------------------------------------------------------------------


def test_create_links_owned_experiments_and_stamps_the_creator(
    start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream, datasets: FakeDatasets
) -> None:
    gateway = start_gateway()
    default = fake.add_experiment("acme", "Default")
    experiment = fake.add_experiment("acme", "eval")
    response = gateway.client.post(
        f"{DATASETS}/create",
        headers=bearer("acme", "alice", job="j-1"),
        json={
            "name": "qa",
            "experimentIds": [experiment, "0", experiment],
            "tags": json.dumps({"mlflow.user": "mallory", "team": "ds"}),
            "createdBy": "mallory",
        },
    )
    assert response.status_code == 200, response.text
    (forwarded,) = fake.forwarded()
    assert forwarded.json()["experiment_ids"] == sorted([default, experiment], key=int)
    assert forwarded.json()["created_by"] == "alice"
    assert _json_field(forwarded, "tags") == {
        "team": "ds",
        "mlflow.user": "alice",
        "matih.tenant_id": "acme",
        "matih.user_id": "alice",
        "matih.job_id": "j-1",
    }

    # The create response primed the dataset -> tenant cache.
    dataset_id = response.json()["dataset"]["dataset_id"]
    fake.requests.clear()
    assert gateway.client.get(f"{DATASETS}/{dataset_id}", headers=ACME).status_code == 200
    assert fake.lookups() == []
    assert_mlflow_error(gateway.client.get(f"{DATASETS}/{dataset_id}", headers=GLOBEX), 404, "RESOURCE_DOES_NOT_EXIST")


@pytest.mark.parametrize("experiment_ids", [None, []])
def test_create_needs_a_linked_experiment(
    client: httpx.Client, fake: FakeUpstream, datasets: FakeDatasets, experiment_ids: list[str] | None
) -> None:
    response = client.post(f"{DATASETS}/create", headers=ACME, json={"name": "qa", "experiment_ids": experiment_ids})
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    fake.assert_untouched()


def test_create_linked_to_a_foreign_experiment_is_404(
    client: httpx.Client, fake: FakeUpstream, datasets: FakeDatasets
) -> None:
    own, foreign = fake.add_experiment("acme", "eval"), fake.add_experiment("globex", "victim")
    response = client.post(f"{DATASETS}/create", headers=ACME, json={"name": "qa", "experiment_ids": [own, foreign]})
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"No Experiment with id={foreign} exists")
    assert fake.forwarded() == []


@pytest.mark.parametrize(
    "tags",
    [
        json.dumps({"matih.tenant_id": "globex"}),
        json.dumps({"MATIH.user_id": "x"}),
        json.dumps({" matih.job_id": "x"}),
    ],
)
def test_create_refuses_reserved_tags(
    client: httpx.Client, fake: FakeUpstream, datasets: FakeDatasets, tags: str
) -> None:
    experiment = fake.add_experiment("acme", "eval")
    response = client.post(
        f"{DATASETS}/create", headers=ACME, json={"name": "q", "experiment_ids": [experiment], "tags": tags}
    )
    assert_mlflow_error(response, 403, "PERMISSION_DENIED")
    assert fake.forwarded() == []


@pytest.mark.parametrize(
    "tags",
    [
        '{"team": "a", "team": "b"}',  # MLflow would keep the last duplicate
        "not json",
        '["matih.tenant_id"]',
        {"team": "a"},
        '"{\\"matih.tenant_id\\": \\"x\\"}"',  # JSON inside a JSON string
    ],
)
def test_create_refuses_ambiguous_tag_documents(
    client: httpx.Client, fake: FakeUpstream, datasets: FakeDatasets, tags: Any
) -> None:
    experiment = fake.add_experiment("acme", "eval")
    response = client.post(
        f"{DATASETS}/create", headers=ACME, json={"name": "q", "experiment_ids": [experiment], "tags": tags}
    )
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    assert fake.forwarded() == []


# -- routes naming a dataset id ----------------------------------------------------------------------------

DATASET_ROUTES: list[tuple[str, str, dict[str, Any] | None, str]] = [
    ("GET", "", None, "Evaluation dataset with id '{}' not found"),
    ("DELETE", "", None, "Evaluation dataset with id '{}' not found"),
    ("PATCH", "/tags", {"tags": json.dumps({"k": "v"})}, "Could not find evaluation dataset with ID {}"),
    ("DELETE", "/tags/k", None, "Evaluation dataset with id '{}' not found"),
    ("POST", "/records", {"records": json.dumps([{"inputs": {"q": 1}}])}, "Evaluation dataset with id '{}' not found"),
    ("GET", "/records", None, "Evaluation dataset with id '{}' not found"),
    ("DELETE", "/records", {"dataset_record_ids": ["dr-1"]}, "Evaluation dataset with id '{}' not found"),
    ("GET", "/experiment-ids", None, "Evaluation dataset with id '{}' not found"),
    ("POST", "/add-experiments", {"experiment_ids": []}, "Dataset '{}' not found"),
    ("POST", "/remove-experiments", {"experiment_ids": []}, "Dataset '{}' not found"),
]
ROUTE_IDS = [f"{method} {suffix or '/'}" for method, suffix, _, _ in DATASET_ROUTES]


@pytest.mark.parametrize(("method", "suffix", "body", "message"), DATASET_ROUTES, ids=ROUTE_IDS)
def test_own_dataset_routes_are_forwarded(
    client: httpx.Client,
    fake: FakeUpstream,
    datasets: FakeDatasets,
    method: str,
    suffix: str,
    body: dict[str, Any] | None,
    message: str,
) -> None:
    _, own, _ = _own_and_foreign(fake, datasets)
    response = client.request(method, f"{DATASETS}/{own}{suffix}", headers=ACME, json=body)
    assert response.status_code == 200, response.text
    (forwarded,) = fake.forwarded()
    assert (forwarded.method, forwarded.path) == (method, f"{DATASETS}/{own}{suffix}")
    if suffix in ("/tags", "/records", "/add-experiments", "/remove-experiments") and method != "GET":
        assert forwarded.json()["dataset_id"] == own  # the path's id, which was checked


@pytest.mark.parametrize("prefix", [API3, AJAX3])
@pytest.mark.parametrize(("method", "suffix", "body", "message"), DATASET_ROUTES, ids=ROUTE_IDS)
def test_foreign_dataset_is_indistinguishable_from_a_missing_one(
    client: httpx.Client,
    fake: FakeUpstream,
    datasets: FakeDatasets,
    prefix: str,
    method: str,
    suffix: str,
    body: dict[str, Any] | None,
    message: str,
) -> None:
    _, _, foreign = _own_and_foreign(fake, datasets)
    missing = _new_dataset_id()
    foreign_response = client.request(method, f"{prefix}/datasets/{foreign}{suffix}", headers=ACME, json=body)
    missing_response = client.request(method, f"{prefix}/datasets/{missing}{suffix}", headers=ACME, json=body)
    assert_mlflow_error(foreign_response, 404, "RESOURCE_DOES_NOT_EXIST", message.format(foreign))
    assert missing_response.status_code == 404
    assert missing_response.content == foreign_response.content.replace(foreign.encode(), missing.encode())
    assert fake.forwarded() == []


def test_a_dataset_linked_to_two_tenants_belongs_to_neither(
    client: httpx.Client, fake: FakeUpstream, datasets: FakeDatasets
) -> None:
    """Only possible behind the gateway's back; such a dataset is nobody's."""
    mixed = datasets.add(fake.add_experiment("acme", "a"), fake.add_experiment("globex", "b"))
    for headers in (ACME, GLOBEX):
        assert_mlflow_error(client.get(f"{DATASETS}/{mixed}", headers=headers), 404, "RESOURCE_DOES_NOT_EXIST")
    unlinked = datasets.add()
    assert_mlflow_error(client.get(f"{DATASETS}/{unlinked}", headers=ACME), 404, "RESOURCE_DOES_NOT_EXIST")
    unprefixed = datasets.add(fake.add_experiment(None, "legacy"))
    assert_mlflow_error(client.get(f"{DATASETS}/{unprefixed}", headers=ACME), 404, "RESOURCE_DOES_NOT_EXIST")
    assert fake.forwarded() == []


def test_dataset_tenant_is_cached_not_its_links(
    client: httpx.Client, fake: FakeUpstream, datasets: FakeDatasets
) -> None:
    _, own, _ = _own_and_foreign(fake, datasets)
    assert client.get(f"{DATASETS}/{own}", headers=ACME).status_code == 200
    assert len(fake.lookups("GET", "/experiment-ids")) == 1
    fake.requests.clear()
    assert client.get(f"{DATASETS}/{own}/records", headers=ACME).status_code == 200
    assert client.get(f"{DATASETS}/{own}", headers=GLOBEX).status_code == 404
    assert fake.lookups() == []


def test_malformed_dataset_ids_never_reach_mlflow(
    client: httpx.Client, fake: FakeUpstream, datasets: FakeDatasets
) -> None:
    for dataset_id in ["d-1", "d-" + "0" * 31, "d-" + "0" * 33, "D-" + "0" * 32, "d-" + "g" * 32]:
        response = client.get(f"{DATASETS}/{dataset_id}", headers=ACME)
        assert response.status_code in (400, 403), (dataset_id, response.text)
    fake.assert_untouched()


@pytest.mark.parametrize("route", ["", "/records", "/add-experiments"])
def test_a_body_naming_another_dataset_is_400(
    client: httpx.Client, fake: FakeUpstream, datasets: FakeDatasets, route: str
) -> None:
    _, own, foreign = _own_and_foreign(fake, datasets)
    method = "PATCH" if route == "" else "POST"
    path = f"{DATASETS}/{own}{route or '/tags'}"
    body = {"dataset_id": foreign, "tags": "{}", "records": "[]", "experiment_ids": []}
    response = client.request(method, path, headers=ACME, json=body)
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    assert fake.forwarded() == []


# -- tags -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["matih.tenant_id", "Matih.user_id"])
def test_set_tags_refuses_reserved_keys(
    client: httpx.Client, fake: FakeUpstream, datasets: FakeDatasets, key: str
) -> None:
    _, own, _ = _own_and_foreign(fake, datasets)
    response = client.patch(f"{DATASETS}/{own}/tags", headers=ACME, json={"tags": json.dumps({key: "x"})})
    assert_mlflow_error(response, 403, "PERMISSION_DENIED")
    fake.assert_untouched()


@pytest.mark.parametrize("key", ["matih.tenant_id", "MATIH.x"])
def test_delete_tag_refuses_reserved_keys(
    client: httpx.Client, fake: FakeUpstream, datasets: FakeDatasets, key: str
) -> None:
    _, own, _ = _own_and_foreign(fake, datasets)
    assert_mlflow_error(client.delete(f"{DATASETS}/{own}/tags/{key}", headers=ACME), 403, "PERMISSION_DENIED")
    fake.assert_untouched()


def test_set_tags_needs_a_tag_document(client: httpx.Client, fake: FakeUpstream, datasets: FakeDatasets) -> None:
    _, own, _ = _own_and_foreign(fake, datasets)
    for body in [{}, {"tags": "[]"}, {"tags": '{"a": 1, "a": 2}'}]:
        assert_mlflow_error(
            client.patch(f"{DATASETS}/{own}/tags", headers=ACME, json=body), 400, "INVALID_PARAMETER_VALUE"
        )
    fake.assert_untouched()


# -- records ----------------------------------------------------------------------------------------------


def test_records_get_the_callers_user(client: httpx.Client, fake: FakeUpstream, datasets: FakeDatasets) -> None:
    experiment, own, _ = _own_and_foreign(fake, datasets)
    trace = datasets.add_trace(experiment)
    records = [
        {"inputs": {"q": "a"}, "tags": {"mlflow.user": "mallory", "k": "v"}},
        {"inputs": {"q": "b"}, "source": {"source_type": "trace", "source_data": {"trace_id": trace}}},
        {"inputs": {"q": "c"}, "source": {"source_type": "HUMAN", "source_data": {"trace_id": "anything"}}},
    ]
    response = client.post(
        f"{DATASETS}/{own}/records", headers=ACME, json={"records": json.dumps(records), "updatedBy": "x"}
    )
    assert response.status_code == 200, response.text
    (forwarded,) = fake.forwarded()
    sent = _json_field(forwarded, "records")
    assert [record["tags"] for record in sent] == [
        {"mlflow.user": "alice", "k": "v"},
        {"mlflow.user": "alice"},
        {"mlflow.user": "alice"},
    ]
    assert [record.get("source") for record in sent] == [record.get("source") for record in records]
    assert forwarded.json()["updated_by"] == "alice"


@pytest.mark.parametrize("source_type", ["TRACE", "trace", "Trace"])
def test_records_cannot_cite_a_foreign_or_missing_trace(
    client: httpx.Client, fake: FakeUpstream, datasets: FakeDatasets, source_type: str
) -> None:
    _, own, _ = _own_and_foreign(fake, datasets)
    foreign_trace = datasets.add_trace(fake.add_experiment("globex", "traces"))
    missing_trace = _trace_id()
    answers = []
    for trace in (foreign_trace, missing_trace):
        record = {"inputs": {"q": 1}, "source": {"source_type": source_type, "source_data": {"trace_id": trace}}}
        response = client.post(f"{DATASETS}/{own}/records", headers=ACME, json={"records": json.dumps([record])})
        answers.append(
            assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"Trace with ID '{trace}' not found.")
        )
    assert answers[0]["message"].replace(foreign_trace, missing_trace) == answers[1]["message"]
    assert fake.forwarded() == []


def test_records_for_a_foreign_dataset_look_up_no_trace(
    client: httpx.Client, fake: FakeUpstream, datasets: FakeDatasets
) -> None:
    _, _, foreign = _own_and_foreign(fake, datasets)
    trace = datasets.add_trace(fake.add_experiment("globex", "traces"))
    record = {"inputs": {}, "source": {"source_type": "TRACE", "source_data": {"trace_id": trace}}}
    response = client.post(f"{DATASETS}/{foreign}/records", headers=ACME, json={"records": json.dumps([record])})
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"Evaluation dataset with id '{foreign}' not found")
    assert fake.calls("GET", trace) == []
    assert fake.forwarded() == []


@pytest.mark.parametrize(
    "records",
    [
        json.dumps([{"inputs": {}, "tags": {"matih.tenant_id": "globex"}}]),
        json.dumps([{"inputs": {}, "tags": {"MATIH.user_id": "x"}}]),
    ],
)
def test_records_refuse_reserved_tags(
    client: httpx.Client, fake: FakeUpstream, datasets: FakeDatasets, records: str
) -> None:
    _, own, _ = _own_and_foreign(fake, datasets)
    response = client.post(f"{DATASETS}/{own}/records", headers=ACME, json={"records": records})
    assert_mlflow_error(response, 403, "PERMISSION_DENIED")
    fake.assert_untouched()


@pytest.mark.parametrize(
    "records",
    [
        None,
        [{"inputs": {}}],
        json.dumps({"inputs": {}}),
        json.dumps(["x"]),
        '[{"inputs": {}, "inputs": {"q": 1}}]',
        json.dumps([{"inputs": {}, "source": "trace"}]),
        json.dumps([{"inputs": {}, "source": {"source_type": 1}}]),
        json.dumps([{"inputs": {}, "source": {"source_type": "TRACE", "source_data": "tr-1"}}]),
        json.dumps([{"inputs": {}, "source": {"source_type": "TRACE", "source_data": {"trace_id": 1}}}]),
        json.dumps([{"inputs": {}, "tags": ["a"]}]),
    ],
)
def test_records_must_be_a_plain_record_list(
    client: httpx.Client, fake: FakeUpstream, datasets: FakeDatasets, records: Any
) -> None:
    _, own, _ = _own_and_foreign(fake, datasets)
    response = client.post(f"{DATASETS}/{own}/records", headers=ACME, json={"records": records})
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    fake.assert_untouched()


# -- experiment links -------------------------------------------------------------------------------------


def test_add_experiments_needs_owned_experiments(
    client: httpx.Client, fake: FakeUpstream, datasets: FakeDatasets
) -> None:
    experiment, own, _ = _own_and_foreign(fake, datasets)
    other, foreign = fake.add_experiment("acme", "other"), fake.add_experiment("globex", "victim")
    path = f"{DATASETS}/{own}/add-experiments"
    response = client.post(path, headers=ACME, json={"experiment_ids": [other, foreign]})
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"No Experiment with id={foreign} exists")
    assert fake.forwarded() == []
    assert client.post(path, headers=ACME, json={"experimentIds": [other, experiment, other]}).status_code == 200
    assert fake.forwarded()[0].json() == {"dataset_id": own, "experiment_ids": sorted([other, experiment], key=int)}


def test_remove_experiments_keeps_one_link(client: httpx.Client, fake: FakeUpstream, datasets: FakeDatasets) -> None:
    first, second = fake.add_experiment("acme", "a"), fake.add_experiment("acme", "b")
    dataset = datasets.add(first, second)
    path = f"{DATASETS}/{dataset}/remove-experiments"
    response = client.post(path, headers=ACME, json={"experiment_ids": [first, second]})
    assert_mlflow_error(response, 403, "PERMISSION_DENIED")
    assert fake.forwarded() == []
    assert client.post(path, headers=ACME, json={"experiment_ids": [second]}).status_code == 200
    assert fake.forwarded()[0].json()["experiment_ids"] == [second]
    datasets.links[dataset] = [first]  # what MLflow now holds
    assert_mlflow_error(client.post(path, headers=ACME, json={"experiment_ids": [first]}), 403, "PERMISSION_DENIED")


def test_remove_a_foreign_experiment_is_404(client: httpx.Client, fake: FakeUpstream, datasets: FakeDatasets) -> None:
    _, own, _ = _own_and_foreign(fake, datasets)
    foreign = fake.add_experiment("globex", "victim")
    response = client.post(f"{DATASETS}/{own}/remove-experiments", headers=ACME, json={"experiment_ids": [foreign]})
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"No Experiment with id={foreign} exists")
    assert fake.forwarded() == []


# -- search -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [{}, {"experiment_ids": []}, {"filter_string": "name = 'x'"}])
def test_search_must_name_experiments(
    client: httpx.Client, fake: FakeUpstream, datasets: FakeDatasets, body: dict[str, Any]
) -> None:
    """MLflow answers a search with no experiment ids with every tenant's datasets."""
    assert_mlflow_error(client.post(f"{DATASETS}/search", headers=ACME, json=body), 400, "INVALID_PARAMETER_VALUE")
    assert_mlflow_error(client.get(f"{DATASETS}/search", headers=ACME), 400, "INVALID_PARAMETER_VALUE")
    response = client.get(f"{DATASETS}/search", headers=ACME, params={"experimentIds": "1"})
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    fake.assert_untouched()


def test_search_is_scoped_to_owned_experiments(
    start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream, datasets: FakeDatasets
) -> None:
    gateway = start_gateway()
    default = fake.add_experiment("acme", "Default")
    own = fake.add_experiment("acme", "eval")
    foreign = fake.add_experiment("globex", "victim")
    body = {"experiment_ids": [own, "0"], "filter_string": "name = 'qa'", "max_results": 10}
    assert gateway.client.post(f"{DATASETS}/search", headers=ACME, json=body).status_code == 200
    assert fake.forwarded()[0].json() == {**body, "experiment_ids": sorted([own, default], key=int)}

    params: dict[str, Any] = {"experiment_ids": [own, "0"], "max_results": "5"}
    assert gateway.client.get(f"{DATASETS}/search", headers=ACME, params=params).status_code == 200
    assert fake.forwarded()[1].query == {"experiment_ids": sorted([own, default], key=int), "max_results": ["5"]}

    for method, kwargs in [
        ("POST", {"json": {"experiment_ids": [own, foreign]}}),
        ("GET", {"params": {"experiment_ids": [foreign]}}),
    ]:
        response = gateway.client.request(method, f"{DATASETS}/search", headers=ACME, **kwargs)
        assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"No Experiment with id={foreign} exists")
    assert len(fake.forwarded()) == 2


def test_viewer_reads_but_cannot_write(client: httpx.Client, fake: FakeUpstream, datasets: FakeDatasets) -> None:
    experiment, own, _ = _own_and_foreign(fake, datasets)
    viewer = bearer("acme", "vera", roles=["viewer"])
    assert client.get(f"{DATASETS}/{own}", headers=viewer).status_code == 200
    assert client.get(f"{DATASETS}/{own}/records", headers=viewer).status_code == 200
    assert client.post(f"{DATASETS}/search", headers=viewer, json={"experiment_ids": [experiment]}).status_code == 200
    for method, suffix, body in [
        ("POST", "/create", {"name": "x", "experiment_ids": [experiment]}),
        ("DELETE", f"/{own}", None),
        ("POST", f"/{own}/records", {"records": "[]"}),
    ]:
        assert_mlflow_error(
            client.request(method, f"{DATASETS}{suffix}", headers=viewer, json=body), 403, "PERMISSION_DENIED"
        )
