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


def shared_config(docs: list[dict]) -> dict[str, str]:
    """The data of the ConfigMap every service reads (generated as optout-config-<hash>)."""
    configs = [doc for name, doc in by_kind(docs, "ConfigMap").items() if name.startswith("optout-config")]
    assert len(configs) == 1, f"expected one optout-config ConfigMap, got {len(configs)}"
    return configs[0].get("data", {})


def effective_env(docs: list[dict], container: dict) -> dict[str, object]:
    """What a container's process sees: its envFrom ConfigMaps, then `env` on top (a literal value,
    or the valueFrom reference for a Secret or ConfigMap key)."""
    configs = by_kind(docs, "ConfigMap")
    env: dict[str, object] = {}
    for source_ in container.get("envFrom", []):
        if "configMapRef" in source_:
            name = source_["configMapRef"]["name"]
            assert name in configs, f"{container['name']}: envFrom names missing ConfigMap {name}"
            prefix = source_.get("prefix", "")
            env.update({prefix + key: value for key, value in configs[name].get("data", {}).items()})
    for variable in container.get("env", []):
        env[variable["name"]] = variable.get("value", variable.get("valueFrom"))
    return env


def service_container(docs: list[dict], deployment: str) -> dict:
    return pod_spec(by_kind(docs, "Deployment")[deployment])["containers"][0]


def named_ports(container: dict) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container.get("ports", []) if "name" in port}


def listen_port(address: object) -> int:
    assert isinstance(address, str) and ":" in address, f"not a host:port literal: {address!r}"
    return int(address.rsplit(":", 1)[1])


def selects(policy: dict, app: str) -> bool:
    """Whether a NetworkPolicy's podSelector selects the pods labelled app.kubernetes.io/name=app."""
    selector = policy["spec"]["podSelector"]
    if not selector:
        return True
    labels = selector.get("matchLabels", {})
    if labels and labels.get("app.kubernetes.io/name") != app:
        return False
    for expression in selector.get("matchExpressions", []):
        if expression["key"] != "app.kubernetes.io/name" or expression["operator"] != "In":
            return False
        if app not in expression["values"]:
            return False
    return bool(labels) or bool(selector.get("matchExpressions"))


def ingress_sources(docs: list[dict], app: str, port: int, port_name: str) -> list[list[dict]]:
    """The `from` lists of every ingress rule that lets traffic into `app` on `port`."""
    found = []
    for policy in by_kind(docs, "NetworkPolicy").values():
        if not selects(policy, app) or "Ingress" not in policy["spec"].get("policyTypes", ["Ingress"]):
            continue
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is None or any(p.get("port") in (port, port_name) for p in ports):
                found.append(rule.get("from", []))
    return found


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


def test_listen_addresses_in_the_config_map_match_the_named_container_ports(overlay):
    """The services bind what OPTOUT_GRPC_LISTEN and OPTOUT_METRICS_LISTEN say (default
    127.0.0.1:0, unreachable from outside the pod): the ConfigMap must set both, on all
    interfaces, to the containerPorts named grpc and metrics that probes, Services and
    NetworkPolicies use."""
    name, docs = overlay
    config = shared_config(docs)
    for variable in ("OPTOUT_GRPC_LISTEN", "OPTOUT_METRICS_LISTEN"):
        assert variable in config, f"{name}: {variable} is not in the optout-config ConfigMap"
        assert config[variable].startswith("0.0.0.0:"), f"{name}: {variable}={config[variable]}"
    for deployment in SERVICES:
        container = service_container(docs, deployment)
        ports = named_ports(container)
        env = effective_env(docs, container)
        assert listen_port(env["OPTOUT_GRPC_LISTEN"]) == ports["grpc"], f"{name}: {deployment} gRPC"
        assert listen_port(env["OPTOUT_METRICS_LISTEN"]) == ports["metrics"], (
            f"{name}: {deployment} listens for /metrics on {env['OPTOUT_METRICS_LISTEN']}, "
            f"its containerPort metrics is {ports.get('metrics')}"
        )


def test_fetcher_http_port_is_exposed_and_let_in(overlay):
    """Mailchimp webhooks and the Memberships HTTP API (Salesforce Apex callouts) reach the fetcher
    on OPTOUT_HTTP_LISTEN: a containerPort named http, a Service port, and a NetworkPolicy rule
    letting something in on it. Only the fetcher reads the HTTP settings."""
    name, docs = overlay
    container = service_container(docs, "optout-fetcher")
    ports = named_ports(container)
    assert "http" in ports, f"{name}: the fetcher declares no containerPort named http"
    env = effective_env(docs, container)
    assert env.get("OPTOUT_HTTP_LISTEN") == f"0.0.0.0:{ports['http']}", (
        f"{name}: OPTOUT_HTTP_LISTEN={env.get('OPTOUT_HTTP_LISTEN')!r}, containerPort http {ports['http']}"
    )
    service = by_kind(docs, "Service")["optout-fetcher"]
    http = [port for port in service["spec"]["ports"] if port["name"] == "http"]
    assert http and http[0]["targetPort"] in ("http", ports["http"]), f"{name}: Service port http"
    sources = ingress_sources(docs, "optout-fetcher", ports["http"], "http")
    assert sources, f"{name}: no NetworkPolicy lets anything in on the fetcher's HTTP port"
    assert any(
        peer.get("namespaceSelector") or peer.get("ipBlock") for peers in sources for peer in peers
    ), f"{name}: only in-namespace pods may reach the fetcher's HTTP port, not an ingress controller"
    for other in ("optout-rule-evaluator", "optout-salesforce-writer"):
        other_env = effective_env(docs, service_container(docs, other))
        leaked = sorted(k for k in other_env if k.startswith(("OPTOUT_HTTP_", "OPTOUT_WEBHOOK_")))
        assert not leaked, f"{name}: {other} is given fetcher-only settings {leaked}"
    public_url = env.get("OPTOUT_WEBHOOK_PUBLIC_URL")
    if public_url:
        # The fetcher refuses a public URL without the webhook secret.
        assert "secretKeyRef" in (env.get("OPTOUT_WEBHOOK_SECRET") or {}), name
    if name == "dev":
        # The sandbox plays Mailchimp in-cluster: it registers and delivers to the Service.
        assert public_url == f"http://optout-fetcher:{http[0]['port']}", public_url
        assert any(
            peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name") == "optout-sandbox"
            for peers in sources
            for peer in peers
        ), "dev: the sandbox cannot deliver webhooks to the fetcher"


def test_salesforce_settings_are_complete_and_named_files_are_mounted(overlay):
    """The fetcher refuses to start with only some of the Salesforce login URL, client id and
    secret (it reads them for imports), and every *_FILE setting must point into a volumeMount
    (the services read the CA and key files at start)."""
    name, docs = overlay
    for deployment in SERVICES:
        container = service_container(docs, deployment)
        env = effective_env(docs, container)
        if deployment != "optout-rule-evaluator":
            trio = ["OPTOUT_SALESFORCE_LOGIN_URL", "OPTOUT_SALESFORCE_CLIENT_ID", "OPTOUT_SALESFORCE_CLIENT_SECRET"]
            present = [variable for variable in trio if env.get(variable)]
            assert present in ([], trio), f"{name}: {deployment} has only {present} of {trio}"
        mounts = [mount["mountPath"] for mount in container.get("volumeMounts", [])]
        for variable, value in env.items():
            if PATH_VARIABLE.search(variable) and isinstance(value, str) and value.startswith("/"):
                assert covered(value, mounts), f"{name}: {deployment} {variable}={value}, mounts {mounts}"


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
    config = shared_config(docs)
    assert int(config["OPTOUT_PERSONS_PARTITIONS"]) == len(persons_dirty)
    # The queue names above assume no OPTOUT_QUEUE_PREFIX (the services prepend it to every queue).
    for configmap in by_kind(docs, "ConfigMap").values():
        assert not configmap.get("data", {}).get("OPTOUT_QUEUE_PREFIX"), configmap["metadata"]["name"]
    for deployment in ("optout-rule-evaluator", "optout-salesforce-writer"):
        env = effective_env(docs, service_container(docs, deployment))
        assert not env.get("OPTOUT_QUEUE_PREFIX"), f"{name}: {deployment} sets OPTOUT_QUEUE_PREFIX"
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
    config = shared_config(docs)
    if name == "prod":
        # Derived from the API key's data-centre suffix; a fixed URL would break other data centres.
        assert "OPTOUT_MAILCHIMP_URL" not in config, "prod: leave OPTOUT_MAILCHIMP_URL to the key"
        assert config["OPTOUT_SALESFORCE_LOGIN_URL"].startswith("https://")
    else:
        assert "optout-sandbox" in config["OPTOUT_MAILCHIMP_URL"]


def test_documented_amqp_url_names_the_broker_so_keda_resolves_it():
    """KEDA's operator reads amqp-url (TriggerAuthentication) from its own namespace, `keda`, where
    the short Service name `optout-rabbitmq` does not resolve: the URL deploy/README.md tells
    people to create must be namespace-qualified."""
    readme = source("deploy/README.md")
    hosts = re.findall(r'amqp-url="amqps?://[^"@]*@([^:/"]+)', readme)
    assert hosts, "deploy/README.md documents no amqp-url"
    for host in hosts:
        assert re.fullmatch(r"optout-rabbitmq\.[^.]+\.svc(\.cluster\.local)?", host), host


# --- validate-deploy must fail on broken manifests ----------------------------------------------


def run_validate(directory: pathlib.Path, compose_file: pathlib.Path | None = None) -> subprocess.CompletedProcess:
    compose_args = ["--compose", str(compose_file)] if compose_file else ["--skip-compose"]
    return subprocess.run(
        [str(REPO / "scripts" / "validate-deploy"), "--dir", str(directory), *compose_args],
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
        # A kustomization that does not render: it lists a resource file that is not there.
        ("base/kustomization.yaml", "  - keda.yaml\n", "  - keda.yaml\n  - missing-resource.yaml\n",
         "missing-resource.yaml"),
        # An overlay whose kustomization.yaml is not YAML (a tab, an unclosed list).
        ("overlays/dev/kustomization.yaml", "\nnamespace: optout-dev\n", "\nnamespace: optout-dev\n\tbroken: [\n",
         "overlays/dev failed"),
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
    assert "FAIL" in result.stdout, result.stdout


@pytest.fixture
def compose_copy(tmp_path) -> pathlib.Path:
    """docker-compose.yml in a directory of its own, with the files it names by relative path."""
    root = tmp_path / "compose"
    (root / "deploy" / "compose").mkdir(parents=True)
    shutil.copy(REPO / "docker-compose.yml", root / "docker-compose.yml")
    shutil.copy(REPO / "deploy" / "compose" / "sandbox.env", root / "deploy" / "compose" / "sandbox.env")
    shutil.copy(REPO / "deploy" / "otel-collector.yaml", root / "deploy" / "otel-collector.yaml")
    return root / "docker-compose.yml"


def test_validate_deploy_passes_on_an_unchanged_compose_copy(deploy_copy, compose_copy):
    result = run_validate(deploy_copy, compose_copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ok   {compose_copy}" in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("old", "new", "reported"),
    [
        # An option compose does not know.
        ("    stop_grace_period: 30s\n", "    stop_grace_period: 30s\n    restartt: always\n", "restartt"),
        # A named volume a service mounts but the file never declares.
        ("volumes:\n  rabbitmq-data:\n  postgres-data:\n  sandbox-state:\n",
         "volumes:\n  rabbitmq-data:\n  postgres-data:\n", "sandbox-state"),
    ],
)
def test_validate_deploy_fails_on_a_broken_compose_file(deploy_copy, compose_copy, old, new, reported):
    text = compose_copy.read_text()
    assert old in text, f"fixture drifted: {old!r} not in docker-compose.yml"
    compose_copy.write_text(text.replace(old, new, 1))
    result = run_validate(deploy_copy, compose_copy)
    assert result.returncode != 0, result.stdout
    assert f"FAIL {compose_copy} does not validate" in result.stdout, result.stdout
    assert reported in result.stdout + result.stderr, result.stdout + result.stderr


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


def compose_env(service: dict) -> dict[str, str]:
    """A compose service's environment: its env_file(s), then `environment` on top."""
    env: dict[str, str] = {}
    env_files = service.get("env_file") or []
    for env_file in [env_files] if isinstance(env_files, str) else env_files:
        for line in (REPO / env_file).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                env[key] = value
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) if "=" in item else (item, "") for item in environment)
    env.update({key: "" if value is None else str(value) for key, value in environment.items()})
    return env


def compose_mounts(service: dict) -> list[str]:
    """The container paths a compose service mounts (named volumes and bind mounts)."""
    targets = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            targets.append(volume["target"])
        else:
            parts = volume.split(":")
            targets.append(parts[1] if len(parts) > 1 else parts[0])
    return targets


def covered(path: str, mounts: list[str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


# Variables whose value is a file or directory the process opens.
PATH_VARIABLE = re.compile(r"_(FILE|DIR|PATH|CERT|KEY|CA)$")


def test_compose_services_mount_every_file_their_settings_name(compose):
    """A setting such as OPTOUT_SALESFORCE_CA_FILE (which sandbox.env sets for every service that
    reads it) must point into a volume that service mounts: the fetcher reads the CA at start and
    exits when it is missing. Also flags any absolute path into a volume some service mounts, in
    the environment or in a `--flag=/path` argument."""
    services = compose["services"]
    volume_paths = {target for service in services.values() for target in compose_mounts(service)}
    problems = []
    for name, service in services.items():
        mounts = compose_mounts(service)
        settings = dict(compose_env(service))
        command = service.get("command") or []
        for arg in command if isinstance(command, list) else command.split():
            if arg.startswith("--") and "=" in arg:
                flag, value = arg.split("=", 1)
                settings[flag] = value
        for key, value in settings.items():
            if not value.startswith("/"):
                continue
            names_a_path = PATH_VARIABLE.search(key) or key.startswith("--")
            into_a_volume = covered(value, sorted(volume_paths))
            if (names_a_path or into_a_volume) and not covered(value, mounts):
                problems.append(f"{name}: {key}={value} but it mounts only {mounts or 'nothing'}")
    assert not problems, "\n".join(problems)
    # The case that broke: sandbox.env names the sandbox's CA for everything that reads it.
    for name in ("fetcher", "salesforce-writer"):
        assert compose_env(services[name]).get("OPTOUT_SALESFORCE_CA_FILE"), name


def test_compose_listen_ports_match_the_kubernetes_ports(compose):
    """gRPC and /metrics listen on the same container ports in compose as in Kubernetes, so a
    scrape config or an optoutctl address carries over."""
    base = render(DEPLOY / "base")
    config = by_kind(base, "ConfigMap")
    shared = next(doc for name, doc in config.items() if name.startswith("optout-config"))["data"]
    for name in ("fetcher", "rule-evaluator", "salesforce-writer"):
        env = compose_env(compose["services"][name])
        for variable in ("OPTOUT_GRPC_LISTEN", "OPTOUT_METRICS_LISTEN"):
            assert env[variable] == shared[variable], f"{name}: {variable}"
    fetcher = compose_env(compose["services"]["fetcher"])
    published = [str(port) for port in compose["services"]["fetcher"]["ports"]]
    http_port = fetcher["OPTOUT_HTTP_LISTEN"].rsplit(":", 1)[1]
    assert fetcher["OPTOUT_HTTP_LISTEN"].startswith("0.0.0.0:")
    assert any(port.endswith(f":{http_port}") for port in published), published


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


def variables_read_by_the_code() -> dict[str, str]:
    """Every OPTOUT_* and OTEL_* variable a binary reads itself (clap `env = "..."`,
    std::env::var, the telemetry crate's `set("...")`, a `const ..._ENV: &str`), mapped to a file
    that reads it. Test-only names (containing TEST) are left out."""
    patterns = [
        re.compile(r'\benv\s*=\s*"((?:OPTOUT|OTEL)_[A-Z0-9_]+)"'),
        re.compile(r'env::var(?:_os)?\(\s*"((?:OPTOUT|OTEL)_[A-Z0-9_]+)"'),
        re.compile(r'\bset\(\s*"(OTEL_[A-Z0-9_]+)"'),
        re.compile(r'const [A-Z_]*ENV: &str = "((?:OPTOUT|OTEL)_[A-Z0-9_]+)"'),
    ]
    found: dict[str, str] = {}
    for path in sorted((REPO / "crates").glob("*/src/**/*.rs")):
        text = path.read_text()
        for pattern in patterns:
            for name in pattern.findall(text):
                if "TEST" not in name:
                    found.setdefault(name, str(path.relative_to(REPO)))
    return found


def test_readme_documents_every_variable_the_code_reads():
    """The README's configuration reference lists every variable; a new `env = "OPTOUT_..."`
    without a README row fails here."""
    found = variables_read_by_the_code()
    # The scan must see the settings of every binary, or it would pass vacuously.
    for known in ("OPTOUT_PAGE_SIZE", "OPTOUT_PREFETCH", "OPTOUT_BATCH_SIZE", "OPTOUT_FETCHER_ADDR",
                  "OPTOUT_GRPC_TLS_CLIENT_CA", "OPTOUT_BIN_DIR", "OPTOUT_CONFIG", "OTEL_SDK_DISABLED",
                  "OTEL_EXPORTER_OTLP_ENDPOINT"):
        assert known in found, f"the scan of crates/*/src no longer finds {known}"
    readme = source("README.md")
    configuration = readme[readme.index("## Configuration"):]
    configuration = configuration[: configuration.index("\n## ", 1)]
    documented = set(re.findall(r"`((?:OPTOUT|OTEL)_[A-Z0-9_]+)`", configuration))
    missing = sorted(f"{name} ({where})" for name, where in found.items() if name not in documented)
    assert not missing, f"read by the code but not in README.md's Configuration section: {missing}"


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
