"""Starts one optout-sandbox process for the whole test session and hands its info to the tests.

The binary is `OPTOUT_SANDBOX_BIN`, or `<repo>/target/debug/optout-sandbox` (build it first with
`cargo build -p optout-sandbox`).
"""

import json
import os
import pathlib
import subprocess
import threading

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SANDBOX_ARGS = ["--seed", "7", "--audiences", "3", "--members", "300", "--person-accounts"]
START_TIMEOUT_SECONDS = 60


def _sandbox_binary() -> pathlib.Path:
    configured = os.environ.get("OPTOUT_SANDBOX_BIN")
    binary = pathlib.Path(configured) if configured else REPO / "target" / "debug" / "optout-sandbox"
    if not binary.exists():
        pytest.fail(f"sandbox binary {binary} not found: run `cargo build -p optout-sandbox` first")
    return binary


@pytest.fixture(scope="session")
def sandbox():
    """The SandboxInfo JSON (dict) of a running sandbox; terminated after the session."""
    process = subprocess.Popen(
        [str(_sandbox_binary()), *SANDBOX_ARGS],
        stdout=subprocess.PIPE,
        stderr=None,  # the sandbox logs to stderr: let pytest show it on failure
        text=True,
    )
    first_line = {}

    def read_first_line():
        first_line["line"] = process.stdout.readline()

    reader = threading.Thread(target=read_first_line, daemon=True)
    reader.start()
    reader.join(START_TIMEOUT_SECONDS)
    line = first_line.get("line", "")
    if not line:
        process.kill()
        pytest.fail(f"sandbox printed no info line within {START_TIMEOUT_SECONDS}s (exit {process.poll()})")
    info = json.loads(line)
    try:
        yield info
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
