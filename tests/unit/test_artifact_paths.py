"""Canonical artifact paths: every accepted layout classified exactly, every ambiguous form refused."""

from __future__ import annotations

import pytest

from gateway.artifacts.paths import ArtifactPath, check_relative, parse_artifact_path
from gateway.errors import BadRequest, NotFound

RUN = "0123456789abcdef0123456789abcdef"
MODEL = "m-" + "a" * 32
TRACE = "tr-" + "b" * 32


# -- check_relative -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a", "a"),
        ("a/b/c.txt", "a/b/c.txt"),
        ("a/b/", "a/b"),  # one trailing slash names the same directory
        ("dir with space/file name.txt", "dir with space/file name.txt"),
        ("ünïcödé/ファイル.bin", "ünïcödé/ファイル.bin"),
        ("...", "..."),  # not a dot segment
        ("..a/a..", "..a/a.."),
        (".hidden", ".hidden"),
        ("100%", "100%"),  # a lone percent sign is not an escape
        ("%zz", "%zz"),
        ("a+b=c;d,e@f", "a+b=c;d,e@f"),
    ],
)
def test_check_relative_accepts(raw: str, expected: str) -> None:
    assert check_relative(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "/",
        "..",
        ".",
        "../x",
        "x/..",
        "x/../y",
        "./x",
        "x/.",
        "x/./y",
        "a//b",
        "a//",
        "//a",
        "/a",
        "/etc/passwd",
        "a\\b",
        "..\\x",
        "a\x00b",
        "a\x01",
        "a\nb",
        "a\rb",
        "a\tb",
        "a\x1fb",
        "a\x7fb",
        "a#frag",
        "a?q=1",
        "%2e%2e/x",
        "x/%2E%2E",
        "a%2Fb",
        "a%2fb",
        "a%5cb",
        "a%00b",
        "a%23b",
        "a%3Fb",
        "%41",
        "a/%252e",
    ],
)
def test_check_relative_refuses(raw: str) -> None:
    with pytest.raises(BadRequest):
        check_relative(raw)


@pytest.mark.parametrize("raw", ["", "/"])
def test_check_relative_empty_only_when_allowed(raw: str) -> None:
    if raw == "":
        assert check_relative(raw, allow_empty=True) == ""
    else:  # a lone slash is an absolute path, even where an empty one is fine
        with pytest.raises(BadRequest):
            check_relative(raw, allow_empty=True)


@pytest.mark.parametrize("raw", ["..", "a//b", "%2e", "a\\b"])
def test_allow_empty_does_not_relax_other_rules(raw: str) -> None:
    with pytest.raises(BadRequest):
        check_relative(raw, allow_empty=True)


# -- parse_artifact_path: accepted layouts ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", ArtifactPath("1", "1")),
        ("1234567890123456789", ArtifactPath("1234567890123456789", "1234567890123456789")),
        ("7/", ArtifactPath("7", "7")),
        (f"7/{RUN}", ArtifactPath(f"7/{RUN}", "7", "run", RUN, None)),
        (f"7/{RUN}/artifacts", ArtifactPath(f"7/{RUN}/artifacts", "7", "run", RUN, "")),
        (f"7/{RUN}/artifacts/", ArtifactPath(f"7/{RUN}/artifacts", "7", "run", RUN, "")),
        (f"7/{RUN}/artifacts/x", ArtifactPath(f"7/{RUN}/artifacts/x", "7", "run", RUN, "x")),
        (f"7/{RUN}/artifacts/x/y", ArtifactPath(f"7/{RUN}/artifacts/x/y", "7", "run", RUN, "x/y")),
        (
            f"7/{RUN}/artifacts/artifacts/models",
            ArtifactPath(f"7/{RUN}/artifacts/artifacts/models", "7", "run", RUN, "artifacts/models"),
        ),
        (f"7/models/{MODEL}", ArtifactPath(f"7/models/{MODEL}", "7", "model", MODEL, None)),
        (f"7/models/{MODEL}/artifacts", ArtifactPath(f"7/models/{MODEL}/artifacts", "7", "model", MODEL, "")),
        (
            f"7/models/{MODEL}/artifacts/MLmodel",
            ArtifactPath(f"7/models/{MODEL}/artifacts/MLmodel", "7", "model", MODEL, "MLmodel"),
        ),
        (f"7/traces/{TRACE}", ArtifactPath(f"7/traces/{TRACE}", "7", "trace", TRACE, None)),
        (
            f"7/traces/{TRACE}/artifacts/traces.json",
            ArtifactPath(f"7/traces/{TRACE}/artifacts/traces.json", "7", "trace", TRACE, "traces.json"),
        ),
    ],
)
def test_parse_accepts(raw: str, expected: ArtifactPath) -> None:
    assert parse_artifact_path(raw) == expected


@pytest.mark.parametrize(
    ("raw", "inside", "root"),
    [
        ("7", False, "7"),
        (f"7/{RUN}", False, f"7/{RUN}/artifacts"),
        (f"7/{RUN}/artifacts", True, f"7/{RUN}/artifacts"),
        (f"7/{RUN}/artifacts/a/b", True, f"7/{RUN}/artifacts"),
        (f"7/models/{MODEL}", False, f"7/models/{MODEL}/artifacts"),
        (f"7/models/{MODEL}/artifacts/x", True, f"7/models/{MODEL}/artifacts"),
        (f"7/traces/{TRACE}/artifacts/x", True, f"7/traces/{TRACE}/artifacts"),
    ],
)
def test_inside_artifacts_and_root(raw: str, inside: bool, root: str) -> None:
    parsed = parse_artifact_path(raw)
    assert parsed.is_inside_artifacts is inside
    assert parsed.root == root


# -- parse_artifact_path: refused -------------------------------------------------------------------------

# Ambiguous spellings: refused as malformed (400) before anything is looked up.
MALFORMED = [
    "",
    "/",
    "/7",
    "/7/x",
    "..",
    ".",
    "../7",
    "7/..",
    f"7/{RUN}/artifacts/..",
    f"7/{RUN}/artifacts/../../8/{RUN}/artifacts/x",
    f"7/{RUN}/artifacts/./x",
    f"./7/{RUN}",
    "7//x",
    f"7/{RUN}//artifacts",
    f"7/{RUN}/artifacts//x",
    f"7/{RUN}/artifacts/x//",
    f"7/{RUN}/artifacts/a\\..\\..\\x",
    f"7/{RUN}/artifacts/x\x00.txt",
    f"7/{RUN}/artifacts/x\n.txt",
    f"7/{RUN}/artifacts/x#y",
    f"7/{RUN}/artifacts/x?y=1",
    f"7/{RUN}/artifacts/%2e%2e/x",
    f"7/{RUN}/artifacts/x%2Fy",
    f"7/{RUN}/artifacts/x%00",
    "%37",  # "7", percent-encoded a second time
    f"%37/{RUN}/artifacts/x",
    f"7/%2e%2e/8/{RUN}",
]

# Well-formed but not an artifact layout the gateway serves: answered like a missing object (404).
UNKNOWN = [
    "x",
    "-1",
    "1.0",
    "1e3",
    " 7",
    "7 ",
    "+7",
    "\uff10",  # a full-width digit
    "12345678901234567890",  # longer than any MLflow id
    "Default",
    "artifacts",
    f"{RUN}",  # a run id where the experiment id belongs
    "7/x",
    "7/artifacts",
    "7/metrics",
    f"7/{RUN.upper()}",
    f"7/{RUN[:-1]}",
    f"7/{RUN}0",
    f"7/{RUN}/metrics",
    f"7/{RUN}/params/x",
    f"7/{RUN}/Artifacts/x",
    f"7/{RUN}/artifactsx",
    f"7/{RUN}/x/artifacts",
    "7/models",
    "7/models/x",
    f"7/models/{MODEL[2:]}",
    f"7/models/{MODEL}x",
    f"7/models/{TRACE}/artifacts/x",
    f"7/models/{MODEL}/x",
    f"7/models/{MODEL}/meta.yaml",
    "7/traces",
    f"7/traces/{TRACE[3:]}/artifacts/x",  # the trace layout needs the tr- form
    f"7/traces/{MODEL}/artifacts/x",
    f"7/traces/{TRACE}/traces.json",
    f"7/runs/{RUN}/artifacts/x",
]


@pytest.mark.parametrize("raw", MALFORMED)
def test_parse_refuses_malformed(raw: str) -> None:
    with pytest.raises(BadRequest):
        parse_artifact_path(raw)


@pytest.mark.parametrize("raw", UNKNOWN)
def test_parse_refuses_unknown_layouts_as_missing(raw: str) -> None:
    with pytest.raises(NotFound) as caught:
        parse_artifact_path(raw)
    assert caught.value.status == 404
    assert caught.value.error_code == "RESOURCE_DOES_NOT_EXIST"


@pytest.mark.parametrize("raw", ["x", "-1", "Default", "12345678901234567890"])
def test_non_numeric_experiment_id_is_mlflows_missing_experiment(raw: str) -> None:
    with pytest.raises(NotFound) as caught:
        parse_artifact_path(f"{raw}/{RUN}/artifacts/x")
    assert caught.value.message == f"No Experiment with id={raw} exists"
