"""Canonical artifact paths and who owns them.

An artifact path is relative to the artifacts destination root and starts with the experiment id:

    <experiment_id>                                   an experiment's directory (listing only)
    <experiment_id>/<run_id>[/artifacts[/...]]        a run's artifacts
    <experiment_id>/models/<m-...>[/artifacts[/...]]  a logged model's artifacts
    <experiment_id>/traces/<tr-...>[/artifacts[/...]] a trace's artifacts

Paths are checked before any S3 call: decoded once by the pipeline and refused when a second layer of
escapes remains, then refused for ``..``/``.``/empty segments, backslashes, control characters, ``#``
and ``?``. Ownership: the experiment must be the caller's, and the run, logged model or trace must live
in that very experiment (a tenant cannot address its own run under another tenant's experiment id).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.errors import BadRequest, NotFound
from gateway.policy.core import Exchange

_EXPERIMENT = re.compile(r"^[0-9]{1,19}$")
_RUN = re.compile(r"^[0-9a-f]{32}$")
_MODEL = re.compile(r"^m-[0-9a-f]{32}$")
_TRACE = re.compile(r"^tr-[0-9a-f]{32}$")
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f\\#?]")
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
ARTIFACTS_DIR = "artifacts"


@dataclass(frozen=True)
class ArtifactPath:
    """A checked artifact path and what it belongs to."""

    path: str
    experiment_id: str
    kind: str | None = None  # "run", "model" or "trace"; None for an experiment directory
    owner_id: str | None = None
    # The part inside ``.../artifacts/`` ("" for the artifacts directory itself; None above it).
    relative: str | None = None

    @property
    def is_inside_artifacts(self) -> bool:
        """True for paths at or below an object's ``artifacts`` directory (where writes may go)."""
        return self.relative is not None

    @property
    def root(self) -> str:
        """The object's artifact root (``<exp>/<run>/artifacts`` and the like)."""
        if self.kind == "run":
            return f"{self.experiment_id}/{self.owner_id}/{ARTIFACTS_DIR}"
        if self.kind == "model":
            return f"{self.experiment_id}/models/{self.owner_id}/{ARTIFACTS_DIR}"
        if self.kind == "trace":
            return f"{self.experiment_id}/traces/{self.owner_id}/{ARTIFACTS_DIR}"
        return self.experiment_id


def check_relative(path: str, *, allow_empty: bool = False) -> str:
    """Refuse every ambiguous form of a relative path; return it without a trailing slash."""
    if _ESCAPE.search(path):
        raise BadRequest("Artifact path is percent-encoded more than once")
    if _FORBIDDEN.search(path):
        raise BadRequest("Artifact path contains forbidden characters")
    if path.startswith("/"):
        raise BadRequest("Artifact path must be relative")
    stripped = path[:-1] if path.endswith("/") else path
    if not stripped:
        if allow_empty:
            return ""
        raise BadRequest("Artifact path is empty")
    for segment in stripped.split("/"):
        if segment in ("", ".", ".."):
            raise BadRequest("Artifact path contains empty or dot segments")
    return stripped


def parse_artifact_path(raw: str) -> ArtifactPath:
    """Classify a path relative to the destination root; a root-level or unknown layout is refused."""
    path = check_relative(raw)
    segments = path.split("/")
    experiment_id = segments[0]
    if not _EXPERIMENT.match(experiment_id):
        raise NotFound(f"No Experiment with id={experiment_id} exists")
    if len(segments) == 1:
        return ArtifactPath(path, experiment_id)
    if segments[1] in ("models", "traces"):
        kind, pattern = ("model", _MODEL) if segments[1] == "models" else ("trace", _TRACE)
        if len(segments) < 3 or not pattern.match(segments[2]):
            raise NotFound("Artifact does not exist")
        rest = segments[3:]
        owner = segments[2]
    elif _RUN.match(segments[1]):
        kind, owner, rest = "run", segments[1], segments[2:]
    else:
        raise NotFound("Artifact does not exist")
    if rest and rest[0] != ARTIFACTS_DIR:
        raise NotFound("Artifact does not exist")
    relative = "/".join(rest[1:]) if rest else None
    return ArtifactPath(path, experiment_id, kind, owner, relative)


async def require_owned_path(ex: Exchange, artifact: ArtifactPath) -> None:
    """The experiment is the caller's and the run/model/trace lives in that same experiment.

    A miss anywhere is MLflow's "does not exist": no existence oracle for other tenants' paths.
    """
    if ex.caller.platform_admin:
        return
    ownership = ex.services.ownership
    await ownership.require_experiment(ex.tenant, artifact.experiment_id)
    if artifact.kind is None or artifact.owner_id is None:
        return
    if artifact.kind == "run":
        parent = await ownership.require_run(ex.tenant, artifact.owner_id)
    elif artifact.kind == "model":
        parent = await ownership.require_logged_model(ex.tenant, artifact.owner_id)
    else:
        parent = await ownership.require_trace(ex.tenant, artifact.owner_id)
    if parent != artifact.experiment_id:
        raise NotFound("Artifact does not exist")
