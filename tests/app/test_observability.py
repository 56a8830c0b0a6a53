"""Access log, denial audit, metrics and the protected /metrics endpoint, through a real gateway.

The log lines are read from the ``gateway`` logger tree (``gateway.access``, ``gateway.audit``); a
request's line is written just after its response, so tests wait for it by request id. Metrics are
read by scraping ``/metrics`` over HTTP, as Prometheus does, and compared before and after.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest

from gateway.app import create_app
from gateway.auth.session import COOKIE_NAME, Session, SessionCodec
from gateway.policy.table import ROUTES
from tests.app.conftest import (
    ACME,
    API,
    USER_AGENT,
    FakeUpstream,
    GatewayUnderTest,
    Reply,
    ServerThread,
    assert_mlflow_error,
    closed_port,
    mlflow_error,
)
from tests.factories import bearer, make_settings, token
from tests.prometheus import Scrape

METRICS_TOKEN = "metrics-" + uuid.uuid4().hex  # 40 characters
JSON_LIMIT = 4096
SESSION_SECRET = "observability-session-secret-0123456789abcdef"


# -- log capture -------------------------------------------------------------------------------------


class LogLines(logging.Handler):
    """Every record of the ``gateway`` logger tree, kept as (logger name, message)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[str, str]] = []
        self._lock_records = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock_records:
            self.records.append((record.name, record.getMessage()))

    def lines(self, logger: str) -> list[dict[str, Any]]:
        """The JSON lines written on ``logger``."""
        with self._lock_records:
            return [orjson.loads(message) for name, message in self.records if name == logger]

    def text(self) -> str:
        """Everything logged, as one string."""
        with self._lock_records:
            return "\n".join(message for _, message in self.records)

    def access(self, request_id: str, timeout: float = 5.0) -> dict[str, Any]:
        """The access line of ``request_id``, waiting for it (it is written after the response)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in self.lines("gateway.access") if line["request_id"] == request_id]
            if found:
                assert len(found) == 1, found
                return found[0]
            assert time.monotonic() < deadline, f"no access line for {request_id}"
            time.sleep(0.005)

    def denials(self, request_id: str) -> list[dict[str, Any]]:
        """The ``denied`` audit records of ``request_id`` (call after :meth:`access` returned)."""
        return [
            line
            for line in self.lines("gateway.audit")
            if line["event"] == "denied" and line["request_id"] == request_id
        ]


@pytest.fixture
def logs() -> Iterator[LogLines]:
    handler = LogLines()
    logger = logging.getLogger("gateway")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# -- gateways ------------------------------------------------------------------------------------------


def _client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=10, headers={"User-Agent": USER_AGENT})


@pytest.fixture(scope="module")
def observed_server(fake_upstream: FakeUpstream) -> Iterator[ServerThread]:
    """One gateway for the module: a metrics token and a small JSON limit (413s)."""
    settings = make_settings(
        upstream_url=fake_upstream.url, metrics_token=METRICS_TOKEN, max_json_body_bytes=JSON_LIMIT
    )
    server = ServerThread(create_app(settings)).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(observed_server: ServerThread, fake: FakeUpstream) -> Iterator[httpx.Client]:
    with _client(observed_server.url) as http:
        yield http


def scrape(client: httpx.Client, *, secret: str = METRICS_TOKEN) -> Scrape:
    response = client.get("/metrics", headers={"Authorization": f"Bearer {secret}"})
    assert response.status_code == 200, response.text
    return Scrape.parse(response.text)


def request_id() -> dict[str, str]:
    """A fresh, well-formed client request id (the gateway keeps it): how tests find their log lines."""
    return {"X-Request-Id": uuid.uuid4().hex}


def headers(*more: dict[str, str]) -> tuple[str, dict[str, str]]:
    rid = request_id()
    merged = dict(rid)
    for extra in more:
        merged.update(extra)
    return rid["X-Request-Id"], merged


# -- the access log ------------------------------------------------------------------------------------


def test_one_access_line_per_request_with_its_fields(client: httpx.Client, fake: FakeUpstream, logs: LogLines) -> None:
    rid, sent = headers(ACME)
    body = b'{"name": "observed"}'
    response = client.post(
        f"{API}/experiments/create", content=body, headers={**sent, "content-type": "application/json"}
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == rid
    line = logs.access(rid)
    assert set(line) == {
        "ts", "request_id", "tenant", "user", "method", "route", "path", "status", "latency_ms",
        "upstream_ms", "upstream_calls", "bytes_in", "bytes_out", "error_code",
    }  # fmt: skip
    assert line["tenant"] == "acme" and line["user"] == "alice"
    assert (line["method"], line["status"], line["error_code"]) == ("POST", 200, None)
    assert line["route"] == line["path"] == f"{API}/experiments/create"
    assert line["bytes_in"] == len(body)
    assert line["bytes_out"] == len(response.content)
    # The create is forwarded (one call); the tenant's Default experiment is not needed for it.
    assert line["upstream_calls"] == len(fake.calls()) >= 1
    assert 0 < line["upstream_ms"] <= line["latency_ms"]
    assert abs(line["ts"] - time.time()) < 60
    for figure in ("ts", "latency_ms", "upstream_ms"):  # rounded to the microsecond (ts: the millisecond)
        assert isinstance(line[figure], float) and line[figure] == round(line[figure], 3)


def test_every_request_gets_exactly_one_line(client: httpx.Client, logs: LogLines) -> None:
    ids = []
    for path in ("/health", f"{API}/experiments/get?experiment_id=1", "/no/such/route", "/metrics"):
        rid, sent = headers()
        client.get(path, headers=sent)
        ids.append(rid)
    for rid in ids:
        logs.access(rid)  # asserts exactly one
    time.sleep(0.05)  # a duplicate would be written right after the first
    for rid in ids:
        logs.access(rid)


def test_the_route_is_the_template_and_the_path_has_no_query(
    client: httpx.Client, fake: FakeUpstream, logs: LogLines
) -> None:
    model_id = fake.add_logged_model(fake.add_experiment("acme", "models"))
    rid, sent = headers(ACME)
    assert client.get(f"{API}/logged-models/{model_id}", params={"x": "secret-query-value"}, headers=sent).status_code
    line = logs.access(rid)
    assert line["route"] == f"{API}/logged-models/{{model_id}}"
    assert line["path"] == f"{API}/logged-models/{model_id}"
    assert "secret-query-value" not in logs.text()


def test_unknown_paths_are_logged_as_unmatched(client: httpx.Client, logs: LogLines) -> None:
    rid, sent = headers(ACME)
    assert_mlflow_error(client.get(f"{API}/no-such-route/123", headers=sent), 403, "PERMISSION_DENIED")
    assert logs.access(rid)["route"] == "unmatched"
    rid, sent = headers()  # refused by authentication, before the route table: still a template
    assert_mlflow_error(client.post(f"{API}/runs/create", headers=sent), 401, "UNAUTHENTICATED")
    line = logs.access(rid)
    assert (line["route"], line["tenant"], line["user"], line["status"]) == (f"{API}/runs/create", "-", None, 401)


def test_no_token_cookie_or_credential_is_ever_logged(
    start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream, logs: LogLines
) -> None:
    gateway = start_gateway(session_secret=SESSION_SECRET, metrics_token=METRICS_TOKEN)
    experiment_id = fake.add_experiment("acme", "secrets")
    good = token("acme", "alice")
    forged = token("acme", "alice", secret="another-secret-that-is-long-enough-for-hs256-0123")
    cookie = SessionCodec(SESSION_SECRET).encode(Session(token=good, expires_at=int(time.time()) + 600))
    basic = base64.b64encode(f"user:{good}".encode()).decode()
    url = f"{API}/experiments/get?experiment_id={experiment_id}"
    attempts = [
        {"Authorization": f"Bearer {good}"},
        {"Authorization": f"Bearer {forged}"},
        {"Authorization": f"Basic {basic}"},
        {"Cookie": f"{COOKIE_NAME}={cookie}"},
        {"Cookie": f"{COOKIE_NAME}={cookie}", "Authorization": f"Bearer {good}"},  # both: refused
        {"Cookie": f"{COOKIE_NAME}={cookie[:-4]}AAAA"},  # tampered
    ]
    ids = []
    for attempt in attempts:
        rid, sent = headers(attempt)
        gateway.client.get(url, headers=sent)
        ids.append(rid)
    rid, sent = headers({"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert gateway.client.get("/metrics", headers=sent).status_code == 200
    ids.append(rid)
    rid, sent = headers({"Authorization": f"Bearer {METRICS_TOKEN}x"})
    assert gateway.client.get("/metrics", headers=sent).status_code == 403
    ids.append(rid)
    statuses = [logs.access(rid)["status"] for rid in ids]
    assert statuses == [200, 401, 200, 200, 400, 401, 200, 403]
    text = logs.text()
    for secret in (good, forged, basic, cookie, METRICS_TOKEN, good.split(".")[2], cookie[:40]):
        assert secret not in text


# -- the denial audit ----------------------------------------------------------------------------------


def test_every_gateway_refusal_is_audited_with_its_reason(
    client: httpx.Client, fake: FakeUpstream, logs: LogLines
) -> None:
    before = scrape(client)
    foreign = fake.add_experiment("globex", "theirs")
    viewer = bearer("acme", "alice", roles=["viewer"])
    acme = {"headers": ACME}
    cases: list[tuple[int, str, str, dict[str, Any]]] = [
        (401, "UNAUTHENTICATED", f"{API}/experiments/create", {"json": {"name": "x"}}),
        (403, "PERMISSION_DENIED", f"{API}/experiments/create", {"json": {"name": "x"}, "headers": viewer}),
        (403, "PERMISSION_DENIED", f"{API}/webhooks", {"json": {}, "headers": ACME}),  # deny by default
        (404, "RESOURCE_DOES_NOT_EXIST", f"{API}/experiments/delete", {"json": {"experiment_id": foreign}, **acme}),
        (413, "REQUEST_LIMIT_EXCEEDED", f"{API}/experiments/create", {"json": {"name": "x" * JSON_LIMIT}, **acme}),
        (400, "INVALID_PARAMETER_VALUE", f"{API}/experiments/create", {"content": b"[1]", "headers": ACME}),
    ]  # fmt: skip
    for status, code, url, kwargs in cases:
        rid, sent = headers(kwargs.pop("headers", {}))
        response = client.post(url, headers=sent, **kwargs)
        body = assert_mlflow_error(response, status, code)
        line = logs.access(rid)
        assert (line["status"], line["error_code"]) == (status, code)
        (denied,) = logs.denials(rid)
        assert denied["status"] == status and denied["error_code"] == code
        assert denied["reason"] == body["message"]
        assert denied["method"] == "POST" and denied["route"] == url and denied["path"] == url
        assert denied["tenant"] == ("-" if status == 401 else "acme")
        assert denied["user"] == (None if status == 401 else "alice")
    assert fake.forwarded("POST") == []  # the 404 was decided by an ownership look-up (a GET)
    after = scrape(client)
    for status, code, *_ in cases:
        expected = sum(1 for s, c, *_ in cases if (s, c) == (status, code))
        delta = after.value("gateway_denials_total", reason=code, status=str(status)) - before.value(
            "gateway_denials_total", reason=code, status=str(status)
        )
        assert delta == expected, (status, code)


def test_rate_limit_refusals_are_audited(
    start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream, logs: LogLines
) -> None:
    limited = start_gateway(rate_limit_tenant_rps=0.01, rate_limit_tenant_burst=1)
    experiment_id = fake.add_experiment("acme", "limited")
    statuses = []
    for _ in range(2):
        rid, sent = headers(ACME)
        statuses.append(limited.client.get(f"{API}/experiments/get?experiment_id={experiment_id}", headers=sent))
    assert [response.status_code for response in statuses] == [200, 429]
    line = logs.access(rid)
    assert (line["status"], line["error_code"], line["route"]) == (
        429,
        "REQUEST_LIMIT_EXCEEDED",
        f"{API}/experiments/get",
    )
    (denied,) = logs.denials(rid)
    assert (denied["status"], denied["tenant"], denied["user"]) == (429, "acme", "alice")
    assert denied["reason"] == statuses[1].json()["message"]


def test_errors_the_upstream_produced_are_not_denials(client: httpx.Client, fake: FakeUpstream, logs: LogLines) -> None:
    fake.on_mlflow("POST", "experiments/create", mlflow_error(400, "RESOURCE_ALREADY_EXISTS", "acme/dup exists"))
    rid, sent = headers(ACME)
    assert_mlflow_error(
        client.post(f"{API}/experiments/create", json={"name": "dup"}, headers=sent), 400, "RESOURCE_ALREADY_EXISTS"
    )
    line = logs.access(rid)
    assert (line["status"], line["error_code"], line["upstream_calls"]) == (400, None, 1)
    assert logs.denials(rid) == []


def test_upstream_failures_are_counted_by_kind_and_are_not_denials(
    start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream, logs: LogLines
) -> None:
    down = start_gateway(upstream_url=f"http://127.0.0.1:{closed_port()}", metrics_token=METRICS_TOKEN)
    rid, sent = headers(ACME)
    assert_mlflow_error(
        down.client.post(f"{API}/experiments/create", json={"name": "x"}, headers=sent), 503, "TEMPORARILY_UNAVAILABLE"
    )
    line = logs.access(rid)
    assert (line["error_code"], line["upstream_calls"]) == ("TEMPORARILY_UNAVAILABLE", 1)
    assert logs.denials(rid) == []

    slow = start_gateway(upstream_timeout=0.2, metrics_token=METRICS_TOKEN)
    fake.on("POST", f"{API}/experiments/create", Reply(200, {"experiment_id": "1"}, delay=0.6))
    rid, sent = headers(ACME)
    assert_mlflow_error(
        slow.client.post(f"{API}/experiments/create", json={"name": "x"}, headers=sent), 504, "DEADLINE_EXCEEDED"
    )
    assert logs.access(rid)["upstream_ms"] >= 150

    down_metrics, slow_metrics = scrape(down.client), scrape(slow.client)
    assert down_metrics.value("gateway_upstream_errors_total", kind="unavailable") == 1
    assert down_metrics.value("gateway_upstream_errors_total", kind="timeout") == 0
    assert slow_metrics.value("gateway_upstream_errors_total", kind="timeout") == 1
    assert slow_metrics.value("gateway_upstream_errors_total", kind="unavailable") == 0
    assert down_metrics.value("gateway_denials_total") == 0


def test_access_log_can_be_switched_off_but_the_audit_stays(
    start_gateway: Callable[..., GatewayUnderTest], logs: LogLines
) -> None:
    quiet = start_gateway(access_log=False)
    rid, sent = headers()
    assert quiet.client.post(f"{API}/runs/create", headers=sent).status_code == 401
    deadline = time.monotonic() + 5
    while not logs.denials(rid):
        assert time.monotonic() < deadline, "no audit record"
        time.sleep(0.005)
    assert logs.lines("gateway.access") == []


# -- metrics -------------------------------------------------------------------------------------------


def test_request_upstream_and_cache_metrics_move(client: httpx.Client, fake: FakeUpstream, logs: LogLines) -> None:
    experiment_id = fake.add_experiment("acme", "counted")
    route = f"{API}/experiments/get"
    labels = {"tenant": "acme", "route": route, "method": "GET", "status": "200"}
    before = scrape(client)
    for _ in range(2):
        rid, sent = headers(ACME)
        assert client.get(route, params={"experiment_id": experiment_id}, headers=sent).status_code == 200
        logs.access(rid)  # counted before the line is written
    rid, sent = headers()
    assert client.get(route, params={"experiment_id": experiment_id}, headers=sent).status_code == 401
    logs.access(rid)
    after = scrape(client)

    def delta(name: str, **wanted: str) -> float:
        return after.value(name, **wanted) - before.value(name, **wanted)

    assert delta("gateway_requests_total", **labels) == 2
    assert delta("gateway_requests_total", tenant="-", route=route, status="401") == 1
    assert delta("gateway_request_duration_seconds_count", route=route) == 3
    assert delta("gateway_upstream_request_duration_seconds_count") == len(fake.calls()) == 3  # 1 look-up, 2 gets
    assert delta("gateway_cache_requests_total", cache="experiment_tenant", result="miss") == 1
    assert delta("gateway_cache_requests_total", cache="experiment_tenant", result="hit") == 1
    assert after.value("gateway_in_flight_requests") == 1  # the scrape itself
    assert after.value("process_resident_memory_bytes") > 0


def test_metric_labels_stay_bounded(client: httpx.Client, fake: FakeUpstream, logs: LogLines) -> None:
    for index in range(5):
        rid, sent = headers(ACME)
        client.request("PROPFIND" if index == 0 else "GET", f"{API}/runs/{uuid.uuid4().hex}", headers=sent)
        logs.access(rid)
    metrics = scrape(client)
    templates = {route.template for route in ROUTES} | {"unmatched"}
    assert metrics.label_values("gateway_requests_total", "route") <= templates
    assert metrics.label_values("gateway_requests_total", "method") <= {
        "GET",
        "POST",
        "PUT",
        "PATCH",
        "DELETE",
        "HEAD",
        "OPTIONS",
        "other",
    }
    assert "other" in metrics.label_values("gateway_requests_total", "method")


# -- /metrics protection -------------------------------------------------------------------------------


def test_metrics_need_the_token_or_an_allowed_network(
    start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream, logs: LogLines
) -> None:
    fenced = start_gateway(metrics_token=METRICS_TOKEN, metrics_allow_networks=("10.0.0.0/8",))
    refusals: list[dict[str, str]] = [
        {},  # 127.0.0.1 is not in 10.0.0.0/8
        {"Authorization": f"Bearer {METRICS_TOKEN[:-1]}"},
        {"Authorization": f"Bearer {METRICS_TOKEN}{METRICS_TOKEN}"},
        {"Authorization": f"Basic {base64.b64encode(f'u:{METRICS_TOKEN}'.encode()).decode()}"},
        {"Authorization": f"Token {METRICS_TOKEN}"},
        bearer("acme", "alice"),  # a tenant's JWT never opens /metrics
        bearer("acme", "root", roles=["platform-admin"]),
    ]
    for attempt in refusals:
        rid, sent = headers(attempt)
        response = fenced.client.get("/metrics", headers=sent)
        assert_mlflow_error(response, 403, "PERMISSION_DENIED")
        assert "gateway_requests_total" not in response.text
        assert logs.access(rid)["route"] == "/metrics"
        (denied,) = logs.denials(rid)
        assert denied["error_code"] == "PERMISSION_DENIED"
    response = fenced.client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert response.headers["cache-control"] == "no-store"
    assert Scrape.parse(response.text).value("gateway_denials_total", reason="PERMISSION_DENIED") == len(refusals)
    fake.assert_untouched()  # never forwarded: the upstream's own metrics stay private


def test_metrics_from_loopback_by_default_but_never_with_a_wrong_credential(
    start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream
) -> None:
    gateway = start_gateway()  # no token: loopback only
    assert gateway.client.get("/metrics").status_code == 200
    assert_mlflow_error(gateway.client.get("/metrics", headers=ACME), 403, "PERMISSION_DENIED")
    assert_mlflow_error(gateway.client.get("/metrics", headers={"Authorization": "Bearer x"}), 403, "PERMISSION_DENIED")
    closed = start_gateway(metrics_allow_networks=())  # neither token nor network: nobody
    assert_mlflow_error(closed.client.get("/metrics"), 403, "PERMISSION_DENIED")
    # Other methods are not the metrics endpoint: authentication, then deny by default.
    assert_mlflow_error(gateway.client.post("/metrics"), 401, "UNAUTHENTICATED")
    assert_mlflow_error(gateway.client.post("/metrics", headers=ACME), 403, "PERMISSION_DENIED")
    fake.assert_untouched()


def test_metrics_speak_openmetrics_when_asked(start_gateway: Callable[..., GatewayUnderTest]) -> None:
    gateway = start_gateway()
    response = gateway.client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


def test_metrics_live_under_the_root_path(start_gateway: Callable[..., GatewayUnderTest]) -> None:
    gateway = start_gateway(root_path="/mlflow")
    assert gateway.client.get("/mlflow/metrics").status_code == 200
    assert gateway.client.get("/metrics").status_code == 404
