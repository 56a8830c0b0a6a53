"""The deployment artefacts, checked by parsing them: Docker cannot run on the development machines.

``docker-compose.yml``, ``Dockerfile``, ``deploy/keycloak/*.json`` and ``deploy/k8s/*.yaml`` are read as data
and checked against the gateway's own settings module, so a renamed or mistyped ``GATEWAY_*`` variable, a
missing file, a service nobody waits for or a probe on the wrong path fails here instead of on a Monday.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.settings import SETTING_NAMES, env_name, load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
K8S_DIR = ROOT / "deploy" / "k8s"
REALM_FILE = ROOT / "deploy" / "keycloak" / "mlflow-realm.json"

# Every variable the gateway reads: its settings plus GATEWAY_CONFIG (the TOML file's path).
GATEWAY_VARIABLES = frozenset({env_name(name) for name in SETTING_NAMES} | {env_name("config")})
KEY_SOURCES = frozenset(
    env_name(name) for name in ("jwt_secret", "jwt_public_key", "jwt_public_key_file", "jwks_url", "oidc_issuer")
)
MLFLOW_HARDENING = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_AI_GATEWAY": "false",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "MLFLOW_ENABLE_REMOTE_ASSISTANT": "false",
}
DEMO_USERS = {"alice": "acme", "bob": "globex"}


# -- helpers --------------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def _services() -> dict[str, dict[str, Any]]:
    services = _compose()["services"]
    assert isinstance(services, dict) and services
    return services


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as strings, from either the mapping or the ``KEY=value`` list form."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = (item.split("=", 1) if "=" in item else (item, "") for item in raw)
        return {key: value for key, value in pairs}
    return {
        key: "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        for key, value in raw.items()
    }


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def _option(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def _k8s_documents() -> list[dict[str, Any]]:
    documents: list[dict[str, Any]] = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document is not None:
                assert isinstance(document, dict) and "kind" in document, path
                documents.append(document)
    return documents


def _k8s(kind: str) -> dict[str, Any]:
    found = [document for document in _k8s_documents() if document["kind"] == kind]
    assert len(found) == 1, f"expected exactly one {kind} in {K8S_DIR}, found {len(found)}"
    return found[0]


def _dockerfile_stages() -> list[list[str]]:
    """Instructions (continuation lines joined, comments dropped) grouped by build stage."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    stages: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def _instructions(stage: list[str], keyword: str) -> list[str]:
    return [line[len(keyword) :].strip() for line in stage if line.upper().startswith(keyword + " ")]


# -- docker-compose.yml ---------------------------------------------------------------------------


def test_compose_has_the_whole_stack() -> None:
    services = _services()
    assert {"gateway", "mlflow", "postgres", "minio", "minio-init", "keycloak"} <= set(services)
    assert services["minio-init"]["image"].startswith(("minio/mc", "quay.io/minio/mc"))


@pytest.mark.parametrize("name", sorted(yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))["services"]))
def test_every_service_has_a_healthcheck(name: str) -> None:
    healthcheck = _services()[name].get("healthcheck")
    assert isinstance(healthcheck, dict), f"{name} has no healthcheck"
    assert not healthcheck.get("disable"), f"{name} disables its healthcheck"
    test = healthcheck.get("test")
    assert test and test not in (["NONE"], "NONE"), f"{name} has an empty healthcheck"
    if isinstance(test, list):
        assert test[0] in ("CMD", "CMD-SHELL"), f"{name}: healthcheck test must start with CMD or CMD-SHELL"
        assert len(test) > 1


def test_every_dependency_waits_for_a_healthy_service() -> None:
    services = _services()
    edges = 0
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on must use the long form with a condition"
        for dependency, options in depends_on.items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            assert options == {"condition": "service_healthy"} or options.get("condition") == "service_healthy", (
                f"{name} -> {dependency} must use condition: service_healthy"
            )
            edges += 1
    assert edges >= 5
    # The gateway starts last: after MLflow, the IdP and the bucket.
    assert {"mlflow", "keycloak", "minio-init"} <= set(services["gateway"]["depends_on"])
    assert {"postgres", "minio-init"} <= set(services["mlflow"]["depends_on"])


def test_dependencies_have_no_cycle() -> None:
    services = _services()
    state: dict[str, str] = {}

    def visit(name: str) -> None:
        assert state.get(name) != "visiting", f"dependency cycle through {name}"
        if state.get(name) == "done":
            return
        state[name] = "visiting"
        for dependency in services[name].get("depends_on", {}):
            visit(dependency)
        state[name] = "done"

    for name in services:
        visit(name)


def test_gateway_variables_are_real_settings() -> None:
    env = _environment(_services()["gateway"])
    unknown = sorted(key for key in env if key.startswith("GATEWAY_") and key not in GATEWAY_VARIABLES)
    assert not unknown, f"the gateway reads no such variables: {unknown}"


def test_gateway_required_variables_are_set_and_valid() -> None:
    env = _environment(_services()["gateway"])
    assert env.get("GATEWAY_UPSTREAM_URL")
    assert env.get("GATEWAY_ARTIFACTS_DESTINATION")
    sources = sorted(key for key in KEY_SOURCES if env.get(key))
    assert len(sources) == 1, f"exactly one key source, got {sources}"
    assert env.get("GATEWAY_HOST") == "0.0.0.0"
    # The settings module accepts the whole environment as the container would see it.
    settings = load_settings(env=env)
    assert settings.host == "0.0.0.0"
    assert settings.artifacts_destination == env["GATEWAY_ARTIFACTS_DESTINATION"]
    # The S3 endpoint the gateway's artifact store reads, and credentials for it.
    assert env.get("AWS_ENDPOINT_URL_S3") or env.get("MLFLOW_S3_ENDPOINT_URL")
    assert env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY")


def test_gateway_and_upstream_agree() -> None:
    services = _services()
    gateway_env = _environment(services["gateway"])
    mlflow = services["mlflow"]
    argv = _command(mlflow)
    assert "server" in argv
    upstream = urlsplit(gateway_env["GATEWAY_UPSTREAM_URL"])
    assert upstream.hostname == "mlflow"
    assert str(upstream.port) == _option(argv, "--port")
    # MLflow's Host allow-list must accept the Host header the gateway sends (the upstream's host:port).
    assert upstream.netloc in _option(argv, "--allowed-hosts").split(",")
    # Artifacts: the same destination on both sides, MLflow's on S3 behind a PostgreSQL store.
    assert _option(argv, "--artifacts-destination") == gateway_env["GATEWAY_ARTIFACTS_DESTINATION"]
    assert _option(argv, "--artifacts-destination").startswith("s3://")
    assert _option(argv, "--backend-store-uri").startswith("postgresql")
    assert urlsplit(_option(argv, "--backend-store-uri")).hostname == "postgres"
    # MLflow is never published: only the gateway reaches it.
    assert not mlflow.get("ports")


def test_mlflow_hardening_environment() -> None:
    import mlflow.environment_variables as mlflow_env

    env = _environment(_services()["mlflow"])
    for name, value in MLFLOW_HARDENING.items():
        assert hasattr(mlflow_env, name), f"MLflow 3.17.2 has no {name}"
        assert env.get(name) == value, f"mlflow service: {name} must be {value}"
    assert env.get("MLFLOW_S3_ENDPOINT_URL")


def test_bucket_matches_the_artifacts_destination() -> None:
    services = _services()
    bucket = urlsplit(_environment(services["gateway"])["GATEWAY_ARTIFACTS_DESTINATION"]).netloc
    script = " ".join(str(part) for part in services["minio-init"]["entrypoint"])
    assert re.search(rf"mc mb [^\n]*local/{re.escape(bucket)}\b", script)


def test_gateway_trusts_the_keycloak_realm() -> None:
    services = _services()
    gateway_env = _environment(services["gateway"])
    keycloak = services["keycloak"]
    keycloak_env = _environment(keycloak)
    realm = json.loads(REALM_FILE.read_text(encoding="utf-8"))
    issuer = gateway_env["GATEWAY_OIDC_ISSUER"]
    # Tokens carry iss=<KC_HOSTNAME>/realms/<realm> however Keycloak is reached, and the gateway fetches
    # discovery from that same URL inside the compose network: both must name the keycloak service.
    assert issuer == f"{keycloak_env['KC_HOSTNAME'].rstrip('/')}/realms/{realm['realm']}"
    assert urlsplit(issuer).hostname == "keycloak"
    assert "start-dev" in _command(keycloak) and "--import-realm" in _command(keycloak)
    assert gateway_env["GATEWAY_ROLES_CLAIM"] == "realm_access.roles"
    assert gateway_env["GATEWAY_JWT_AUDIENCE"] == "mlflow"
    assert gateway_env.get("GATEWAY_TENANT_CLAIM", "tenant_id") == "tenant_id"


def test_every_referenced_file_exists() -> None:
    checked = 0
    for name, service in _services().items():
        build = service.get("build")
        if build is not None:
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            assert context.is_dir(), f"{name}: build context {context} does not exist"
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            assert (context / dockerfile).is_file(), f"{name}: {context / dockerfile} does not exist"
            checked += 1
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: volume source {source} does not exist"
                checked += 1
            else:
                assert source in (_compose().get("volumes") or {}), f"{name}: undeclared named volume {source}"
    assert checked >= 3


def test_keycloak_imports_the_realm_file() -> None:
    volumes = _services()["keycloak"]["volumes"]
    mounts = {volume.split(":")[0]: volume.split(":")[1] for volume in volumes}
    target = mounts[f"./{REALM_FILE.relative_to(ROOT).as_posix()}"]
    assert target.startswith("/opt/keycloak/data/import/") and target.endswith(".json")


# -- deploy/keycloak ------------------------------------------------------------------------------


def _realm() -> dict[str, Any]:
    realm = json.loads(REALM_FILE.read_text(encoding="utf-8"))
    assert isinstance(realm, dict)
    return realm


def test_realm_has_both_tenants_users() -> None:
    users = {user["username"]: user for user in _realm()["users"]}
    for username, tenant in DEMO_USERS.items():
        user = users[username]
        assert user["enabled"]
        assert user["attributes"]["tenant_id"] == [tenant]
        assert any(credential["type"] == "password" for credential in user["credentials"])
        assert not user.get("requiredActions"), f"{username} could not get a token by password"
        assert {"viewer", "editor", "admin"} & set(user["realmRoles"])


def test_realm_roles() -> None:
    names = {role["name"] for role in _realm()["roles"]["realm"]}
    assert {"viewer", "editor", "admin"} <= names


def test_mlflow_client_maps_tenant_and_audience() -> None:
    client = next(client for client in _realm()["clients"] if client["clientId"] == "mlflow")
    mappers = {mapper["protocolMapper"]: mapper for mapper in client["protocolMappers"]}
    tenant = mappers["oidc-usermodel-attribute-mapper"]["config"]
    assert tenant["user.attribute"] == "tenant_id"
    assert tenant["claim.name"] == "tenant_id"
    assert tenant["access.token.claim"] == "true"
    audience = mappers["oidc-audience-mapper"]["config"]
    assert audience["included.client.audience"] == "mlflow"
    assert audience["access.token.claim"] == "true"
    # realm_access.roles comes from the `roles` client scope.
    assert "roles" in client["defaultClientScopes"]
    assert client["directAccessGrantsEnabled"] is True


def test_gateway_browser_login_client_matches_the_compose_settings() -> None:
    """The web UI's "Sign in with Keycloak": the realm's client and the gateway's settings agree."""
    env = _environment(_services()["gateway"])
    settings = load_settings(env=env)
    assert settings.oidc_client_id and settings.oidc_redirect_url and settings.session_secret
    client = next(client for client in _realm()["clients"] if client["clientId"] == settings.oidc_client_id)
    assert client["enabled"] and client["standardFlowEnabled"] and not client["implicitFlowEnabled"]
    assert client["publicClient"] is False and client["secret"] == settings.oidc_client_secret
    assert client["attributes"]["pkce.code.challenge.method"] == "S256"
    assert client["redirectUris"] == [settings.oidc_redirect_url]  # exact, no wildcard
    redirect = urlsplit(settings.oidc_redirect_url)
    assert client["attributes"]["post.logout.redirect.uris"] == f"{redirect.scheme}://{redirect.netloc}/login"
    # The gateway published on the compose port the redirect URL names.
    assert f"{redirect.port}:8080" in _services()["gateway"]["ports"]
    # Its access tokens pass the gateway like API tokens: tenant claim, audience, realm roles.
    mappers = {mapper["protocolMapper"]: mapper["config"] for mapper in client["protocolMappers"]}
    assert mappers["oidc-usermodel-attribute-mapper"]["claim.name"] == settings.tenant_claim
    assert mappers["oidc-audience-mapper"]["included.client.audience"] == settings.jwt_audience
    assert mappers["oidc-audience-mapper"]["access.token.claim"] == "true"
    assert "roles" in client["defaultClientScopes"]


def test_users_cannot_edit_their_tenant() -> None:
    """A user who could edit ``tenant_id`` in the account console could move into another tenant."""
    providers = _realm()["components"]["org.keycloak.userprofile.UserProfileProvider"]
    profile = json.loads(providers[0]["config"]["kc.user.profile.config"][0])
    attribute = next(item for item in profile["attributes"] if item["name"] == "tenant_id")
    assert attribute["permissions"]["edit"] == ["admin"]
    assert profile.get("unmanagedAttributePolicy") in (None, "ADMIN_VIEW")


# -- Dockerfile -----------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_on_slim_python_311() -> None:
    stages = _dockerfile_stages()
    assert len(stages) >= 2
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"python:3\.11-slim", text)
    final = stages[-1]
    assert "--from=" in " ".join(_instructions(final, "COPY"))
    # No compilers or package-manager installs in the final image.
    runs = " ".join(_instructions(final, "RUN"))
    assert not re.search(r"\b(apt-get|apt|apk)\s+(install|add)\b", runs)
    assert not re.search(r"\b(gcc|g\+\+|build-essential|make)\b", runs)
    assert not re.search(r"\bpip\b", runs)


def test_dockerfile_runs_as_non_root() -> None:
    users = _instructions(_dockerfile_stages()[-1], "USER")
    assert users, "the final stage has no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")


def test_dockerfile_healthcheck_and_entry_point() -> None:
    final = _dockerfile_stages()[-1]
    healthchecks = _instructions(final, "HEALTHCHECK")
    assert healthchecks and "/health" in healthchecks[-1]
    assert "urllib" in healthchecks[-1]
    entrypoint = json.loads(_instructions(final, "ENTRYPOINT")[-1])
    assert entrypoint == ["mlflow-gateway", "serve"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts["mlflow-gateway"] == "gateway.cli:main"
    env = " ".join(_instructions(final, "ENV"))
    assert re.search(r"\bGATEWAY_HOST=0\.0\.0\.0\b", env)
    assert not _instructions(final, "CMD"), "configuration comes from the environment, not arguments"


def test_dockerfile_copies_what_the_build_context_has() -> None:
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()]
    included = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for stage in _dockerfile_stages():
        for copy in _instructions(stage, "COPY"):
            if "--from=" in copy:
                continue
            *sources, _ = copy.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                if "**" in ignore:
                    assert source.rstrip("/") in included, f"COPY {source}: excluded by .dockerignore"


def test_upstream_image_pins_the_tested_mlflow() -> None:
    pinned = re.search(r'"mlflow==([0-9.]+)"', (ROOT / "deploy" / "mlflow" / "Dockerfile").read_text(encoding="utf-8"))
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert pinned and f"mlflow=={pinned.group(1)}" in dev["dev"]


# -- deploy/k8s -----------------------------------------------------------------------------------


def test_k8s_manifests_parse_and_are_complete() -> None:
    kinds = sorted(document["kind"] for document in _k8s_documents())
    assert kinds == sorted(
        ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Secret", "Service"]
    )
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text(encoding="utf-8"))
    listed = set(kustomization["resources"])
    assert listed == {path.name for path in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}


def _gateway_container() -> dict[str, Any]:
    containers = _k8s("Deployment")["spec"]["template"]["spec"]["containers"]
    return next(container for container in containers if container["name"] == "gateway")


def test_deployment_probes() -> None:
    container = _gateway_container()
    port_names = {port["name"] for port in container["ports"]}
    readiness = container["readinessProbe"]["httpGet"]
    liveness = container["livenessProbe"]["httpGet"]
    assert readiness["path"] == "/ready"
    assert liveness["path"] == "/health"
    assert {readiness["port"], liveness["port"]} <= port_names | {8080}
    assert container["ports"][0]["containerPort"] == 8080


def test_deployment_security_and_resources() -> None:
    deployment = _k8s("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] >= 2
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    container = _gateway_container()
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert pod["automountServiceAccountToken"] is False


def test_deployment_settings_come_from_configmap_and_secret() -> None:
    container = _gateway_container()
    config_map, secret = _k8s("ConfigMap"), _k8s("Secret")
    sources = container["envFrom"]
    assert {"configMapRef": {"name": config_map["metadata"]["name"]}} in sources
    assert {"secretRef": {"name": secret["metadata"]["name"]}} in sources
    env = {**config_map["data"], **secret.get("stringData", {})}
    assert all(isinstance(value, str) for value in env.values()), "ConfigMap values must be strings"
    unknown = sorted(key for key in env if key.startswith("GATEWAY_") and key not in GATEWAY_VARIABLES)
    assert not unknown, f"the gateway reads no such variables: {unknown}"
    assert len([key for key in KEY_SOURCES if env.get(key)]) == 1
    settings = load_settings(env=env)
    assert settings.host == "0.0.0.0" and settings.artifacts_destination
    # Secret values never sit in the ConfigMap.
    assert not {"GATEWAY_JWT_SECRET", "AWS_SECRET_ACCESS_KEY"} & set(config_map["data"])


def test_service_hpa_and_pdb_target_the_deployment() -> None:
    deployment = _k8s("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = _k8s("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in {port["name"] for port in _gateway_container()["ports"]}
    pdb = _k8s("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"]
    hpa = _k8s("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_deploy_readme_documents_the_caches() -> None:
    text = (ROOT / "deploy" / "README.md").read_text(encoding="utf-8").lower()
    for phrase in ("experiment", "run", "logged model", "trace", "dataset", "jwks", "60 s", "rate limit"):
        assert phrase in text, f"deploy/README.md does not mention {phrase!r}"
