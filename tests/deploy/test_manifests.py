"""Checks of the deployment files: the rendered Kubernetes overlays, docker-compose.yml, the
Dockerfile, and scripts/validate-deploy itself (it must fail on a broken manifest).

Run: .venv/bin/python -m pytest tests/deploy -q   (needs kubectl with kustomize v4+; see
scripts/validate-deploy, which installs what is missing).
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import shutil
import subprocess

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
OVERLAYS = ["dev", "prod"]
SERVICES = {
    "optout-fetcher": "optout-fetcher",
    "optout-rule-evaluator": "optout-rule-evaluator",
    "optout-salesforce-writer": "optout-salesforce-writer",
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "ReplicaSet", "Pod"}
RBAC_KINDS = {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
# Env vars that carry credentials: they must come from a Secret, never a literal value.
SECRET_ENV = re.compile(r"(TOKEN|SECRET|PASSWORD|API_KEY|AMQP_URL|DATABASE_URL|PRIVATE_KEY)")


def kubectl() -> str:
    for candidate in (shutil.which("kubectl"), str(REPO / ".venv" / "bin" / "kubectl")):
        if candidate and pathlib.Path(candidate).exists():
            return candidate
    pytest.fail("kubectl not found: run scripts/validate-deploy once, it installs one into .venv")


def render(directory: pathlib.Path) -> list[dict]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, render(DEPLOY / "overlays" / request.param)


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def pod_spec(doc: dict) -> dict:
    if doc["kind"] == "Pod":
        return doc["spec"]
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def workloads(docs: list[dict]):
    for doc in docs:
        if doc["kind"] in WORKLOAD_KINDS:
            yield doc, pod_spec(doc)


def source(path: str) -> str:
    file = REPO / path
    assert file.exists(), f"{path} is missing"
    return file.read_text()


# --- Kubernetes ---------------------------------------------------------------------------------


def test_overlays_validate_against_kubernetes_and_crd_schemas():
    spec = importlib.util.spec_from_file_location(
        "validate_manifests", DEPLOY / "tools" / "validate_manifests.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    targets = [str(DEPLOY / "overlays" / name) for name in OVERLAYS]
    assert module.main(["--kubectl", kubectl(), *targets]) == 0


def test_each_service_has_deployment_service_pdb_and_service_account(overlay):
    name, docs = overlay
    for kind in ("Deployment", "Service", "PodDisruptionBudget", "ServiceAccount"):
        missing = set(SERVICES) - set(by_kind(docs, kind))
        assert not missing, f"{name}: no {kind} for {sorted(missing)}"


def test_service_probes_are_grpc_health_probes_on_the_grpc_port(overlay):
    name, docs = overlay
    for deployment in by_kind(docs, "Deployment").values():
        if deployment["metadata"]["name"] not in SERVICES:
            continue
        for container in pod_spec(deployment)["containers"]:
            ports = {port.get("name"): port["containerPort"] for port in container["ports"]}
            assert "grpc" in ports, f"{name}: {container['name']} declares no port named grpc"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe == "startupProbe" and probe not in container:
                    continue
                assert probe in container, f"{name}: {container['name']} has no {probe}"
                spec = container[probe]
                assert "grpc" in spec, f"{name}: {container['name']} {probe} is not a grpc probe"
                assert spec["grpc"]["port"] == ports["grpc"], (
                    f"{name}: {container['name']} {probe} probes port {spec['grpc']['port']}, "
                    f"the gRPC port is {ports['grpc']}"
                )
            assert "readinessProbe" in container and "livenessProbe" in container


def test_services_expose_the_grpc_and_metrics_ports(overlay):
    name, docs = overlay
    for service_name in SERVICES:
        service = by_kind(docs, "Service")[service_name]
        ports = {port["name"]: port["port"] for port in service["spec"]["ports"]}
        assert ports.get("grpc") == 50051, f"{name}: {service_name} gRPC port"
        assert ports.get("metrics") == 9090, f"{name}: {service_name} metrics port"


def test_every_container_has_requests_and_limits(overlay):
    name, docs = overlay
    for doc, spec in workloads(docs):
        for container in containers(spec):
            resources = container.get("resources", {})
            where = f"{name}: {doc['kind']}/{doc['metadata']['name']} container {container['name']}"
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(part, {})), f"{where}: no {part}"


def test_every_container_runs_as_non_root_read_only_without_capabilities(overlay):
    name, docs = overlay
    for doc, spec in workloads(docs):
        pod_security = spec.get("securityContext", {})
        for container in containers(spec):
            security = container.get("securityContext", {})
            where = f"{name}: {doc['kind']}/{doc['metadata']['name']} container {container['name']}"
            non_root = security.get("runAsNonRoot", pod_security.get("runAsNonRoot"))
            assert non_root is True, f"{where}: runAsNonRoot is not true"
            assert security.get("runAsUser", pod_security.get("runAsUser", 1)) != 0, where
            assert security.get("readOnlyRootFilesystem") is True, f"{where}: writable root"
            assert security.get("allowPrivilegeEscalation") is False, where
            assert security.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: caps"


def test_no_secret_values_are_rendered(overlay):
    name, docs = overlay
    for secret in by_kind(docs, "Secret").values():
        values = {**secret.get("data", {}), **secret.get("stringData", {})}
        filled = sorted(key for key, value in values.items() if value)
        assert not filled, f"{name}: Secret {secret['metadata']['name']} carries {filled}"
    for config in by_kind(docs, "ConfigMap").values():
        leaked = sorted(key for key in config.get("data", {}) if SECRET_ENV.search(key))
        assert not leaked, f"{name}: ConfigMap {config['metadata']['name']} holds {leaked}"
    for doc, spec in workloads(docs):
        for container in containers(spec):
            for env in container.get("env", []):
                if SECRET_ENV.search(env["name"]):
                    assert "secretKeyRef" in env.get("valueFrom", {}), (
                        f"{name}: {doc['metadata']['name']}/{container['name']} sets "
                        f"{env['name']} without a secretKeyRef"
                    )


def test_service_accounts_mount_no_token_and_there_is_no_rbac(overlay):
    name, docs = overlay
    assert not [doc["kind"] for doc in docs if doc["kind"] in RBAC_KINDS], f"{name}: RBAC found"
    for account in by_kind(docs, "ServiceAccount").values():
        assert account.get("automountServiceAccountToken") is False, account["metadata"]["name"]
    for doc, spec in workloads(docs):
        assert spec.get("automountServiceAccountToken") is False, doc["metadata"]["name"]
        assert spec.get("serviceAccountName"), f"{doc['metadata']['name']} uses the default SA"


def declared_queues() -> tuple[str, list[str]]:
    """The queue names the services declare, read from optout_amqp's topology and the writer."""
    topology = source("crates/amqp/src/topology.rs")
    members = re.search(r'MEMBERS_CHANGED_ROUTING_KEY: &str = "([^"]+)"', topology)
    assert members, "MEMBERS_CHANGED_ROUTING_KEY not found in crates/amqp/src/topology.rs"
    dirty = re.search(r'format!\("([a-z.]+)\{partition\}"\)', topology)
    assert dirty, "the persons.dirty routing key format was not found in topology.rs"
    writer = source("crates/salesforce-writer/src/config.rs")
    partitions = re.search(r'env = "OPTOUT_PERSONS_PARTITIONS", default_value_t = (\d+)', writer)
    assert partitions, "OPTOUT_PERSONS_PARTITIONS default not found in the writer's config"
    count = int(partitions.group(1))
    return members.group(1), [f"{dirty.group(1)}{p}" for p in range(count)]


def test_keda_triggers_name_exactly_the_queues_the_services_declare(overlay):
    name, docs = overlay
    members_changed, persons_dirty = declared_queues()
    scaled = by_kind(docs, "ScaledObject")
    auths = by_kind(docs, "TriggerAuthentication")

    def queues(scaled_object: dict) -> list[str]:
        triggers = scaled_object["spec"]["triggers"]
        for trigger in triggers:
            assert trigger["type"] == "rabbitmq"
            assert trigger["metadata"]["mode"] == "QueueLength"
            assert "host" not in trigger["metadata"], "broker URL must come from the Secret"
            auth = auths[trigger["authenticationRef"]["name"]]
            refs = auth["spec"]["secretTargetRef"]
            assert [ref["parameter"] for ref in refs] == ["host"]
        return [trigger["metadata"]["queueName"] for trigger in triggers]

    evaluator = scaled["optout-rule-evaluator"]
    writer = scaled["optout-salesforce-writer"]
    assert evaluator["spec"]["scaleTargetRef"]["name"] == "optout-rule-evaluator"
    assert writer["spec"]["scaleTargetRef"]["name"] == "optout-salesforce-writer"
    assert queues(evaluator) == [members_changed], name
    assert queues(writer) == persons_dirty, name
    # Single-active-consumer partitions: more writers than partitions would only stand by.
    assert writer["spec"]["maxReplicaCount"] == len(persons_dirty)
    config = next(iter(by_kind(docs, "ConfigMap").values()))["data"]
    assert int(config["OPTOUT_PERSONS_PARTITIONS"]) == len(persons_dirty)
    assert set(scaled) == {"optout-rule-evaluator", "optout-salesforce-writer"}


def test_scaled_deployments_leave_replicas_to_keda_and_fetcher_runs_two(overlay):
    name, docs = overlay
    deployments = by_kind(docs, "Deployment")
    assert "replicas" not in deployments["optout-rule-evaluator"]["spec"], name
    assert "replicas" not in deployments["optout-salesforce-writer"]["spec"], name
    assert deployments["optout-fetcher"]["spec"]["replicas"] == 2, name


def test_rabbitmq_cluster_has_one_node_in_dev_and_three_in_prod(overlay):
    name, docs = overlay
    cluster = by_kind(docs, "RabbitmqCluster")["optout-rabbitmq"]
    assert cluster["spec"]["replicas"] == {"dev": 1, "prod": 3}[name]


def test_network_policies_deny_by_default_and_allow_dns(overlay):
    name, docs = overlay
    policies = by_kind(docs, "NetworkPolicy")
    deny = policies["default-deny"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    dns_ports = {(p["protocol"], p["port"]) for p in policies["allow-dns"]["spec"]["egress"][0]["ports"]}
    assert dns_ports == {("UDP", 53), ("TCP", 53)}

    def selects_a_service(policy: dict) -> bool:
        selector = policy["spec"]["podSelector"]
        names = set(selector.get("matchExpressions", [{}])[0].get("values", []))
        names.add(selector.get("matchLabels", {}).get("app.kubernetes.io/name"))
        return bool(names & set(SERVICES))

    service_egress = {
        port["port"]
        for policy in policies.values()
        if selects_a_service(policy)
        for rule in policy["spec"].get("egress", [])
        for port in rule.get("ports", [])
    }
    assert {5672, 5432, 50051, 4317} <= service_egress, name
    assert (443 in service_egress) == (name == "prod"), f"{name}: SaaS egress only in prod"


def test_migration_job_runs_every_service_with_migrate_only(overlay):
    name, docs = overlay
    job = by_kind(docs, "Job")["optout-migrate"]
    commands = sorted(c["command"][0].rsplit("/", 1)[-1] for c in pod_spec(job)["containers"])
    assert commands == sorted(SERVICES.values())
    for container in pod_spec(job)["containers"]:
        assert container["command"][1:] == ["--migrate-only"]


def test_dev_runs_the_sandbox_and_postgres_and_prod_does_not(overlay):
    name, docs = overlay
    deployments = by_kind(docs, "Deployment")
    statefulsets = by_kind(docs, "StatefulSet")
    assert ("optout-sandbox" in deployments) == (name == "dev")
    assert ("optout-postgres" in statefulsets) == (name == "dev")
    config = next(iter(by_kind(docs, "ConfigMap").values()))["data"]
    if name == "prod":
        assert config["OPTOUT_MAILCHIMP_URL"].startswith("https://")
        assert config["OPTOUT_SALESFORCE_LOGIN_URL"].startswith("https://")
    else:
        assert "optout-sandbox" in config["OPTOUT_MAILCHIMP_URL"]


# --- validate-deploy must fail on broken manifests ----------------------------------------------


def run_validate(directory: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(REPO / "scripts" / "validate-deploy"), "--dir", str(directory), "--skip-compose"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


@pytest.fixture
def deploy_copy(tmp_path) -> pathlib.Path:
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_validate_deploy_passes_on_an_unchanged_copy(deploy_copy):
    result = run_validate(deploy_copy)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("path", "old", "new", "reported"),
    [
        # An unknown field in a built-in kind (strict schema).
        ("base/fetcher.yaml", "  revisionHistoryLimit: 5\n",
         "  revisionHistoryLimit: 5\n  replicaCount: 2\n", "replicaCount"),
        # A wrong type in a probe.
        ("base/rule-evaluator.yaml", "              port: 50051\n",
         "              port: grpc-port\n", "Deployment/optout-rule-evaluator"),
        # An unknown field in a custom resource (published CRD schema).
        ("base/keda.yaml", "  pollingInterval: 15\n", "  pollingIntervalSeconds: 15\n",
         "pollingIntervalSeconds"),
        # A kind nobody publishes a schema for.
        ("overlays/prod/network-policies.yaml", "kind: NetworkPolicy\nmetadata:\n  name: optout-to-saas",
         "kind: NetworkPolicee\nmetadata:\n  name: optout-to-saas", "no schema"),
    ],
)
def test_validate_deploy_fails_on_a_broken_manifest(deploy_copy, path, old, new, reported):
    target = deploy_copy / path
    text = target.read_text()
    assert old in text, f"fixture drifted: {old!r} not in {path}"
    target.write_text(text.replace(old, new, 1))
    result = run_validate(deploy_copy)
    assert result.returncode != 0, result.stdout
    assert reported in result.stdout, result.stdout


# --- docker-compose.yml and Dockerfile ----------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(source("docker-compose.yml"))


def test_compose_runs_the_whole_system_with_monitoring_by_default(compose):
    services = compose["services"]
    expected = {"rabbitmq", "postgres", "sandbox", "fetcher", "rule-evaluator",
                "salesforce-writer", "otel-collector", "jaeger"}
    assert expected <= set(services)
    assert not [name for name, svc in services.items() if "profiles" in svc]
    assert services["rabbitmq"]["image"].startswith("rabbitmq:3.13-management")
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["otel-collector"]["image"].startswith("otel/opentelemetry-collector-contrib:")
    assert services["jaeger"]["image"].startswith("jaegertracing/all-in-one:")


def test_compose_binds_every_port_to_localhost(compose):
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on all interfaces"


def test_compose_services_wait_for_healthy_dependencies(compose):
    services = compose["services"]
    for name in ("fetcher", "rule-evaluator", "salesforce-writer"):
        service = services[name]
        assert service["healthcheck"]["test"][:3] == ["CMD", "optoutctl", "health"], name
        for dependency, condition in service["depends_on"].items():
            wanted = "service_started" if dependency == "otel-collector" else "service_healthy"
            assert condition["condition"] == wanted, f"{name} -> {dependency}"
        assert {"rabbitmq", "postgres"} <= set(service["depends_on"]), name
        env = service["environment"]
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
        assert env["OTEL_SERVICE_NAME"] == f"optout-{name}"
    assert services["salesforce-writer"]["depends_on"]["rule-evaluator"]["condition"] == "service_healthy"
    for name in ("rabbitmq", "postgres", "sandbox", "jaeger"):
        assert "healthcheck" in services[name], name
    sandbox = " ".join(services["sandbox"]["command"])
    assert "--listen-mailchimp=0.0.0.0:8080" in sandbox
    assert "--listen-salesforce=0.0.0.0:8443" in sandbox


def test_dockerfile_builds_every_binary_as_non_root_with_a_grpc_healthcheck():
    dockerfile = source("Dockerfile")
    toolchain = re.search(r'channel = "(\d+\.\d+)', source("rust-toolchain.toml")).group(1)
    assert f"ARG RUST_IMAGE=rust:{toolchain}-bookworm" in dockerfile
    assert "cargo chef cook" in dockerfile and "cargo chef prepare" in dockerfile
    for binary in [*SERVICES.values(), "optoutctl", "optout-sandbox"]:
        assert f"--bin {binary}" in dockerfile, binary
    assert re.search(r"^USER 10001:10001$", dockerfile, re.M)
    assert re.search(r'^HEALTHCHECK .*\n\s+CMD \["optoutctl", "health", "--addr", "http://127.0.0.1:50051"\]',
                     dockerfile, re.M)


# --- the environment the files set is the environment the binaries read ----------------------


def test_every_optout_variable_set_by_the_deploy_files_is_read_by_some_binary(compose):
    rust = "\n".join(path.read_text() for path in (REPO / "crates").rglob("*.rs"))
    names: set[str] = set()
    for overlay_name in OVERLAYS:
        docs = render(DEPLOY / "overlays" / overlay_name)
        for config in by_kind(docs, "ConfigMap").values():
            names |= set(config.get("data", {}))
        for _, spec in workloads(docs):
            for container in containers(spec):
                names |= {env["name"] for env in container.get("env", [])}
    for service in compose["services"].values():
        names |= set(service.get("environment") or {})
        for env_file in [service["env_file"]] if isinstance(service.get("env_file"), str) else service.get("env_file", []):
            for line in (REPO / env_file).read_text().splitlines():
                if line and not line.startswith("#"):
                    names.add(line.split("=", 1)[0])
    unread = sorted(name for name in names if name.startswith("OPTOUT_") and f'"{name}"' not in rust)
    assert not unread, f"set by deploy files but read by no crate: {unread}"
