"""``ray job submit`` against a real head, as the README runs it on a cluster: ingest, then tiny pretraining.

The head is ``ray start --head`` in its own process group, with its own temp dir and ports, so it never meets
the session's ``ray_session`` (a ``ray.init`` inside pytest) or another Ray on the machine; it is stopped by
killing that process group, never by ``ray stop``, which stops every Ray on the machine.

Authentication (DESIGN.md pitfalls: Ray >= 2.60 protects the job API with a token): the head and the client
share a fresh token through ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN``, as cluster.yaml's nodes share one
through ``RAY_AUTH_TOKEN_PATH``; the test neither reads nor writes ``~/.ray/auth_token``. The job's ``python``
is the one on the head's PATH, so the head starts with this interpreter's bin directory first.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ingest.deid import Pseudonymizer
from ingest.samples import make_sample_corpus

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv running pytest: its `ray`, and the jobs' `python`
KEY = "job-submit-test-key-0123456789abcdef"
# What `--working-dir .` must not upload (Ray also honours .gitignore; this list does not rely on it).
EXCLUDES = [
    ".venv",
    ".git",
    ".hypothesis",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    "__pycache__",
    "demo_work",
]
MAX_UPLOAD_MIB = 5.0
START_TIMEOUT_S = 120
# Neither the session's Ray nor its key reaches the head: the jobs get the key from their runtime env only.
NOT_INHERITED = {
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_AUTH_TOKEN_PATH",
    "MERMED_DEID_KEY",
    "MERMED_DEID_KEY_FILE",
}
JOB_TIMEOUT_S = 420  # a job on a busy 2-core machine: the tiny pretraining took 210 s at load 20


@dataclass
class Head:
    api: str  # the dashboard's job API, http://127.0.0.1:PORT
    env: dict[str, str]  # the head's environment, also the client's (same token)
    token: str
    temp_dir: Path  # the head's --temp-dir


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free right now on 127.0.0.1 (held together so that none is drawn twice)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _get(url: str, token: str | None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def _left_in_session(sid: int) -> list[int]:
    """Live processes of session ``sid``, from /proc (zombies excluded: dead, waiting for their parent)."""
    left = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        with contextlib.suppress(OSError, ValueError):
            stat = Path("/proc", entry, "stat").read_text()
            state, _ppid, _pgrp, session = stat[stat.rindex(")") + 2 :].split()[:4]
            if int(session) == sid and state != "Z":
                left.append(int(entry))
    return left


def _stop(proc: subprocess.Popen) -> None:
    """Stop the head: SIGTERM, then SIGKILL, to its process group; then SIGKILL by pid to whatever still lives
    in its session (Ray gives each worker a process group of its own, inside the session the head started)."""
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait_s)
    deadline = time.monotonic() + 10
    while (left := _left_in_session(proc.pid)) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    # A short temp dir: Ray's unix sockets live under it and a socket path may not exceed 107 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="mermed-head-"))
    gcs, dashboard, agent, client = _free_ports(4)
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED} | {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "TQDM_DISABLE": "1",
    }
    log = tmp / "head.log"
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={gcs}",
        f"--dashboard-port={dashboard}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-agent-listen-port={agent}",
        f"--ray-client-server-port={client}",
        "--num-cpus=2",
        "--include-dashboard=true",
        f"--temp-dir={tmp / 'ray'}",
        "--disable-usage-stats",
    ]
    with log.open("w") as out:
        # A new session: its id is the head's pid, and so is the process group of the daemons it starts.
        proc = subprocess.Popen(command, stdout=out, stderr=out, env=env, start_new_session=True)
    api = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _ready(api, token):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not start (exit code {proc.poll()}):\n{_tail(log)}")
            time.sleep(1)
        yield Head(api, env, token, tmp / "ray")
    finally:
        try:
            _stop(proc)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _ready(api: str, token: str) -> bool:
    try:
        return _get(f"{api}/api/jobs/", token)[0] == 200
    except OSError:  # not listening yet
        return False


def submit(head: Head, submission_id: str, *entrypoint: str) -> str:
    """``ray job submit --working-dir .`` as a user types it; the CLI's output, once the job has SUCCEEDED."""
    runtime_env = {"excludes": EXCLUDES, "env_vars": {"MERMED_DEID_KEY": KEY}}
    command = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        head.api,
        "--submission-id",
        submission_id,
        "--working-dir",
        ".",
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        "python",
        *entrypoint,
    ]
    done = subprocess.run(
        command, cwd=ROOT, env=head.env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, check=False
    )
    output = done.stdout + done.stderr
    code, body = _get(f"{head.api}/api/jobs/{submission_id}", head.token)
    status = json.loads(body).get("status") if code == 200 else f"HTTP {code}"
    assert done.returncode == 0 and status == "SUCCEEDED", f"job {submission_id}: {status}\n{output[-6000:]}"
    return output


def test_job_api_refuses_requests_without_the_token(head):
    assert _get(f"{head.api}/api/jobs/", None)[0] == 401
    assert _get(f"{head.api}/api/jobs/", "not-the-token")[0] in (401, 403)
    assert _get(f"{head.api}/api/jobs/", head.token)[0] == 200


@pytest.fixture(scope="module")
def ingested(head, tmp_path_factory) -> tuple[Path, Path, str]:
    """(raw corpus, ingest output, CLI output) of one ingest job; the pretraining job reads its output."""
    work = tmp_path_factory.mktemp("jobs")
    raw, shards = work / "raw", work / "shards"
    make_sample_corpus(raw, per_class=2, size=64, slide_size=256)
    output = submit(
        head,
        "ingest-1",
        *("pipelines/ingest.py", "--input", str(raw), "--output", str(shards)),
        *("--labels", str(raw / "labels.csv")),
    )
    return raw, shards, output


def test_ingest_job(ingested):
    raw, shards, output = ingested
    manifest = json.loads((shards / "_manifest.json").read_text())
    files = [p for p in raw.rglob("*") if p.is_file() and p.name != "labels.csv"]
    inputs = [p.relative_to(raw).as_posix() for p in files]
    assert manifest["discovered"] == len(inputs) == manifest["ingested"] + manifest["quarantined"]
    assert manifest["quarantined"] == 0 and manifest["rows"] > 0
    assert set(manifest["modalities"]) == {"CT", "CXR", "US", "PATH", "CFP", "OCT", "DERM"}
    # Rows carry pseudonyms made with the key the job got through its runtime env (the head itself has none).
    sources = {
        s
        for shard in manifest["shards"]
        for s in pq.read_table(shards / shard, columns=["source"])["source"].to_pylist()
    }
    expected = {Pseudonymizer(KEY.encode()).source(rel) for rel in inputs}
    assert sources <= expected and len(sources) == manifest["ingested"]
    assert "written" in output


def test_working_dir_upload_is_the_code_only(head, ingested):
    """What ``--working-dir .`` shipped, as the head unpacked it: the code, without the venv or git."""
    packages = head.temp_dir / "session_latest" / "runtime_resources" / "working_dir_files"
    unpacked = [p for p in packages.iterdir() if p.is_dir()]  # beside them: *.zip.lock files
    assert unpacked
    for package in unpacked:
        files = [p for p in package.rglob("*") if p.is_file()]
        assert (package / "pipelines" / "ingest.py").is_file()
        assert not any(p.relative_to(package).parts[0] in {".venv", ".git"} for p in files)
        assert sum(p.stat().st_size for p in files) < MAX_UPLOAD_MIB * 2**20


def test_pretrain_job(head, ingested):
    _, shards, _ = ingested
    storage = shards.parent / "runs"
    output = submit(
        head,
        "pretrain-1",
        *("pipelines/pretrain.py", "--config", "configs/pretrain_tiny.yaml", "--data", str(shards)),
        *("--storage", str(storage), "--name", "job", "--steps", "3", "--workers", "1"),
    )
    encoder = storage / "job" / "encoder.safetensors"
    assert encoder.stat().st_size > 0 and (storage / "job" / "encoder.json").exists()
    assert "pretrained 3 steps" in output
