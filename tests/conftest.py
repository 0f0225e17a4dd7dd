"""Shared fixtures: one local Ray per test session, a de-identification key, an S3-compatible server on 127.0.0.1."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

os.environ.setdefault("MERMED_DEID_KEY", "test-key-0123456789abcdef0123456789abcdef")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def _start_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the whole session (2 CPUs, as on CI).

    Started after the S3 server so that its endpoint and credentials reach Ray's workers through the environment.
    """
    import ray

    if not ray.is_initialized():
        _start_ray()
    yield ray
    ray.shutdown()


@pytest.fixture
def restart_ray(ray_session):
    """A function that restarts the session's Ray, so that its workers see the environment as it is now (a test
    that points them at another S3 endpoint restarts it again after putting the environment back)."""

    def restart() -> None:
        ray_session.shutdown()
        _start_ray()

    return restart


@pytest.fixture(scope="module")
def fresh_ray(ray_session):
    """The session's Ray restarted, for a module that runs Ray Train or Tune jobs.

    A driver that has run a couple of dozen Ray Train and Tune jobs on one local Ray (Ray 2.60) came to a point
    where a new TrainController was created but never ran its control loop, and the run waited for ever; the
    same tests pass on a fresh Ray. Restarting costs a few seconds per module and keeps each module's jobs
    independent of what earlier modules left behind.
    """
    ray_session.shutdown()
    _start_ray()
    return ray_session


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's standalone server) on 127.0.0.1; yields its endpoint URL.

    The AWS variables are set for this process and, through the environment, for Ray workers started later.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the test S3 server; yields its name."""
    import uuid

    import s3fs

    name = f"mermed-{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir(name)
    return name


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent (real sample files live there only on the project's machines)")
    return SHARED_DATA


def pytest_collection_modifyitems(config, items):
    """Fault-injection tests run last: a killed Ray worker can leave the shared session's cluster degraded
    (placement groups awaiting clean-up), which must not starve the ordinary tests that follow."""
    items.sort(key=lambda item: item.get_closest_marker("faults") is not None)
