"""Audit log: one JSON line per security-relevant decision, on the ``gateway.audit`` logger.

Never contains a token, a cookie or a request body: only who, what and why.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson

audit_logger = logging.getLogger("gateway.audit")


def audit(event: str, **fields: Any) -> None:
    """Write one audit record (``event`` plus the given fields) as a JSON line."""
    if audit_logger.isEnabledFor(logging.INFO):
        record = {"ts": round(time.time(), 3), "event": event, **fields}
        audit_logger.info(orjson.dumps(record, default=str).decode())


def configure_logging(level: str) -> None:
    """Send the gateway's loggers (``gateway``, ``gateway.audit``, ...) to stderr, one line per record."""
    logger = logging.getLogger("gateway")
    if any(getattr(handler, "_gateway", False) for handler in logger.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._gateway = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
