"""Typed settings from ``GATEWAY_*`` environment variables and an optional TOML file.

Precedence: environment variable > TOML file > default. Every problem is collected and reported
together in one :class:`SettingsError`, so a misconfigured deployment fails at start-up with one
message that lists everything to fix.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ENV_PREFIX = "GATEWAY_"
# RFC 7518 §3.2: an HMAC key at least as long as the hash output.
MIN_HS_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
ALLOWED_JWT_ALGORITHMS = frozenset(MIN_HS_SECRET_BYTES)


class SettingsError(ValueError):
    """Invalid settings: ``problems`` lists every one of them."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid gateway settings:\n" + "\n".join(f"  - {problem}" for problem in problems))


@dataclass(frozen=True)
class Settings:
    """Everything the gateway process is configured with. Documented in the README."""

    upstream_url: str
    jwt_secret: str = field(repr=False)
    jwt_algorithms: tuple[str, ...] = ("HS256",)
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway_seconds: int = 30
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 64 * 1024 * 1024
    max_json_body_bytes: int = 16 * 1024 * 1024
    upstream_connect_timeout: float = 5.0
    upstream_timeout: float = 120.0
    upstream_pool_size: int = 100
    cache_size: int = 100_000
    log_level: str = "info"

    @property
    def upstream_host(self) -> str:
        """``host:port`` of the upstream, for the ``Host`` header MLflow's host allow-list checks."""
        return urlsplit(self.upstream_url).netloc


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


def _optional_str(value: Any) -> str | None:
    text = _as_str(value).strip()
    return text or None


_SPECS: tuple[_Spec, ...] = (
    _Spec("upstream_url", _as_str),
    _Spec("jwt_secret", _as_str),
    _Spec("jwt_algorithms", _as_str_tuple),
    _Spec("jwt_issuer", _optional_str),
    _Spec("jwt_audience", _optional_str),
    _Spec("jwt_leeway_seconds", _as_int),
    _Spec("host", _as_str),
    _Spec("port", _as_int),
    _Spec("max_body_bytes", _as_int),
    _Spec("max_json_body_bytes", _as_int),
    _Spec("upstream_connect_timeout", _as_float),
    _Spec("upstream_timeout", _as_float),
    _Spec("upstream_pool_size", _as_int),
    _Spec("cache_size", _as_int),
    _Spec("log_level", _as_str),
)
SETTING_NAMES = tuple(spec.name for spec in _SPECS)
_REQUIRED = frozenset({"upstream_url", "jwt_secret"})


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

    if config_file is None and environ.get(env_name("config")):
        config_file = environ[env_name("config")]
    if config_file is not None:
        raw.update(_read_toml(Path(config_file), problems))
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
    if not problems:
        problems.extend(_validate(values))
    if problems:
        raise SettingsError(problems)
    return Settings(**values)


def _read_toml(path: Path, problems: list[str]) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        problems.append(f"config file {path}: cannot be read ({exc.strerror or exc})")
        return {}
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"config file {path}: invalid TOML ({exc})")
        return {}
    section = data.get("gateway", data)
    if not isinstance(section, dict):
        problems.append(f"config file {path}: [gateway] must be a table")
        return {}
    unknown = sorted(set(section) - set(SETTING_NAMES) - {"gateway"})
    problems.extend(f"config file {path}: unknown setting {key!r}" for key in unknown)
    return {key: value for key, value in section.items() if key in SETTING_NAMES}


def _validate(values: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
    merged = {**defaults, **values}

    upstream = urlsplit(merged["upstream_url"])
    if upstream.scheme not in ("http", "https") or not upstream.hostname:
        problems.append(f"{env_name('upstream_url')}: must be an http(s) URL, got {merged['upstream_url']!r}")
    elif upstream.path not in ("", "/") or upstream.query or upstream.fragment:
        problems.append(f"{env_name('upstream_url')}: must not have a path, query or fragment")

    algorithms = merged["jwt_algorithms"]
    bad = sorted(set(algorithms) - ALLOWED_JWT_ALGORITHMS)
    if not algorithms:
        problems.append(f"{env_name('jwt_algorithms')}: at least one algorithm is required")
    if bad:
        problems.append(
            f"{env_name('jwt_algorithms')}: unsupported {', '.join(bad)} "
            f"(allowed: {', '.join(sorted(ALLOWED_JWT_ALGORITHMS))})"
        )
    needed = max((MIN_HS_SECRET_BYTES[alg] for alg in algorithms if alg in MIN_HS_SECRET_BYTES), default=32)
    if len(merged["jwt_secret"].encode()) < needed:
        problems.append(f"{env_name('jwt_secret')}: must be at least {needed} bytes for {', '.join(algorithms)}")

    if not 0 < merged["port"] < 65536:
        problems.append(f"{env_name('port')}: must be between 1 and 65535")
    for name in ("max_body_bytes", "max_json_body_bytes", "upstream_pool_size", "cache_size"):
        if merged[name] <= 0:
            problems.append(f"{env_name(name)}: must be positive")
    for name in ("upstream_connect_timeout", "upstream_timeout"):
        if merged[name] <= 0:
            problems.append(f"{env_name(name)}: must be positive")
    if merged["jwt_leeway_seconds"] < 0:
        problems.append(f"{env_name('jwt_leeway_seconds')}: must not be negative")
    if merged["log_level"].lower() not in ("critical", "error", "warning", "info", "debug"):
        problems.append(f"{env_name('log_level')}: must be one of critical, error, warning, info, debug")
    return problems
