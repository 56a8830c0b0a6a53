from __future__ import annotations

import pytest

from gateway.policy.core import Deny
from gateway.policy.router import Route, RouteTable, normalise_template

HEX = "0123456789abcdef0123456789abcdef"
DENY = Deny("for the test")


def test_static_and_templated_matches() -> None:
    table = RouteTable(
        [
            Route("GET", "/a/b", DENY),
            Route("GET", "/traces/{trace_id}", DENY),
            Route("GET", "/files/{artifact_path:path}", DENY),
        ]
    )
    assert table.match("GET", "/a/b") is not None
    match = table.match("GET", f"/traces/tr-{HEX}")
    assert match is not None and match.params == {"trace_id": f"tr-{HEX}"}
    files = table.match("GET", "/files/1/abc/artifacts/x.txt")
    assert files is not None and files.params == {"artifact_path": "1/abc/artifacts/x.txt"}
    assert table.match("POST", "/a/b") is None


@pytest.mark.parametrize("trace_id", ["tr-z", "tr-" + HEX + "0", "../../x", "tr-" + HEX.upper(), ""])
def test_malformed_ids_do_not_match(trace_id: str) -> None:
    table = RouteTable([Route("GET", "/traces/{trace_id}", DENY)])
    assert table.match("GET", f"/traces/{trace_id}") is None


@pytest.mark.parametrize("template", ["/a b", "/caf\u00e9", "/a%2Fb", "/a?b", "/a#b"])
def test_a_static_route_that_would_need_percent_encoding_is_refused(template: str) -> None:
    # The gateway forwards a static route's path as it is, without quoting it.
    with pytest.raises(ValueError, match="percent-encoding"):
        RouteTable([Route("GET", template, DENY)])


@pytest.mark.parametrize("template", ["/a//b", "/a/./b", "/a/../b", "/a/."])
def test_a_static_route_that_is_not_a_canonical_path_is_refused(template: str) -> None:
    # A request path equal to a static template is taken without canonicalisation (match_static_raw).
    with pytest.raises(ValueError, match="not a canonical path"):
        RouteTable([Route("GET", template, DENY)])


def test_a_request_path_equal_to_a_static_template_matches_by_its_bytes_only() -> None:
    table = RouteTable([Route("GET", "/api/2.0/mlflow/runs/get", DENY), Route("GET", "/jobs/", DENY)])
    match = table.match_static_raw("GET", b"/api/2.0/mlflow/runs/get")
    assert match is not None and match is table.match("GET", "/api/2.0/mlflow/runs/get")
    assert table.match_static_raw("GET", b"/jobs/") is not None
    for other in (b"/api/2.0/mlflow/runs%2Fget", b"/api/2.0/mlflow/runs/ge%74", b"/api/2.0/mlflow//runs/get", b"/jobs"):
        assert table.match_static_raw("GET", other) is None  # these take the canonical path (and its checks)
    assert table.match_static_raw("POST", b"/api/2.0/mlflow/runs/get") is None


def test_duplicate_routes_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        RouteTable([Route("GET", "/a", DENY), Route("GET", "/a", DENY)])


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("/mlflow/traces/<request_id>/info", "/mlflow/traces/{}/info"),
        ("/files/<path:artifact_path>", "/files/{*}"),
        ("/files/{artifact_path:path}", "/files/{*}"),
        ("/gateway/{endpoint_name}/mlflow/invocations", "/gateway/{}/mlflow/invocations"),
    ],
)
def test_normalise_template(template: str, expected: str) -> None:
    assert normalise_template(template) == expected
