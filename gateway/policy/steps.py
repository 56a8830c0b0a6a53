"""Generic policy steps shared by every MLflow area.

Each factory returns one small step with a one-line contract. Request steps run before the upstream
call and may answer locally by raising; response steps rewrite a buffered JSON response in place.
"""

from __future__ import annotations

import unicodedata
from typing import Any

from gateway.errors import BadRequest, PermissionDenied
from gateway.http.canonical import JsonObject, Query, single_value
from gateway.policy.core import Exchange, RequestStep

RESERVED_TAG_PREFIX = "matih."


def field_value(ex: Exchange, name: str, *, aliases: tuple[str, ...] = ()) -> Any:
    """A request field from the JSON body, or from the query for bodiless routes.

    With aliases (MLflow's ``run_uuid`` for ``run_id``), every spelling present must agree: the
    upstream handler may read either one, so a request that names two different objects is a 400.
    """
    body = ex.body
    first = body.get(name) if body is not None else single_value(ex.query, name)
    if first == "":
        first = None
    for alias in aliases:
        if body is None and alias not in ex.query:  # the usual case, without a call
            continue
        value = body.get(alias) if body is not None else single_value(ex.query, alias)
        if value is None or value == "":
            continue
        if first is None:
            first = value
        elif str(value) != str(first):
            raise BadRequest(f"Fields {', '.join((name, *aliases))} name different objects")
    return first


def set_field(ex: Exchange, name: str, value: str, *, aliases: tuple[str, ...] = ()) -> None:
    """Write a request field (body or query) and its aliases, so the upstream reads one value."""
    for key in (name, *aliases):
        if ex.body is not None:
            if key == name or key in ex.body:
                ex.body[key] = value
        elif key == name or key in ex.query:
            ex.query[key] = [value]


def require_string(ex: Exchange, name: str, *, aliases: tuple[str, ...] = ()) -> str:
    """A required string field (MLflow answers the same 400 for a missing one)."""
    # The usual request names the field once and no alias (every run-scoped call): read it here, without
    # field_value and single_value (bench/RESULTS.md 2i). Anything else goes to field_value, which checks it
    # and may refuse it.
    body = ex.body
    fields: JsonObject | Query = ex.query if body is None else body
    value = fields.get(name)
    if body is None:
        value = value[0] if value is not None and len(value) == 1 else None
    for alias in aliases:
        if alias in fields:
            value = None
    if value and type(value) is str:
        return value
    value = field_value(ex, name, aliases=aliases)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"Missing value for required parameter '{name}'.")
    return value


def tag_list(ex: Exchange, field: str) -> list[JsonObject]:
    """The ``[{key, value}]`` list of a JSON body, validated in shape."""
    tags = ex.json_body().get(field)
    if tags is None:
        return []
    if not isinstance(tags, list) or not all(isinstance(tag, dict) and isinstance(tag.get("key"), str) for tag in tags):
        raise BadRequest(f"Field '{field}' must be a list of {{key, value}} objects with string keys")
    return tags


def is_reserved_tag(key: object) -> bool:
    """True for keys in the gateway's reserved ``matih.`` namespace.

    Compared after Unicode NFKC normalisation and case-folding, with surrounding white space and
    invisible format characters removed, so ``MATIH.x``, full-width letters or a zero-width space inside
    cannot slip a look-alike of a provenance tag past the check.
    """
    if not isinstance(key, str):
        return False
    folded = unicodedata.normalize("NFKC", key).casefold()
    visible = "".join(ch for ch in folded if unicodedata.category(ch) != "Cf").strip()
    return visible.startswith(RESERVED_TAG_PREFIX)


def reserved_tag_denied(key: str) -> PermissionDenied:
    """The refusal for a client write to a reserved tag."""
    return PermissionDenied(f"Tag '{key}' is reserved for the gateway (the '{RESERVED_TAG_PREFIX}*' namespace)")


def reject_reserved_tags(field: str = "tags") -> RequestStep:
    """Refuse a body whose tag list writes a ``matih.*`` key: provenance cannot be forged."""

    async def step(ex: Exchange) -> None:
        for tag in tag_list(ex, field):
            if is_reserved_tag(tag.get("key")):
                raise reserved_tag_denied(str(tag.get("key")))

    return step


def reject_reserved_key(field: str = "key") -> RequestStep:
    """Refuse set/delete of a single tag whose key is in the reserved ``matih.*`` namespace."""

    async def step(ex: Exchange) -> None:
        key = field_value(ex, field)
        if is_reserved_tag(key):
            raise reserved_tag_denied(str(key))

    return step


def inject_tags(ex: Exchange, field: str, tags: dict[str, str]) -> None:
    """Set ``tags`` in the body's tag list, replacing any client value for the same keys."""
    kept = [tag for tag in tag_list(ex, field) if tag.get("key") not in tags]
    ex.json_body()[field] = kept + [{"key": key, "value": value} for key, value in tags.items()]


def provenance_tags(ex: Exchange) -> dict[str, str]:
    """The ``matih.*`` tags that record who created an object, from the verified token."""
    tags = {"matih.tenant_id": ex.tenant, "matih.user_id": ex.caller.user}
    if ex.caller.job:
        tags["matih.job_id"] = ex.caller.job
    return tags


def reject_fields(*names: str, reason: str) -> RequestStep:
    """Refuse a request that sets any of ``names`` (fields the gateway must own)."""

    async def step(ex: Exchange) -> None:
        for name in names:
            if field_value(ex, name) not in (None, "", [], {}):
                raise BadRequest(f"Field '{name}' is not allowed: {reason}")

    return step
