"""Credentials and token verification: only a verified token makes a Principal.

Every attack of the auth issue is attempted here and must be refused.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import gateway.auth.jwt as jwt_module
from gateway.auth.jwt import Authenticator, IssuerVerifier
from gateway.auth.keys import JwksKeys, OidcKeys, StaticKey
from gateway.auth.principal import access_level, is_valid_tenant_id
from gateway.errors import BadRequest, HeadersTooLarge, PermissionDenied, Unauthenticated
from gateway.middleware import credential_from_headers
from gateway.settings import IssuerSettings, Settings
from tests.factories import SECRET, raw_token, token

OTHER_SECRET = "another-secret-that-is-long-enough-for-every-hmac-algorithm-0123456789"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_KEY_2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_PUBLIC_PEM = (
    RSA_KEY.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)
CLAIMS = {"tenant_id": "acme", "sub": "alice"}


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def _hs_authenticator(**config: Any) -> Authenticator:
    settings = Settings(upstream_url="http://x:1", jwt_secret=SECRET, **config)
    return Authenticator.from_settings(settings)


def _verify(authenticator: Authenticator, token_: str) -> Any:
    return _run(authenticator.authenticate(token_))


def _rs_token(
    claims: dict[str, Any], *, key: Any = RSA_KEY, kid: str | None = "k1", alg: str = "RS256", **kw: Any
) -> str:
    headers = {"kid": kid} if kid else {}
    headers.update(kw.pop("headers", {}))
    return jwt.encode({"exp": int(time.time()) + 3600, **claims}, key, algorithm=alg, headers=headers, **kw)


def _jwk(key: Any, kid: str, alg: str = "RS256") -> dict[str, Any]:
    algorithm = jwt.algorithms.RSAAlgorithm if alg.startswith("RS") else jwt.algorithms.ECAlgorithm
    return {**json.loads(algorithm.to_jwk(key.public_key())), "kid": kid, "alg": alg, "use": "sig"}


class FakeFetcher:
    """An in-memory document server that counts fetches per URL."""

    def __init__(self, documents: dict[str, Any]) -> None:
        self.documents = documents
        self.calls: list[str] = []

    async def __call__(self, url: str) -> Any:
        self.calls.append(url)
        await asyncio.sleep(0.01)
        if url not in self.documents:
            raise OSError(f"{url}: 404")
        return self.documents[url]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- credentials ---------------------------------------------------------------------------------------


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
        ([(b"authorization", b"Bearer " + b"a" * (9 * 1024))], HeadersTooLarge),
    ],
)
def test_bad_credentials(headers: list[tuple[bytes, bytes]], error: type[Exception]) -> None:
    with pytest.raises(error):
        credential_from_headers(headers)


# -- HS secret ----------------------------------------------------------------------------------------


def test_valid_token_gives_principal() -> None:
    principal = _verify(_hs_authenticator(), token("acme", "alice", roles=["admin"], job="job-7"))
    assert (principal.tenant, principal.user, principal.job) == ("acme", "alice", "job-7")
    assert principal.has_role("admin") and not principal.has_role("viewer")
    assert access_level(principal) == 3


def test_oversized_token_is_refused() -> None:
    big = raw_token({**CLAIMS, "pad": "x" * 9000})
    with pytest.raises(HeadersTooLarge):
        _verify(_hs_authenticator(), big)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (raw_token(CLAIMS, secret=OTHER_SECRET), "signature"),
        (raw_token({**CLAIMS, "exp": int(time.time()) - 3600}), "expired"),
        (raw_token(CLAIMS, algorithm="HS512"), "algorithm"),
        (jwt.encode(CLAIMS, SECRET, algorithm="HS256"), "'exp'"),
        (jwt.encode({**CLAIMS, "exp": int(time.time()) + 60}, None, algorithm="none"), "algorithm"),
        (raw_token({"tenant_id": "acme"}), "user claim"),
        (raw_token({**CLAIMS, "roles": {"a": 1}}), "roles"),
        (raw_token({**CLAIMS, "job_id": 7}), "job_id"),
        (raw_token({**CLAIMS, "nbf": int(time.time()) + 3600}), "not valid yet"),
        ("not-a-token", "malformed"),
        ("a.b.c", "malformed"),
    ],
)
def test_invalid_tokens_are_refused(bad: str, reason: str) -> None:
    with pytest.raises(Unauthenticated, match=reason):
        _verify(_hs_authenticator(), bad)


def test_tampered_signature_and_payload_are_refused() -> None:
    good = token("acme", "alice")
    header, payload, signature = good.split(".")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    forged_payload = base64.urlsafe_b64encode(
        json.dumps({**jwt.decode(good, options={"verify_signature": False}), "tenant_id": "globex"}).encode()
    ).rstrip(b"=")
    for bad in (f"{header}.{payload}.{flipped}", f"{header}.{forged_payload.decode()}.{signature}"):
        with pytest.raises(Unauthenticated):
            _verify(_hs_authenticator(), bad)


def test_leeway_is_honoured() -> None:
    inside = raw_token({**CLAIMS, "exp": int(time.time()) - 10})
    beyond = raw_token({**CLAIMS, "exp": int(time.time()) - 100})
    assert _verify(_hs_authenticator(), inside).tenant == "acme"
    with pytest.raises(Unauthenticated, match="expired"):
        _verify(_hs_authenticator(), beyond)
    with pytest.raises(Unauthenticated, match="expired"):
        _verify(_hs_authenticator(jwt_leeway_seconds=0), inside)


@pytest.mark.parametrize("tenant", ["acm_", "acme%", "a/b", "a.b", "", "-acme", "acme-", "a" * 64, "ac me"])
def test_unsafe_tenant_ids_are_refused_with_403(tenant: str) -> None:
    assert not is_valid_tenant_id(tenant)
    with pytest.raises(PermissionDenied, match="tenant"):
        _verify(_hs_authenticator(), raw_token({"tenant_id": tenant, "sub": "a"}))


def test_missing_tenant_is_403_and_tenant_is_lower_cased() -> None:
    with pytest.raises(PermissionDenied, match="tenant"):
        _verify(_hs_authenticator(), raw_token({"sub": "a"}))
    assert _verify(_hs_authenticator(), raw_token({"tenant_id": "ACME", "sub": "a"})).tenant == "acme"


@pytest.mark.parametrize("tenant", ["acme", "a", "team-42", "0"])
def test_safe_tenant_ids(tenant: str) -> None:
    assert is_valid_tenant_id(tenant)


def test_issuer_and_audience_are_checked_when_configured() -> None:
    authenticator = _hs_authenticator(jwt_issuer="https://idp", jwt_audience="mlflow")
    good = raw_token({**CLAIMS, "iss": "https://idp", "aud": "mlflow"})
    assert _verify(authenticator, good).issuer == "https://idp"
    for claims, reason in (
        ({**CLAIMS, "aud": "mlflow"}, "'iss'"),
        ({**CLAIMS, "iss": "https://idp"}, "'aud'"),
        ({**CLAIMS, "iss": "https://evil", "aud": "mlflow"}, "issuer"),
        ({**CLAIMS, "iss": "https://idp", "aud": "other"}, "audience"),
    ):
        with pytest.raises(Unauthenticated, match=reason):
            _verify(authenticator, raw_token(claims))


def test_claim_mapping() -> None:
    authenticator = _hs_authenticator(
        tenant_claim="https://example.com/tenant", user_claim="preferred_username", roles_claim="realm_access.roles",
        job_claim="ci_job",
    )  # fmt: skip
    claims = {
        "https://example.com/tenant": "Acme",
        "preferred_username": "alice",
        "realm_access": {"roles": ["viewer", "offline_access"]},
        "ci_job": "build-9",
    }
    principal = _verify(authenticator, raw_token(claims))
    assert (principal.tenant, principal.user, principal.job) == ("acme", "alice", "build-9")
    assert principal.roles == frozenset({"viewer", "offline_access"}) and access_level(principal) == 1
    # user falls back to email; roles may be a space-separated string
    fallback = _verify(_hs_authenticator(), raw_token({"tenant_id": "acme", "email": "a@x", "roles": "viewer admin"}))
    assert fallback.user == "a@x" and fallback.roles == frozenset({"viewer", "admin"})


def test_platform_admin_needs_no_tenant() -> None:
    principal = _verify(_hs_authenticator(), raw_token({"sub": "root", "roles": ["platform-admin"]}))
    assert principal.platform_admin and principal.tenant == ""
    custom = _hs_authenticator(platform_admin_role="ops")
    assert _verify(custom, raw_token({"sub": "root", "roles": ["ops"]})).platform_admin
    with pytest.raises(PermissionDenied):
        _verify(custom, raw_token({"sub": "root", "roles": ["platform-admin"]}))


def test_verified_tokens_are_cached_but_never_past_expiry() -> None:
    authenticator = _hs_authenticator()
    now = time.time()
    short = raw_token({**CLAIMS, "exp": int(now) + 5})
    long = raw_token({**CLAIMS, "exp": int(now) + 3600})
    assert _verify(authenticator, short).tenant == "acme" and _verify(authenticator, long).tenant == "acme"
    until = sorted(entry[1] for entry in authenticator._verified.values())
    assert until[0] == int(now) + 5  # a short-lived token is cached until its own exp
    assert until[1] <= now + 61  # a long-lived one for at most a minute
    clock = Clock()
    clock.now = int(now) + 6
    authenticator._clock = clock
    for principal, _expires in authenticator._verified.values():
        assert principal.tenant == "acme"
    assert authenticator._verified.get(next(iter(authenticator._verified)))[1] < clock.now  # type: ignore[index]


def test_recently_verified_answers_only_a_verified_unexpired_token() -> None:
    authenticator = _hs_authenticator()
    clock = Clock()
    clock.now = time.time()
    authenticator._clock = clock
    short = raw_token({**CLAIMS, "exp": int(clock.now) + 5})
    assert authenticator.recently_verified(short) is None  # never verified: the caller must verify it
    assert _verify(authenticator, short).tenant == "acme"
    cached = authenticator.recently_verified(short)
    assert cached is not None and cached.tenant == "acme" and cached.user == "alice"
    assert authenticator.recently_verified(short + "x") is None  # another token, not a prefix match
    clock.now += 6  # past the token's exp
    assert authenticator.recently_verified(short) is None
    huge = "x" * 100_000
    assert authenticator.recently_verified(huge) is None
    with pytest.raises(HeadersTooLarge):
        _verify(authenticator, huge)


def test_verified_token_cache_is_bounded_by_count_and_by_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only verified tokens enter the cache, and the oldest leave it first once either bound is passed."""
    authenticator = _hs_authenticator()
    tokens = [raw_token({**CLAIMS, "sub": f"user-{i}", "pad": "p" * 600}) for i in range(6)]
    size = len(tokens[0])
    assert all(len(each) == size for each in tokens)
    monkeypatch.setattr(jwt_module, "VERIFIED_CACHE_BYTES", 3 * size)
    for each in tokens[:4]:
        _verify(authenticator, each)
    assert list(authenticator._verified) == tokens[1:4]  # 4 tokens exceed 3 tokens' bytes: the oldest left
    assert authenticator._verified_bytes == 3 * size
    _verify(authenticator, tokens[3])  # verified again: refreshed, not counted twice
    assert authenticator._verified_bytes == 3 * size and list(authenticator._verified)[-1] == tokens[3]
    monkeypatch.setattr(jwt_module, "VERIFIED_CACHE_SIZE", 2)
    _verify(authenticator, tokens[4])
    assert list(authenticator._verified) == [tokens[3], tokens[4]]
    assert authenticator._verified_bytes == 2 * size
    with pytest.raises(Unauthenticated):
        _verify(authenticator, tokens[5][:-3] + "AAA")  # a bad signature is never cached
    assert list(authenticator._verified) == [tokens[3], tokens[4]]


# -- public keys: HS/RS confusion, PEM ----------------------------------------------------------------


def _rs_authenticator(keys: Any, algorithms: tuple[str, ...] = ("RS256",), **config: Any) -> Authenticator:
    issuer = IssuerSettings(name="default", algorithms=algorithms, **config)
    return Authenticator([IssuerVerifier(issuer, keys, platform_admin_role="platform-admin")])


def test_pem_public_key_verifies_rs256() -> None:
    authenticator = _rs_authenticator(StaticKey.public_key(RSA_PUBLIC_PEM), public_key=RSA_PUBLIC_PEM)
    assert _verify(authenticator, _rs_token(CLAIMS)).tenant == "acme"
    with pytest.raises(Unauthenticated, match="signature"):
        _verify(authenticator, _rs_token(CLAIMS, key=RSA_KEY_2))


def test_hs_token_signed_with_the_public_key_is_refused() -> None:
    """The classic confusion: an attacker HMAC-signs with the (public) PEM as secret."""
    authenticator = _rs_authenticator(StaticKey.public_key(RSA_PUBLIC_PEM), public_key=RSA_PUBLIC_PEM)
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
    payload = base64.urlsafe_b64encode(json.dumps({**CLAIMS, "exp": int(time.time()) + 60}).encode()).rstrip(b"=")
    import hashlib
    import hmac

    signature = hmac.new(RSA_PUBLIC_PEM.encode(), header + b"." + payload, hashlib.sha256).digest()
    forged = b".".join([header, payload, base64.urlsafe_b64encode(signature).rstrip(b"=")]).decode()
    with pytest.raises(Unauthenticated, match="algorithm"):
        _verify(authenticator, forged)


def test_rs_token_against_an_hs_issuer_is_refused() -> None:
    with pytest.raises(Unauthenticated, match="algorithm"):
        _verify(_hs_authenticator(), _rs_token(CLAIMS))


# -- JWKS ---------------------------------------------------------------------------------------------

JWKS_URL = "http://127.0.0.1:1/jwks"


def _jwks_authenticator(documents: dict[str, Any], clock: Clock, **kw: Any) -> tuple[Authenticator, FakeFetcher]:
    fetcher = FakeFetcher(documents)
    keys = JwksKeys(JWKS_URL, ttl_seconds=300, cooldown_seconds=10, fetch=fetcher, clock=clock)
    return _rs_authenticator(keys, ("RS256", "ES256"), jwks_url=JWKS_URL, **kw), fetcher


def test_jwks_verifies_by_kid_and_caches() -> None:
    clock = Clock()
    documents = {JWKS_URL: {"keys": [_jwk(RSA_KEY, "k1"), _jwk(EC_KEY, "e1", "ES256")]}}
    authenticator, fetcher = _jwks_authenticator(documents, clock)
    assert _verify(authenticator, _rs_token(CLAIMS)).tenant == "acme"
    assert _verify(authenticator, _rs_token({**CLAIMS, "sub": "bob"}, key=EC_KEY, kid="e1", alg="ES256")).user == "bob"
    assert _verify(authenticator, _rs_token({**CLAIMS, "sub": "carol"})).user == "carol"
    assert len(fetcher.calls) == 1
    clock.now += 301  # TTL passed: one refresh
    assert _verify(authenticator, _rs_token({**CLAIMS, "sub": "dave"})).user == "dave"
    assert len(fetcher.calls) == 2


def test_unknown_kid_flood_costs_one_fetch_per_window() -> None:
    clock = Clock()
    authenticator, fetcher = _jwks_authenticator({JWKS_URL: {"keys": [_jwk(RSA_KEY, "k1")]}}, clock)
    assert _verify(authenticator, _rs_token(CLAIMS)).tenant == "acme"

    async def flood() -> list[BaseException | Any]:
        tokens = [_rs_token({**CLAIMS, "n": i}, kid=f"random-{i}") for i in range(50)]
        return await asyncio.gather(*(authenticator.authenticate(t) for t in tokens), return_exceptions=True)

    clock.now += 11  # outside the cooldown: the flood may cause one refetch, shared by all
    results = _run(flood())
    assert all(isinstance(result, Unauthenticated) for result in results)
    assert len(fetcher.calls) == 2


def test_rotation_accepts_a_new_kid_immediately_and_drops_a_removed_one() -> None:
    clock = Clock()
    documents = {JWKS_URL: {"keys": [_jwk(RSA_KEY, "k1")]}}
    authenticator, fetcher = _jwks_authenticator(documents, clock)
    old = _rs_token(CLAIMS)
    assert _verify(authenticator, old).tenant == "acme"
    # The IdP publishes k2 next to k1 and starts signing with it right away (before our TTL expires).
    documents[JWKS_URL] = {"keys": [_jwk(RSA_KEY, "k1"), _jwk(RSA_KEY_2, "k2")]}
    clock.now += 15
    assert _verify(authenticator, _rs_token({**CLAIMS, "sub": "new"}, key=RSA_KEY_2, kid="k2")).user == "new"
    assert _verify(authenticator, _rs_token({**CLAIMS, "sub": "old"})).user == "old"  # k1 still published
    # k1 is removed; after the next refresh, fresh k1 tokens are refused.
    documents[JWKS_URL] = {"keys": [_jwk(RSA_KEY_2, "k2")]}
    clock.now += 301
    with pytest.raises(Unauthenticated, match="unknown key"):
        _verify(authenticator, _rs_token({**CLAIMS, "sub": "late"}))
    assert len(fetcher.calls) >= 3


def test_new_kid_inside_the_cooldown_waits_instead_of_failing() -> None:
    documents = {JWKS_URL: {"keys": [_jwk(RSA_KEY, "k1")]}}
    fetcher = FakeFetcher(documents)
    keys = JwksKeys(JWKS_URL, ttl_seconds=300, cooldown_seconds=0.3, fetch=fetcher)
    authenticator = _rs_authenticator(keys, jwks_url=JWKS_URL)
    assert _verify(authenticator, _rs_token(CLAIMS)).tenant == "acme"
    documents[JWKS_URL] = {"keys": [_jwk(RSA_KEY, "k1"), _jwk(RSA_KEY_2, "k2")]}
    started = time.monotonic()
    assert _verify(authenticator, _rs_token(CLAIMS, key=RSA_KEY_2, kid="k2")).tenant == "acme"
    assert time.monotonic() - started < 2
    assert len(fetcher.calls) == 2


def test_jwks_outage_keeps_the_known_keys() -> None:
    clock = Clock()
    documents = {JWKS_URL: {"keys": [_jwk(RSA_KEY, "k1")]}}
    authenticator, _ = _jwks_authenticator(documents, clock)
    assert _verify(authenticator, _rs_token(CLAIMS)).tenant == "acme"
    del documents[JWKS_URL]
    clock.now += 301
    assert _verify(authenticator, _rs_token({**CLAIMS, "sub": "still"})).user == "still"


def test_jku_x5u_and_embedded_jwk_headers_are_ignored() -> None:
    clock = Clock()
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    documents = {JWKS_URL: {"keys": [_jwk(RSA_KEY, "k1")]}, "http://evil/jwks": {"keys": [_jwk(attacker, "k1")]}}
    authenticator, fetcher = _jwks_authenticator(documents, clock)
    forged = _rs_token(
        CLAIMS,
        key=attacker,
        headers={"jku": "http://evil/jwks", "x5u": "http://evil/cert", "jwk": _jwk(attacker, "k1")},
    )
    with pytest.raises(Unauthenticated, match="signature"):
        _verify(authenticator, forged)
    assert all(call == JWKS_URL for call in fetcher.calls)


def test_symmetric_keys_in_a_jwks_are_never_used() -> None:
    clock = Clock()
    oct_key = {"kty": "oct", "kid": "h1", "k": base64.urlsafe_b64encode(b"x" * 32).decode().rstrip("=")}
    authenticator, _ = _jwks_authenticator({JWKS_URL: {"keys": [oct_key, _jwk(RSA_KEY, "k1")]}}, clock)
    hs = jwt.encode({**CLAIMS, "exp": int(time.time()) + 60}, b"x" * 32, algorithm="HS256", headers={"kid": "h1"})
    with pytest.raises(Unauthenticated):
        _verify(authenticator, hs)


# -- OIDC discovery and several issuers ---------------------------------------------------------------


def test_oidc_discovery_finds_the_jwks() -> None:
    issuer = "http://127.0.0.1:1/realms/acme"
    fetcher = FakeFetcher(
        {
            f"{issuer}/.well-known/openid-configuration": {"issuer": issuer, "jwks_uri": JWKS_URL},
            JWKS_URL: {"keys": [_jwk(RSA_KEY, "k1")]},
        }
    )
    keys = OidcKeys(issuer, fetch=fetcher)
    authenticator = _rs_authenticator(keys, oidc_issuer=issuer)
    assert _verify(authenticator, _rs_token({**CLAIMS, "iss": issuer})).issuer == issuer
    with pytest.raises(Unauthenticated, match="'iss'"):
        _verify(authenticator, _rs_token(CLAIMS))
    assert fetcher.calls == [f"{issuer}/.well-known/openid-configuration", JWKS_URL]


def test_oidc_discovery_naming_another_issuer_is_ignored() -> None:
    issuer = "http://127.0.0.1:1/realms/acme"
    fetcher = FakeFetcher(
        {f"{issuer}/.well-known/openid-configuration": {"issuer": "http://evil", "jwks_uri": JWKS_URL}}
    )
    authenticator = _rs_authenticator(OidcKeys(issuer, fetch=fetcher), oidc_issuer=issuer)
    with pytest.raises(Unauthenticated, match="unavailable"):
        _verify(authenticator, _rs_token({**CLAIMS, "iss": issuer}))


def test_several_issuers_each_with_their_own_keys_and_claims() -> None:
    first = IssuerSettings(name="a", algorithms=("HS256",), secret=SECRET, issuer="https://a")
    second = IssuerSettings(
        name="b", algorithms=("RS256",), public_key=RSA_PUBLIC_PEM, issuer="https://b", tenant_claim="org"
    )
    authenticator = Authenticator(
        [
            IssuerVerifier(first, StaticKey.secret(SECRET), platform_admin_role="platform-admin"),
            IssuerVerifier(second, StaticKey.public_key(RSA_PUBLIC_PEM), platform_admin_role="platform-admin"),
        ]
    )
    assert _verify(authenticator, raw_token({**CLAIMS, "iss": "https://a"})).issuer == "https://a"
    assert _verify(authenticator, _rs_token({"org": "globex", "sub": "b", "iss": "https://b"})).tenant == "globex"
    for bad in (
        raw_token({**CLAIMS, "iss": "https://b"}),  # HS token claiming the RS issuer
        _rs_token({**CLAIMS, "iss": "https://a"}),  # RS token claiming the HS issuer
        raw_token({**CLAIMS, "iss": "https://c"}),
        raw_token(CLAIMS),
    ):
        with pytest.raises(Unauthenticated):
            _verify(authenticator, bad)
