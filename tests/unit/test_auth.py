"""Credentials and token verification: only a verified token makes a Principal."""

from __future__ import annotations

import base64
import time

import jwt
import pytest

from gateway.auth.jwt import TokenVerifier
from gateway.auth.principal import is_valid_tenant_id
from gateway.errors import BadRequest, HeadersTooLarge, Unauthenticated
from gateway.middleware import MAX_TOKEN_BYTES, credential_from_headers
from tests.factories import SECRET, raw_token, token

OTHER_SECRET = "another-secret-that-is-long-enough-for-every-hmac-algorithm-0123456789"
VERIFIER = TokenVerifier(secret=SECRET, algorithms=("HS256",))


def _basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def test_bearer_and_basic_credentials() -> None:
    assert credential_from_headers([(b"authorization", b"Bearer abc.def.ghi")]) == "abc.def.ghi"
    assert credential_from_headers([(b"authorization", b"bearer   abc")]) == "abc"
    assert credential_from_headers([(b"authorization", _basic("anyone", "abc.def"))]) == "abc.def"
    assert credential_from_headers([(b"x-other", b"1")]) is None


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ([(b"authorization", b"Bearer a"), (b"authorization", b"Bearer b")], BadRequest),
        ([(b"authorization", b"Token abc")], Unauthenticated),
        ([(b"authorization", b"Bearer ")], Unauthenticated),
        ([(b"authorization", b"Basic !!!")], Unauthenticated),
        ([(b"authorization", _basic("user", ""))], Unauthenticated),
        ([(b"authorization", b"Basic " + base64.b64encode(b"nocolon"))], Unauthenticated),
        ([(b"authorization", b"Bearer " + b"a" * (MAX_TOKEN_BYTES + 100))], HeadersTooLarge),
    ],
)
def test_bad_credentials(headers: list[tuple[bytes, bytes]], error: type[Exception]) -> None:
    with pytest.raises(error):
        credential_from_headers(headers)


def test_valid_token_gives_principal() -> None:
    principal = VERIFIER.verify(token("acme", "alice", roles=["admin"], job="job-7"))
    assert (principal.tenant, principal.user, principal.job) == ("acme", "alice", "job-7")
    assert principal.has_role("admin") and not principal.has_role("viewer")


@pytest.mark.parametrize(
    "bad",
    [
        raw_token({"tenant_id": "acme", "sub": "a"}, secret=OTHER_SECRET),
        raw_token({"tenant_id": "acme", "sub": "a", "exp": int(time.time()) - 3600}),
        raw_token({"tenant_id": "acme", "sub": "a"}, algorithm="HS512"),
        jwt.encode({"tenant_id": "acme", "sub": "a"}, SECRET, algorithm="HS256"),  # no exp
        jwt.encode({"tenant_id": "acme", "sub": "a", "exp": int(time.time()) + 60}, None, algorithm="none"),
        raw_token({"sub": "a"}),
        raw_token({"tenant_id": "acme"}),
        raw_token({"tenant_id": "acme", "sub": "a", "roles": "admin", "job_id": 7}),
        "not-a-token",
    ],
)
def test_invalid_tokens_are_refused(bad: str) -> None:
    with pytest.raises(Unauthenticated):
        VERIFIER.verify(bad)


@pytest.mark.parametrize("tenant", ["acm_", "acme%", "Acme", "a/b", "a.b", "", "-acme", "acme-", "a" * 64, "acme "])
def test_unsafe_tenant_ids_are_refused(tenant: str) -> None:
    assert not is_valid_tenant_id(tenant)
    with pytest.raises(Unauthenticated, match="tenant_id"):
        VERIFIER.verify(raw_token({"tenant_id": tenant, "sub": "a"}))


@pytest.mark.parametrize("tenant", ["acme", "a", "team-42", "0"])
def test_safe_tenant_ids(tenant: str) -> None:
    assert is_valid_tenant_id(tenant)


def test_issuer_and_audience_are_checked_when_configured() -> None:
    verifier = TokenVerifier(secret=SECRET, algorithms=("HS256",), issuer="https://idp", audience="mlflow")
    good = raw_token({"tenant_id": "acme", "sub": "a", "iss": "https://idp", "aud": "mlflow"})
    assert verifier.verify(good).issuer == "https://idp"
    for claims in (
        {"tenant_id": "acme", "sub": "a", "aud": "mlflow"},
        {"tenant_id": "acme", "sub": "a", "iss": "https://evil", "aud": "mlflow"},
        {"tenant_id": "acme", "sub": "a", "iss": "https://idp", "aud": "other"},
    ):
        with pytest.raises(Unauthenticated):
            verifier.verify(raw_token(claims))
