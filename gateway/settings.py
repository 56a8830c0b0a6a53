"""Typed settings from ``GATEWAY_*`` environment variables and an optional TOML file.

Precedence: command-line flag > environment variable > TOML file > default. Every problem is
collected and reported together in one :class:`SettingsError`, so a misconfigured deployment fails at
start-up with one message that lists everything to fix.

Token issuers: the ``GATEWAY_JWT_*`` / ``GATEWAY_JWKS_URL`` / ``GATEWAY_OIDC_ISSUER`` variables (and the
same names at the top of the TOML file) describe the primary issuer; ``[[gateway.issuers]]`` tables in
the TOML file add more, each with its own keys, audience and claim mapping.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.auth.principal import is_valid_tenant_id
from gateway.observability import ACCESS_LOG_FLUSH_SECONDS

ENV_PREFIX = "GATEWAY_"
# RFC 7518 §3.2: an HMAC key at least as long as the hash output.
MIN_HS_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
HMAC_ALGORITHMS = frozenset(MIN_HS_SECRET_BYTES)
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class SettingsError(ValueError):
    """Invalid settings: ``problems`` lists every one of them."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid gateway settings:\n" + "\n".join(f"  - {problem}" for problem in problems))


@dataclass(frozen=True)
class IssuerSettings:
    """One token issuer: exactly one key source, its algorithms, audience and claim mapping."""

    name: str
    algorithms: tuple[str, ...]
    secret: str | None = field(default=None, repr=False)
    public_key: str | None = field(default=None, repr=False)
    jwks_url: str | None = None
    oidc_issuer: str | None = None
    issuer: str | None = None
    audience: str | None = None
    leeway_seconds: int = 30
    tenant_claim: str = "tenant_id"
    user_claim: str = "sub"
    roles_claim: str = "roles"
    job_claim: str = "job_id"

    @property
    def expected_issuer(self) -> str | None:
        """The ``iss`` tokens must carry: the configured one, else the OIDC issuer."""
        return self.issuer or self.oidc_issuer


@dataclass(frozen=True)
class Settings:
    """Everything the gateway process is configured with. Documented in the README."""

    upstream_url: str
    jwt_secret: str | None = field(default=None, repr=False)
    jwt_public_key: str | None = field(default=None, repr=False)
    jwt_public_key_file: str | None = None
    jwks_url: str | None = None
    oidc_issuer: str | None = None
    jwt_algorithms: tuple[str, ...] | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway_seconds: int = 30
    tenant_claim: str = "tenant_id"
    user_claim: str = "sub"
    roles_claim: str = "roles"
    job_claim: str = "job_id"
    platform_admin_role: str = "platform-admin"
    jwks_cache_seconds: int = 300
    jwks_refetch_cooldown_seconds: int = 10
    extra_issuers: tuple[IssuerSettings, ...] = ()
    artifacts_destination: str | None = None
    artifacts_mode: str = "proxy"
    s3_public_endpoint_url: str | None = None
    presigned_url_ttl_seconds: int = 300
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 10 * 1024 * 1024 * 1024
    max_json_body_bytes: int = 16 * 1024 * 1024
    upstream_connect_timeout: float = 5.0
    upstream_timeout: float = 120.0
    upstream_pool_size: int = 100
    # Graceful shutdown (gateway/serving.py): on SIGTERM, /ready answers 503 and the port keeps accepting
    # for ``drain_delay_seconds`` (load balancers stop sending), then in-flight requests get up to
    # ``shutdown_grace_seconds`` to finish. ``workers``: processes of `serve` sharing the port.
    drain_delay_seconds: float = 0.0
    shutdown_grace_seconds: float = 30.0
    workers: int = 1
    cache_size: int = 100_000
    log_level: str = "info"
    # Observability (gateway/observability.py, gateway/metrics.py): one JSON line per request on the
    # gateway.access logger; who may read GET /metrics: the bearer token, or requests without an
    # Authorization header from these networks (loopback only by default).
    access_log: bool = True
    # Access lines are written in batches, at most this long after their request (0: each line at once).
    access_log_flush_seconds: float = ACCESS_LOG_FLUSH_SECONDS
    metrics_token: str | None = field(default=None, repr=False)
    metrics_allow_networks: tuple[str, ...] = ("127.0.0.1/32", "::1/128")
    # Web UI login (gateway/ui.py): the key session cookies are encrypted with (None: no UI login),
    # plain-HTTP development cookies (no ``Secure`` flag), and the path prefix the gateway is served under.
    session_secret: str | None = field(default=None, repr=False)
    ui_insecure_cookies: bool = False
    root_path: str = ""
    # Browser login through an OpenID Connect provider (gateway/auth/oidc_login.py): the gateway's client
    # at GATEWAY_OIDC_ISSUER (no secret: a public client, PKCE only), its callback URL, the scopes asked
    # for and the name on the login button (default: the issuer's host). No client id: token login only.
    oidc_client_id: str | None = None
    oidc_client_secret: str | None = field(default=None, repr=False)
    oidc_redirect_url: str | None = None
    oidc_scopes: tuple[str, ...] = ("openid", "profile", "email")
    oidc_provider_name: str | None = None
    # Rate limits (gateway/limits.py): token buckets per tenant and per user within a tenant, ``rps``
    # refill per second (0: off), ``burst`` capacity (0: max(1, ceil(2 * rps))); per-tenant overrides as
    # (tenant, rps, burst). With a Redis URL the buckets are shared by every replica, else per replica.
    rate_limit_tenant_rps: float = 0.0
    rate_limit_tenant_burst: int = 0
    rate_limit_user_rps: float = 0.0
    rate_limit_user_burst: int = 0
    rate_limit_tenant_overrides: tuple[tuple[str, float, int], ...] = ()
    redis_url: str | None = field(default=None, repr=False)  # may carry a password

    @property
    def upstream_host(self) -> str:
        """``host:port`` of the upstream, for the ``Host`` header MLflow's host allow-list checks."""
        return urlsplit(self.upstream_url).netloc

    def issuers(self) -> tuple[IssuerSettings, ...]:
        """Every configured issuer: the primary one (from the flat settings) first, if it has a key."""
        public_key = self.jwt_public_key
        if public_key is None and self.jwt_public_key_file:
            public_key = Path(self.jwt_public_key_file).read_text(encoding="utf-8")
        has_key = any((self.jwt_secret, public_key, self.jwks_url, self.oidc_issuer))
        if not has_key:
            return self.extra_issuers
        primary = IssuerSettings(
            name="default",
            algorithms=self.jwt_algorithms or (("HS256",) if self.jwt_secret else ("RS256",)),
            secret=self.jwt_secret,
            public_key=public_key,
            jwks_url=self.jwks_url,
            oidc_issuer=self.oidc_issuer,
            issuer=self.jwt_issuer,
            audience=self.jwt_audience,
            leeway_seconds=self.jwt_leeway_seconds,
            tenant_claim=self.tenant_claim,
            user_claim=self.user_claim,
            roles_claim=self.roles_claim,
            job_claim=self.job_claim,
        )
        return (primary, *self.extra_issuers)


@dataclass(frozen=True)
class _Spec:
    name: str
    parse: Callable[[Any], Any]


def _as_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("must be an integer")
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"must be an integer, got {value!r}") from None


def _as_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("must be a number")
    try:
        return float(str(value).strip())
    except ValueError:
        raise ValueError(f"must be a number, got {value!r}") from None


def _as_str_tuple(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [item.strip() for item in value.split(",")]
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        items = [item.strip() for item in value]
    else:
        raise ValueError("must be a comma-separated string or a list of strings")
    return tuple(item for item in items if item)


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"must be true or false, got {value!r}")


def _as_root_path(value: Any) -> str:
    """``/prefix`` without a trailing slash; ``""`` or ``/`` mean no prefix."""
    text = _as_str(value).strip().rstrip("/")
    if text and (not text.startswith("/") or any(c in text for c in "?#%\\ ") or "//" in text):
        raise ValueError(f"must be a path like /mlflow, got {value!r}")
    return text


def _as_tenant_rates(value: Any) -> tuple[tuple[str, float, int], ...]:
    """``tenant=rps[:burst]`` entries (comma-separated, a TOML list, or a TOML table); every bad entry is named."""
    if isinstance(value, str):
        entries = value.split(",")
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        entries = list(value)
    elif isinstance(value, dict):
        entries = [f"{tenant}={spec}" for tenant, spec in value.items()]
    else:
        raise ValueError("must be 'tenant=rps[:burst],...' (a string, a list of strings or a table)")
    rates: list[tuple[str, float, int]] = []
    bad: list[str] = []
    for raw in (entry.strip() for entry in entries):
        if not raw:
            continue
        tenant, _, spec = (part.strip() for part in raw.partition("="))
        rps_text, _, burst_text = (part.strip() for part in spec.partition(":"))
        try:
            rps = float(rps_text)
            burst = int(burst_text) if burst_text else 0
        except ValueError:
            bad.append(f"{raw!r} (expected tenant=rps or tenant=rps:burst, numbers)")
            continue
        if not is_valid_tenant_id(tenant):
            bad.append(f"{raw!r} (not a valid tenant id)")
        elif any(tenant == seen for seen, _, _ in rates):
            bad.append(f"{raw!r} (tenant given twice)")
        elif not math.isfinite(rps) or rps < 0 or burst < 0:
            bad.append(f"{raw!r} (rps and burst must be finite and not negative)")
        else:
            rates.append((tenant, rps, burst))
    if bad:
        raise ValueError("bad entries: " + "; ".join(bad))
    return tuple(rates)


def _as_scopes(value: Any) -> tuple[str, ...]:
    """OAuth scopes: separated by spaces or commas, or a list."""
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    return _as_str_tuple(value)


def _optional_str(value: Any) -> str | None:
    text = _as_str(value).strip()
    return text or None


_SPECS: tuple[_Spec, ...] = (
    _Spec("upstream_url", _as_str),
    _Spec("jwt_secret", _optional_str),
    _Spec("jwt_public_key", _optional_str),
    _Spec("jwt_public_key_file", _optional_str),
    _Spec("jwks_url", _optional_str),
    _Spec("oidc_issuer", _optional_str),
    _Spec("jwt_algorithms", _as_str_tuple),
    _Spec("jwt_issuer", _optional_str),
    _Spec("jwt_audience", _optional_str),
    _Spec("jwt_leeway_seconds", _as_int),
    _Spec("tenant_claim", _as_str),
    _Spec("user_claim", _as_str),
    _Spec("roles_claim", _as_str),
    _Spec("job_claim", _as_str),
    _Spec("platform_admin_role", _as_str),
    _Spec("jwks_cache_seconds", _as_int),
    _Spec("jwks_refetch_cooldown_seconds", _as_int),
    _Spec("artifacts_destination", _optional_str),
    _Spec("artifacts_mode", _as_str),
    _Spec("s3_public_endpoint_url", _optional_str),
    _Spec("presigned_url_ttl_seconds", _as_int),
    _Spec("host", _as_str),
    _Spec("port", _as_int),
    _Spec("max_body_bytes", _as_int),
    _Spec("max_json_body_bytes", _as_int),
    _Spec("upstream_connect_timeout", _as_float),
    _Spec("upstream_timeout", _as_float),
    _Spec("upstream_pool_size", _as_int),
    _Spec("drain_delay_seconds", _as_float),
    _Spec("shutdown_grace_seconds", _as_float),
    _Spec("workers", _as_int),
    _Spec("cache_size", _as_int),
    _Spec("log_level", _as_str),
    _Spec("access_log", _as_bool),
    _Spec("access_log_flush_seconds", _as_float),
    _Spec("metrics_token", _optional_str),
    _Spec("metrics_allow_networks", _as_str_tuple),
    _Spec("session_secret", _optional_str),
    _Spec("ui_insecure_cookies", _as_bool),
    _Spec("root_path", _as_root_path),
    _Spec("oidc_client_id", _optional_str),
    _Spec("oidc_client_secret", _optional_str),
    _Spec("oidc_redirect_url", _optional_str),
    _Spec("oidc_scopes", _as_scopes),
    _Spec("oidc_provider_name", _optional_str),
    _Spec("rate_limit_tenant_rps", _as_float),
    _Spec("rate_limit_tenant_burst", _as_int),
    _Spec("rate_limit_user_rps", _as_float),
    _Spec("rate_limit_user_burst", _as_int),
    _Spec("rate_limit_tenant_overrides", _as_tenant_rates),
    _Spec("redis_url", _optional_str),
)
SETTING_NAMES = tuple(spec.name for spec in _SPECS)
_REQUIRED = frozenset({"upstream_url"})
# Keys of one [[gateway.issuers]] table and the flat setting each one mirrors.
_ISSUER_KEYS: dict[str, Callable[[Any], Any]] = {
    "name": _as_str,
    "algorithms": _as_str_tuple,
    "secret": _optional_str,
    "public_key": _optional_str,
    "public_key_file": _optional_str,
    "jwks_url": _optional_str,
    "oidc_issuer": _optional_str,
    "issuer": _optional_str,
    "audience": _optional_str,
    "leeway_seconds": _as_int,
    "tenant_claim": _as_str,
    "user_claim": _as_str,
    "roles_claim": _as_str,
    "job_claim": _as_str,
}


def env_name(setting: str) -> str:
    """The environment variable that sets ``setting``."""
    return ENV_PREFIX + setting.upper()


def load_settings(
    *,
    env: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build validated settings; raise :class:`SettingsError` listing every problem.

    ``overrides`` (from command-line flags) win over the environment, which wins over the file.
    The TOML file may hold the settings at top level or under a ``[gateway]`` table.
    """
    environ = os.environ if env is None else env
    problems: list[str] = []
    raw: dict[str, Any] = {}
    raw_issuers: list[Any] = []

    if config_file is None and environ.get(env_name("config")):
        config_file = environ[env_name("config")]
    if config_file is not None:
        from_file, raw_issuers = _read_toml(Path(config_file), problems)
        raw.update(from_file)
    for spec in _SPECS:
        if env_name(spec.name) in environ:
            raw[spec.name] = environ[env_name(spec.name)]
    raw.update({key: value for key, value in (overrides or {}).items() if value is not None})

    values: dict[str, Any] = {}
    for spec in _SPECS:
        if spec.name not in raw:
            if spec.name in _REQUIRED:
                problems.append(f"{env_name(spec.name)}: is required")
            continue
        try:
            values[spec.name] = spec.parse(raw[spec.name])
        except ValueError as exc:
            problems.append(f"{env_name(spec.name)}: {exc}")
    values["extra_issuers"] = tuple(_parse_issuers(raw_issuers, problems))
    if "upstream_url" in values:
        problems.extend(_validate(values))
    if problems:
        raise SettingsError(problems)
    return Settings(**values)


def _read_toml(path: Path, problems: list[str]) -> tuple[dict[str, Any], list[Any]]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        problems.append(f"config file {path}: cannot be read ({exc.strerror or exc})")
        return {}, []
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"config file {path}: invalid TOML ({exc})")
        return {}, []
    section = data.get("gateway", data)
    if not isinstance(section, dict):
        problems.append(f"config file {path}: [gateway] must be a table")
        return {}, []
    issuers = section.get("issuers", [])
    if not isinstance(issuers, list):
        problems.append(f"config file {path}: issuers must be a list of tables ([[gateway.issuers]])")
        issuers = []
    unknown = sorted(set(section) - set(SETTING_NAMES) - {"gateway", "issuers"})
    problems.extend(f"config file {path}: unknown setting {key!r}" for key in unknown)
    return {key: value for key, value in section.items() if key in SETTING_NAMES}, issuers


def _parse_issuers(tables: list[Any], problems: list[str]) -> list[IssuerSettings]:
    issuers: list[IssuerSettings] = []
    for index, table in enumerate(tables):
        where = f"issuers[{index}]"
        if not isinstance(table, dict):
            problems.append(f"{where}: must be a table")
            continue
        values: dict[str, Any] = {}
        for key, value in table.items():
            parse = _ISSUER_KEYS.get(key)
            if parse is None:
                problems.append(f"{where}: unknown key {key!r}")
                continue
            try:
                values[key] = parse(value)
            except ValueError as exc:
                problems.append(f"{where}.{key}: {exc}")
        key_file = values.pop("public_key_file", None)
        if key_file and not values.get("public_key"):
            try:
                values["public_key"] = Path(key_file).read_text(encoding="utf-8")
            except OSError as exc:
                problems.append(f"{where}.public_key_file: cannot be read ({exc.strerror or exc})")
        values.setdefault("name", values.get("issuer") or values.get("oidc_issuer") or where)
        if "algorithms" not in values:
            values["algorithms"] = ("HS256",) if values.get("secret") else ("RS256",)
        issuers.append(IssuerSettings(**values))
    return issuers


def _validate(values: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
    merged = {**defaults, **values}

    upstream = urlsplit(merged["upstream_url"])
    if upstream.scheme not in ("http", "https") or not upstream.hostname:
        problems.append(f"{env_name('upstream_url')}: must be an http(s) URL, got {merged['upstream_url']!r}")
    elif upstream.path not in ("", "/") or upstream.query or upstream.fragment:
        problems.append(f"{env_name('upstream_url')}: must not have a path, query or fragment")

    if merged["jwt_public_key_file"] and not merged["jwt_public_key"]:
        try:
            Path(merged["jwt_public_key_file"]).read_text(encoding="utf-8")
        except OSError as exc:
            problems.append(f"{env_name('jwt_public_key_file')}: cannot be read ({exc.strerror or exc})")
            return problems
    issuers = Settings(**merged).issuers()
    if not issuers:
        problems.append(
            "no token issuer configured: set GATEWAY_JWT_SECRET, GATEWAY_JWT_PUBLIC_KEY(_FILE), GATEWAY_JWKS_URL "
            "or GATEWAY_OIDC_ISSUER (or [[gateway.issuers]] in the config file)"
        )
    for issuer in issuers:
        problems.extend(_validate_issuer(issuer, primary=issuer.name == "default"))
    if len(issuers) > 1:
        names = [issuer.expected_issuer for issuer in issuers]
        if None in names:
            problems.append("with several issuers, every issuer needs its 'issuer' (iss) or 'oidc_issuer' set")
        elif len(set(names)) != len(names):
            problems.append("two issuers have the same 'issuer' (iss) value")

    if not 0 < merged["port"] < 65536:
        problems.append(f"{env_name('port')}: must be between 1 and 65535")
    positive = (
        "max_body_bytes",
        "max_json_body_bytes",
        "upstream_pool_size",
        "cache_size",
        "upstream_connect_timeout",
        "upstream_timeout",
        "jwks_cache_seconds",
    )
    problems.extend(f"{env_name(name)}: must be positive" for name in positive if merged[name] <= 0)
    for name in ("jwt_leeway_seconds", "jwks_refetch_cooldown_seconds"):
        if merged[name] < 0:
            problems.append(f"{env_name(name)}: must not be negative")
    for name in ("drain_delay_seconds", "shutdown_grace_seconds"):
        if not 0 <= merged[name] <= 3600:
            problems.append(f"{env_name(name)}: must be between 0 and 3600 seconds")
    if not 0 <= merged["access_log_flush_seconds"] <= 10:  # also refuses NaN
        problems.append(f"{env_name('access_log_flush_seconds')}: must be between 0 and 10 seconds")
    if not 1 <= merged["workers"] <= 256:
        problems.append(f"{env_name('workers')}: must be between 1 and 256")
    destination = merged["artifacts_destination"]
    if destination is not None:
        parts = urlsplit(destination)
        if parts.scheme != "s3" or not parts.netloc:
            problems.append(f"{env_name('artifacts_destination')}: must be s3://bucket[/prefix], got {destination!r}")
    if merged["artifacts_mode"] not in ("proxy", "presigned"):
        problems.append(f"{env_name('artifacts_mode')}: must be 'proxy' or 'presigned'")
    if not 1 <= merged["presigned_url_ttl_seconds"] <= 7 * 24 * 3600:
        problems.append(f"{env_name('presigned_url_ttl_seconds')}: must be between 1 and 604800 (S3's limit)")
    secret = merged["session_secret"]
    if secret is not None and len(secret.encode()) < 32:
        problems.append(f"{env_name('session_secret')}: must be at least 32 bytes")
    for name in ("rate_limit_tenant_rps", "rate_limit_user_rps", "rate_limit_tenant_burst", "rate_limit_user_burst"):
        if not math.isfinite(merged[name]) or merged[name] < 0:
            problems.append(f"{env_name(name)}: must be a finite number, not negative (0 turns the limit off)")
    if merged["redis_url"] is not None and not _is_redis_url(merged["redis_url"]):
        problems.append(f"{env_name('redis_url')}: must be a redis://host[:port][/db], rediss://... or unix://... URL")
    if merged["log_level"].lower() not in ("critical", "error", "warning", "info", "debug"):
        problems.append(f"{env_name('log_level')}: must be one of critical, error, warning, info, debug")
    problems.extend(_validate_metrics_access(merged))
    problems.extend(_validate_oidc_login(merged))
    return problems


def _validate_oidc_login(merged: dict[str, Any]) -> list[str]:
    """The browser's OIDC login needs the issuer, a callback URL under the root path and a session key."""
    problems: list[str] = []
    client_id = env_name("oidc_client_id")
    if not merged["oidc_client_id"]:
        extra = [name for name in ("oidc_client_secret", "oidc_redirect_url", "oidc_provider_name") if merged[name]]
        problems.extend(f"{env_name(name)}: only used with {client_id}, which is not set" for name in extra)
        return problems
    if not merged["oidc_issuer"]:
        problems.append(f"{client_id}: needs GATEWAY_OIDC_ISSUER (the provider users log in at)")
    if not merged["session_secret"]:
        problems.append(f"{client_id}: needs GATEWAY_SESSION_SECRET (the login is kept in an encrypted cookie)")
    if "openid" not in merged["oidc_scopes"]:
        problems.append(f"{env_name('oidc_scopes')}: must include 'openid'")
    redirect = merged["oidc_redirect_url"]
    callback = f"{merged['root_path']}/oidc/callback"
    if not redirect:
        problems.append(f"{client_id}: needs GATEWAY_OIDC_REDIRECT_URL (e.g. https://gateway.example.com{callback})")
        return problems
    parts = urlsplit(redirect)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        problems.append(f"{env_name('oidc_redirect_url')}: must be an absolute http(s) URL without query or fragment")
    elif parts.path != callback:
        problems.append(f"{env_name('oidc_redirect_url')}: its path must be {callback} (the gateway's callback)")
    elif parts.scheme == "http" and not merged["ui_insecure_cookies"]:
        problems.append(
            f"{env_name('oidc_redirect_url')}: must be https (plain http only with GATEWAY_UI_INSECURE_COOKIES=true)"
        )
    return problems


def _validate_metrics_access(merged: dict[str, Any]) -> list[str]:
    """/metrics: a token long enough not to be guessed, and networks that parse as CIDRs."""
    problems: list[str] = []
    token = merged["metrics_token"]
    if token is not None and len(token.encode()) < 16:
        problems.append(f"{env_name('metrics_token')}: must be at least 16 bytes")
    bad = []
    for network in merged["metrics_allow_networks"]:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            bad.append(network)
    if bad:
        problems.append(f"{env_name('metrics_allow_networks')}: not CIDR networks: {', '.join(map(repr, bad))}")
    return problems


def _is_redis_url(url: str) -> bool:
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 -- raises ValueError for a malformed port
    except ValueError:
        return False
    if parts.scheme == "unix":
        return bool(parts.path)
    return parts.scheme in ("redis", "rediss") and bool(parts.hostname)


def _validate_issuer(issuer: IssuerSettings, *, primary: bool) -> list[str]:
    """Exactly one key source, and algorithms that fit it: an HS key never verifies RS/ES and the reverse."""
    where = "GATEWAY_JWT_*" if primary else f"issuer {issuer.name!r}"
    problems: list[str] = []
    sources = [
        name
        for name, value in (
            ("secret", issuer.secret),
            ("public key", issuer.public_key),
            ("JWKS URL", issuer.jwks_url),
            ("OIDC issuer", issuer.oidc_issuer),
        )
        if value
    ]
    if len(sources) != 1:
        problems.append(f"{where}: configure exactly one key source, got {', '.join(sources) or 'none'}")
        return problems
    algorithms = set(issuer.algorithms)
    if not algorithms:
        problems.append(f"{where}: at least one algorithm is required")
    if "none" in {alg.lower() for alg in algorithms}:
        problems.append(f"{where}: the 'none' algorithm is never allowed")
    allowed = HMAC_ALGORITHMS if issuer.secret else ASYMMETRIC_ALGORITHMS
    kind = "a shared secret (HS*)" if issuer.secret else "public keys (RS*, PS*, ES*, EdDSA)"
    bad = sorted(alg for alg in algorithms - allowed if alg.lower() != "none")
    if bad:
        problems.append(f"{where}: algorithms {', '.join(bad)} cannot be verified with {kind}")
    if issuer.secret:
        needed = max((MIN_HS_SECRET_BYTES[alg] for alg in algorithms if alg in MIN_HS_SECRET_BYTES), default=32)
        if len(issuer.secret.encode()) < needed:
            problems.append(f"{where}: the secret must be at least {needed} bytes for {', '.join(sorted(algorithms))}")
    for url_name, url in (("JWKS URL", issuer.jwks_url), ("OIDC issuer", issuer.oidc_issuer)):
        if url and urlsplit(url).scheme not in ("http", "https"):
            problems.append(f"{where}: the {url_name} must be an http(s) URL")
    if issuer.leeway_seconds < 0:
        problems.append(f"{where}: leeway must not be negative")
    return problems
