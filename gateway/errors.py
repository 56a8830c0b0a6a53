"""One typed error hierarchy, rendered in MLflow's error shape.

Every refusal the gateway makes is a ``GatewayError``; :func:`error_body` turns it into
``{"error_code": ..., "message": ...}`` with the status MLflow itself would use, so the stock
``MlflowClient`` raises its normal ``MlflowException`` / ``RestException``::

    GatewayError
     ├── BadRequest            400 INVALID_PARAMETER_VALUE
     ├── Unauthenticated       401 UNAUTHENTICATED
     ├── PermissionDenied      403 PERMISSION_DENIED
     ├── NotFound              404 RESOURCE_DOES_NOT_EXIST
     │    └── EndpointNotFound 404 ENDPOINT_NOT_FOUND
     ├── PayloadTooLarge       413 REQUEST_LIMIT_EXCEEDED
     ├── RateLimited           429 REQUEST_LIMIT_EXCEEDED (+ Retry-After)
     ├── HeadersTooLarge       431 REQUEST_LIMIT_EXCEEDED
     └── UpstreamError         502 (the upstream answered something unusable)
          ├── UpstreamUnavailable  503 TEMPORARILY_UNAVAILABLE (+ Retry-After)
          └── UpstreamTimeout      504 DEADLINE_EXCEEDED

Policy denials are always 4xx: the MLflow client retries 5xx and 429 up to seven times.
"""

from __future__ import annotations

import re
from typing import ClassVar

import orjson


class GatewayError(Exception):
    """Base of every error the gateway answers itself."""

    status: ClassVar[int] = 500
    error_code: ClassVar[str] = "INTERNAL_ERROR"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})


class BadRequest(GatewayError):
    """The request is malformed or ambiguous; it never reaches the upstream."""

    status = 400
    error_code = "INVALID_PARAMETER_VALUE"


class Unauthenticated(GatewayError):
    """No credential, or one that does not verify."""

    status = 401
    error_code = "UNAUTHENTICATED"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        merged = {"WWW-Authenticate": 'Bearer realm="mlflow-tenant-gateway"'}
        merged.update(headers or {})
        super().__init__(message, headers=merged)


class PermissionDenied(GatewayError):
    """The caller is known but the operation is refused (role, reserved tag, global feature)."""

    status = 403
    error_code = "PERMISSION_DENIED"


class NotFound(GatewayError):
    """A missing object, or another tenant's object: the two are indistinguishable on purpose."""

    status = 404
    error_code = "RESOURCE_DOES_NOT_EXIST"


class EndpointNotFound(NotFound):
    """A path that is not an MLflow route at all."""

    error_code = "ENDPOINT_NOT_FOUND"


class PayloadTooLarge(GatewayError):
    """A request body over the configured limit."""

    status = 413
    error_code = "REQUEST_LIMIT_EXCEEDED"


class RateLimited(GatewayError):
    """The caller's rate limit is used up; the client retries after ``Retry-After`` seconds."""

    status = 429
    error_code = "REQUEST_LIMIT_EXCEEDED"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class HeadersTooLarge(GatewayError):
    """A header (e.g. a token) over the configured limit."""

    status = 431
    error_code = "REQUEST_LIMIT_EXCEEDED"


class UpstreamError(GatewayError):
    """The upstream MLflow answered something the gateway cannot use."""

    status = 502
    error_code = "INTERNAL_ERROR"


class UpstreamUnavailable(UpstreamError):
    """The upstream MLflow could not be reached; the client may retry."""

    status = 503
    error_code = "TEMPORARILY_UNAVAILABLE"

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class UpstreamTimeout(UpstreamError):
    """The upstream MLflow did not answer in time."""

    status = 504
    error_code = "DEADLINE_EXCEEDED"


def error_body(error_code: str, message: str) -> bytes:
    """Serialise an MLflow-shaped error body."""
    return orjson.dumps({"error_code": error_code, "message": message})


# An upstream 5xx can carry internal details (store URIs, file paths, hosts). They are redacted
# before the body is passed on; the status and error code stay as the upstream sent them.
_URI = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"),]+")
_ABS_PATH = re.compile(r"(?<![\w.:/])/(?:[\w.@-]+/)+[\w.@-]+")


def redact_internal_details(message: str) -> str:
    """Replace URIs and absolute file-system paths in an upstream error message."""
    return _ABS_PATH.sub("<redacted>", _URI.sub("<redacted>", message))
