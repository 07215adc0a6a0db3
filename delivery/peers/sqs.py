"""An SQS peer: moto's server on a loopback address, in this process or in a child.

moto (github.com/getmoto/moto) serves the SQS API over HTTP. It accepts any non-empty
credentials unless configured to enforce IAM, routes requests by the queue name and the
signing region, and keeps every queue in memory until it stops.
"""

import logging
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import boto3
from botocore.config import Config

# moto accepts any credentials; these only make boto3 sign its requests, which moto
# needs to tell SQS calls from S3 calls.
FAKE_ACCESS_KEY_ID = "moto-access-key-id"
FAKE_SECRET_ACCESS_KEY = "moto-secret-access-key"  # noqa: S105
DEFAULT_REGION = "eu-west-1"
# The account id moto puts in every queue URL when IAM is not enforced.
MOTO_ACCOUNT_ID = "123456789012"
# The folder `python -m delivery.peers.sqs` runs from, so that it finds this package.
PROJECT_DIR = Path(__file__).resolve().parents[2]


@dataclass
class SqsPeer:
    """A running moto server; `stop()` ends it."""

    host: str
    port: int
    _server: Any = field(default=None, repr=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def reset(self) -> None:
        """Delete every queue and message the peer holds."""
        request = urllib.request.Request(  # noqa: S310 - a loopback http URL we built
            f"{self.endpoint_url}/moto-api/reset", method="POST"
        )
        with urllib.request.urlopen(request, timeout=10):  # noqa: S310
            pass

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None


def start_sqs_peer(
    host: str = "127.0.0.1", port: int = 0, *, in_process: bool = True
) -> SqsPeer:
    """Start moto's server on `host`:`port` (0 picks a free port) and wait for it.

    In process, the server is a thread of this program (ThreadedMotoServer).
    Otherwise it is a child process (`python -m delivery.peers.sqs`), which keeps
    moto's work off this process's interpreter lock. Both read the clock cheaply
    (`speed_up_moto_clock`).
    """
    if in_process:
        return _start_threaded(host, port)
    return _start_subprocess(host, port)


def speed_up_moto_clock() -> None:
    """Make moto's SQS clock reads cheap, keeping what they return.

    moto 5.2.5 reads the time through datetime arithmetic, and it reads it for every
    queued message on each send to a FIFO queue (to count visible and delayed
    messages). A send to a queue of 500 messages took 0.5 s, most of it in those
    reads. time.time() returns the same seconds since the epoch.
    """
    from moto.sqs import models

    if getattr(models.unix_time_millis, "fast", False):
        return
    slow_unix_time = models.unix_time
    slow_unix_time_millis = models.unix_time_millis

    def unix_time(dt: datetime | None = None) -> float:
        return time.time() if dt is None else slow_unix_time(dt)

    def unix_time_millis(dt: datetime | None = None) -> float:
        return time.time() * 1000.0 if dt is None else slow_unix_time_millis(dt)

    unix_time_millis.fast = True  # type: ignore[attr-defined]
    models.unix_time = unix_time
    models.unix_time_millis = unix_time_millis


def _start_threaded(host: str, port: int) -> SqsPeer:
    from moto.server import ThreadedMotoServer

    speed_up_moto_clock()

    # werkzeug logs every request at INFO, which buries the portal's own log lines.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    bound_host, bound_port = server.get_host_and_port()
    return SqsPeer(host=bound_host, port=bound_port, _server=server)


def _start_subprocess(host: str, port: int, timeout: float = 30.0) -> SqsPeer:
    if port == 0:
        port = free_port(host)

    # A file, not a pipe: moto logs every request, and an unread pipe would fill up and
    # stall the server.
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by SqsPeer.stop()
    process = subprocess.Popen(
        [sys.executable, "-m", "delivery.peers.sqs", "-H", host, "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=PROJECT_DIR,
    )
    peer = SqsPeer(host=host, port=port, _process=process, _log=log)
    deadline = time.monotonic() + timeout
    while not _accepts_connections(host, port):
        if process.poll() is not None:
            log.seek(0)
            output = log.read().decode(errors="replace").strip()
            peer.stop()
            raise RuntimeError(
                f"The SQS peer exited with status {process.returncode} before "
                f"listening on {host}:{port}: {output[-2000:]}"
            )
        if time.monotonic() > deadline:
            peer.stop()
            raise RuntimeError(
                f"The SQS peer did not listen on {host}:{port} within {timeout:g} s."
            )
        time.sleep(0.1)
    return peer


def _accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on `host` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def sqs_client(endpoint_url: str, region: str = DEFAULT_REGION) -> Any:
    """Build a boto3 SQS client for the peer at `endpoint_url`, with fake keys."""
    return boto3.session.Session().client(
        "sqs",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=FAKE_ACCESS_KEY_ID,
        aws_secret_access_key=FAKE_SECRET_ACCESS_KEY,
        config=Config(retries={"total_max_attempts": 1}),
    )


def create_queue(
    endpoint_url: str,
    name: str,
    *,
    region: str = DEFAULT_REGION,
    attributes: dict[str, str] | None = None,
) -> str:
    """Create queue `name` on the peer and return the queue URL the peer reports.

    A name ending in .fifo makes a FIFO queue, as it must on SQS.
    """
    all_attributes = dict(attributes or {})
    if name.endswith(".fifo"):
        all_attributes.setdefault("FifoQueue", "true")
    response = sqs_client(endpoint_url, region).create_queue(
        QueueName=name, Attributes=all_attributes
    )
    return str(response["QueueUrl"])


def aws_queue_url(name: str, region: str = DEFAULT_REGION) -> str:
    """Return the queue URL real SQS would give queue `name` in moto's account.

    moto finds a queue by the last part of the URL, so a destination can carry the
    AWS form of the URL while its requests go to the peer's endpoint.
    """
    return f"https://sqs.{region}.amazonaws.com/{MOTO_ACCOUNT_ID}/{name}"


def peer_environment(endpoint_url: str) -> dict[str, str]:
    """Return the environment variables that send both stages' SQS calls to the peer."""
    environment = {}
    for stage in ("TEST", "PROD"):
        environment[f"{stage}_SQS_ENDPOINT_URL"] = endpoint_url
        environment[f"{stage}_AWS_ACCESS_KEY_ID"] = FAKE_ACCESS_KEY_ID
        environment[f"{stage}_AWS_SECRET_ACCESS_KEY"] = FAKE_SECRET_ACCESS_KEY
        environment[f"{stage}_AWS_PROFILE"] = ""
    # Calls that bypass the stage settings still reach the peer, never AWS.
    environment["AWS_ENDPOINT_URL_SQS"] = endpoint_url
    return environment


__all__ = [
    "DEFAULT_REGION",
    "FAKE_ACCESS_KEY_ID",
    "FAKE_SECRET_ACCESS_KEY",
    "MOTO_ACCOUNT_ID",
    "SqsPeer",
    "aws_queue_url",
    "create_queue",
    "free_port",
    "peer_environment",
    "sqs_client",
    "start_sqs_peer",
]


if __name__ == "__main__":
    # A child process started by start_sqs_peer: moto's server with a cheap clock.
    from moto.server import main

    speed_up_moto_clock()
    main(sys.argv[1:])
