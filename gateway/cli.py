"""``mlflow-gateway``: serve | dev | token | admin."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.settings import SettingsError, env_name, load_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlflow-gateway", description="A multi-tenant gateway in front of an unmodified MLflow tracking server."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway (production entry point)")
    serve.add_argument("--host", help=f"bind address (default 127.0.0.1; env {env_name('host')})")
    serve.add_argument("--port", type=int, help=f"port (default 8080; env {env_name('port')})")
    serve.add_argument("--config", help=f"TOML settings file (env {env_name('config')}); env variables win")
    serve.add_argument(
        "--workers", type=int, help=f"worker processes sharing the port (default 1; env {env_name('workers')})"
    )

    dev = commands.add_parser("dev", help="run mlflow server + S3 emulator + gateway on this machine")
    dev.add_argument("--port", type=int, default=5000, help="gateway port (default 5000)")
    dev.add_argument("--data-dir", default=".gateway-dev", help="where data is kept (default .gateway-dev)")

    token = commands.add_parser("token", help="print a signed token (secret from GATEWAY_JWT_SECRET)")
    token.add_argument("--tenant", required=True)
    token.add_argument("--user", required=True)
    token.add_argument("--role", action="append", default=[], help="a role to grant (repeatable)")
    token.add_argument("--job", help="job id recorded on runs (matih.job_id)")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    token.add_argument(
        "--data-dir", default=".gateway-dev", help="dev data dir whose secret is used when GATEWAY_JWT_SECRET is unset"
    )

    from gateway.admin import add_admin_parser

    add_admin_parser(commands)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from gateway.observability import configure_logging
    from gateway.serving import serve

    overrides = {"host": args.host, "port": args.port, "workers": args.workers}
    settings = load_settings(config_file=args.config, overrides=overrides)
    configure_logging(settings.log_level, access_log_flush_seconds=settings.access_log_flush_seconds)
    return serve(settings)  # drains on SIGTERM (gateway/serving.py)


def _token(args: argparse.Namespace) -> int:
    from gateway.auth.jwt import mint_token

    secret = os.environ.get(env_name("jwt_secret"))
    secret_file = Path(args.data_dir) / "jwt-secret"
    if not secret and secret_file.is_file():
        secret = secret_file.read_text(encoding="utf-8").strip()
    if not secret:
        print(f"error: set {env_name('jwt_secret')} (or run `mlflow-gateway dev` once to create one)", file=sys.stderr)
        return 2
    algorithm = os.environ.get(env_name("jwt_algorithms"), "HS256").split(",")[0].strip()
    try:
        token = mint_token(
            secret=secret,
            tenant=args.tenant,
            user=args.user,
            roles=args.role,
            job=args.job,
            ttl_seconds=args.ttl,
            algorithm=algorithm,
            issuer=os.environ.get(env_name("jwt_issuer")) or None,
            audience=os.environ.get(env_name("jwt_audience")) or None,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def _dev(args: argparse.Namespace) -> int:
    from gateway.dev import run_dev

    return run_dev(port=args.port, data_dir=Path(args.data_dir), jwt_secret=os.environ.get(env_name("jwt_secret")))


def _admin(args: argparse.Namespace) -> int:
    from gateway.admin import run_admin

    return run_admin(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mlflow-gateway`` console script."""
    args = _parser().parse_args(argv)
    handlers = {"serve": _serve, "dev": _dev, "token": _token, "admin": _admin}
    try:
        return handlers[args.command](args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
