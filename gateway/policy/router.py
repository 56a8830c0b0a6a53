"""Route matching for the declarative table: (method, canonical path) -> entry, or nothing.

Templates use ``{name}`` for one path segment and ``{name:path}`` for the rest of the path.
A parameter named in :data:`PARAM_PATTERNS` must match that pattern, so malformed ids (for
example a trace id with ``../`` in it) never reach a policy. Anything that does not match an
entry is refused by the caller: the table is deny-by-default.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from gateway.errors import GatewayError
from gateway.http.canonical import canonical_path
from gateway.policy.core import Action, Local

# Every MLflow REST route exists under /api/<major>.0 and under the UI's /ajax-api/<major>.0 twin.
B2 = ("/api/2.0", "/ajax-api/2.0")
B3 = ("/api/3.0", "/ajax-api/3.0")
J2 = ("/ajax-api/2.0",)
J3 = ("/ajax-api/3.0",)
ROOT = ("",)

HEX32 = r"[0-9a-f]{32}"
# What a path parameter must look like (Appendix B of mlflow-api.md); unlisted names: one segment.
PARAM_PATTERNS: dict[str, str] = {
    "trace_id": rf"tr-{HEX32}|{HEX32}",
    "request_id": rf"tr-{HEX32}|{HEX32}",
    "model_id": rf"m-{HEX32}",
    "dataset_id": rf"d-{HEX32}",  # sqlalchemy_store.create_dataset: "d-" + uuid4().hex
    "assessment_id": r"a-[0-9a-f]{1,64}",
}
_SEGMENT = r"[^/]+"
_PARAM = re.compile(r"\{([a-z_]+)(:path)?\}")


# What a path without parameters may contain: characters percent-encoding leaves as they are.
_PLAIN_TEMPLATE = re.compile(r"/[A-Za-z0-9/._~-]*")


def _is_canonical(template: str) -> bool:
    try:
        return canonical_path(template.encode("ascii")) == template
    except GatewayError:
        return False


@dataclass(frozen=True)
class Route:
    """One (method, full path template) of the table and what the gateway does with it."""

    method: str
    template: str
    action: Action | Local

    @property
    def has_params(self) -> bool:
        """True when the template has ``{...}`` parameters."""
        return "{" in self.template


def api(method: str, prefixes: tuple[str, ...], path: str, action: Action | Local) -> list[Route]:
    """Entries for ``path`` under each of ``prefixes`` (e.g. :data:`B2` gives the /api and /ajax-api twins)."""
    return [Route(method, prefix + path, action) for prefix in prefixes]


def _compile(template: str) -> re.Pattern[str]:
    parts: list[str] = []
    position = 0
    for match in _PARAM.finditer(template):
        parts.append(re.escape(template[position : match.start()]))
        name, is_path = match.group(1), match.group(2)
        pattern = ".+" if is_path else PARAM_PATTERNS.get(name, _SEGMENT)
        parts.append(f"(?P<{name}>{pattern})")
        position = match.end()
    parts.append(re.escape(template[position:]))
    return re.compile("".join(parts))


class Match:
    """A matched route and its path parameters (read-only by convention).

    A plain slotted class: a frozen dataclass's ``__init__`` costs ~3 k instructions per request
    (bench/RESULTS.md section 2e), and a static route's one match is made once, in the table.
    """

    __slots__ = ("params", "route")

    def __init__(self, route: Route, params: dict[str, str]) -> None:
        self.route = route
        self.params = params


class RouteTable:
    """The compiled table. Static paths are one dict lookup; templated paths a short regex scan."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self._routes: list[Route] = []
        self._static: dict[tuple[str, str], Match] = {}
        self._static_raw: dict[tuple[str, bytes], Match] = {}  # the same, by the path's bytes as received
        self._templated: dict[str, list[tuple[re.Pattern[str], Route]]] = {}
        for route in routes:
            key = (route.method, route.template)
            if key in self._static or any(r.template == route.template for _, r in self._by(route.method)):
                raise ValueError(f"duplicate route {route.method} {route.template}")
            self._routes.append(route)
            if route.has_params:
                self._templated.setdefault(route.method, []).append((_compile(route.template), route))
            else:
                if not _PLAIN_TEMPLATE.fullmatch(route.template):
                    # The gateway sends a static route's path upstream as it is (Gateway.__call__).
                    raise ValueError(f"static route {route.template!r} would need percent-encoding")
                if not _is_canonical(route.template):
                    # A request path equal to a static template is taken as it is (match_static_raw).
                    raise ValueError(f"static route {route.template!r} is not a canonical path")
                self._static[key] = match = Match(route, {})
                self._static_raw[(route.method, route.template.encode("ascii"))] = match

    def _by(self, method: str) -> list[tuple[re.Pattern[str], Route]]:
        return self._templated.get(method, [])

    def match_static_raw(self, method: str, raw_path: bytes) -> Match | None:
        """The static route whose template is exactly ``raw_path``'s bytes, or ``None`` (then canonicalise).

        A static template is a canonical path by construction (absolute, no percent-encoding, no empty
        or dot segment: :data:`_PLAIN_TEMPLATE` and the canonical rules), so a request path that is
        byte for byte a template needs no decoding or checking: most requests (bench/RESULTS.md 2e).
        """
        return self._static_raw.get((method, raw_path))

    def match(self, method: str, path: str) -> Match | None:
        """The entry for a canonical path, or ``None`` (which the caller refuses)."""
        static = self._static.get((method, path))
        if static is not None:
            return static
        for pattern, candidate in self._by(method):
            found = pattern.fullmatch(path)
            if found is not None:
                return Match(candidate, found.groupdict())
        return None

    def __iter__(self) -> Iterator[Route]:
        return iter(self._routes)

    def __len__(self) -> int:
        return len(self._routes)


def normalise_template(template: str) -> str:
    """A template with parameter names erased, for comparing with MLflow's own route list.

    ``<x>``/``{x}`` become ``{}``; ``<path:x>``/``{x:path}`` (the rest of the path) become ``{*}``.
    """
    template = re.sub(r"<path:[^>]+>|\{[a-z_]+:path\}", "{*}", template)
    template = re.sub(r"<(?:[a-z]+:)?[^>]+>", "{}", template)
    return re.sub(r"\{[a-z_]+\}", "{}", template)
