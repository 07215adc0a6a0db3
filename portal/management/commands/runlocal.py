"""Run the whole product on one machine: peers, worker and web server."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser

from delivery.models import Delivery, DeliveryStatus
from delivery.peers.pubsub import (
    PubSubPeer,
    create_subscription,
    create_topic,
    start_pubsub_peer,
)
from delivery.peers.pubsub import peer_environment as pubsub_peer_environment
from delivery.peers.servicebus import ServiceBusPeer, start_servicebus_peer
from delivery.peers.sqs import SqsPeer, create_queue, start_sqs_peer
from delivery.peers.sqs import peer_environment as sqs_peer_environment
from delivery.testevents import send_test_event
from destinations import demo
from destinations.models import Destination, State

SMOKE_TIMEOUT = 60.0


class Command(BaseCommand):
    help = (
        "Migrate, create the demo data, start the local SQS, Pub/Sub and Service Bus "
        "peers, a Celery worker and the web server, and run until interrupted."
    )
    # System checks run inside handle(), so that a missing key stops the start with
    # the check's own message.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--port", type=int, default=8000, help="Web server port on 127.0.0.1."
        )
        parser.add_argument(
            "--sqs-port",
            type=int,
            default=4566,
            help="Port of the local SQS peer on 127.0.0.1.",
        )
        parser.add_argument(
            "--smoke",
            action="store_true",
            help=(
                "Start everything, send a test event to each active demo destination "
                "through the worker, check the web server answers, then stop."
            ),
        )

    def handle(self, *args: Any, **options: Any) -> None:
        call_command("check")
        call_command("migrate", interactive=False, verbosity=0)

        peers = LocalPeers.start(options["sqs_port"])
        children: list[subprocess.Popen[bytes]] = []
        try:
            login = demo.seed_demo(
                peers.servicebus.connection_string(demo.SERVICEBUS_QUEUE)
            )
            developer = demo.seed_status_demo()
            environment = {**os.environ, **peers.environment()}
            children.append(self._start_worker(environment))
            children.append(self._start_web(environment, options["port"]))
            url = f"http://127.0.0.1:{options['port']}/admin/"
            self._print_banner(url, login, developer, peers)

            if options["smoke"]:
                self._smoke(url, children)
            else:
                self._wait(children)
        finally:
            for child in children:
                _stop(child)
            peers.stop()

    def _start_worker(self, environment: dict[str, str]) -> subprocess.Popen[bytes]:
        schedule = Path(settings.VAR_DIR) / "celerybeat-schedule"
        command = [sys.executable, "-m", "celery", "-A", "portal", "worker"]
        command += ["--concurrency", "2", "--loglevel", "INFO"]
        # --beat runs the periodic sweep inside this worker.
        command += ["--beat", "--schedule", str(schedule)]
        return subprocess.Popen(
            command,
            env=environment,
            cwd=settings.BASE_DIR,
        )

    def _start_web(
        self, environment: dict[str, str], port: int
    ) -> subprocess.Popen[bytes]:
        manage = str(Path(settings.BASE_DIR) / "manage.py")
        return subprocess.Popen(
            [sys.executable, manage, "runserver", f"127.0.0.1:{port}", "--noreload"],
            env=environment,
            cwd=settings.BASE_DIR,
        )

    def _print_banner(
        self,
        url: str,
        login: demo.DemoLogin,
        developer: demo.DemoLogin,
        peers: "LocalPeers",
    ) -> None:
        status_url = url.removesuffix("admin/") + "status/"
        self.stdout.write(
            self.style.SUCCESS(
                "\nDestinations portal is starting.\n"
                f"  Admin:                {url}\n"
                f"  Demo login:           {login.username} / {login.password}\n"
                f"  Delivery status:      {status_url}\n"
                f"  App developer login:  {developer.username} / "
                f"{developer.password}\n"
                f"  SQS peer (moto):      {peers.sqs.endpoint_url}\n"
                f"  Pub/Sub peer:         {peers.pubsub.endpoint}\n"
                f"  Service Bus peer:     {peers.servicebus.endpoint}\n"
                "Both stages send to these local peers, never to a cloud. Open a demo "
                "destination and press 'Send test event'. Stop with Ctrl-C.\n"
            )
        )

    def _wait(self, children: list[subprocess.Popen[bytes]]) -> None:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            while all(child.poll() is None for child in children):
                time.sleep(0.5)
        except KeyboardInterrupt:
            self.stdout.write("Stopping.")
            return
        raise CommandError(
            "A child process stopped on its own; see its output above. Stopping."
        )

    def _smoke(self, url: str, children: list[subprocess.Popen[bytes]]) -> None:
        """Send a test event to every demo destination and wait for each result."""
        # The demo's paused destination points at a queue the peer lacks on purpose.
        destinations = Destination.objects.filter(
            State.filter(State.ACTIVE),
            application__slug=demo.DEMO_SLUG,
            name__in=demo.ACTIVE_DESTINATIONS,
        )
        deliveries = [send_test_event(d, requested_by=None) for d in destinations]
        deadline = time.monotonic() + SMOKE_TIMEOUT
        unfinished = (DeliveryStatus.PENDING, DeliveryStatus.SENDING)
        while time.monotonic() < deadline:
            for delivery in deliveries:
                delivery.refresh_from_db()
            if all(delivery.status not in unfinished for delivery in deliveries):
                break
            if any(child.poll() is not None for child in children):
                raise CommandError("Smoke run: a child process stopped early.")
            time.sleep(0.5)
        for delivery in deliveries:
            _check_delivered(delivery)
        _check_page(url)
        self.stdout.write(
            self.style.SUCCESS(
                f"Smoke run passed: {len(deliveries)} test events reached their "
                "local peers through the worker, and the admin answered."
            )
        )


def _check_delivered(delivery: Delivery) -> None:
    if delivery.status != DeliveryStatus.DELIVERED:
        attempt = delivery.attempts.first()
        detail = attempt.message if attempt else "no attempt was recorded"
        raise CommandError(
            f"Smoke run: the test event to {delivery.destination} ended as "
            f"{delivery.status!r}: {detail}"
        )


def _check_page(url: str) -> None:
    deadline = time.monotonic() + SMOKE_TIMEOUT
    while True:
        try:
            with urllib.request.urlopen(f"{url}login/", timeout=5) as response:  # noqa: S310
                if response.status == 200:
                    return
        except OSError as error:
            if time.monotonic() > deadline:
                raise CommandError(
                    f"Smoke run: {url} did not respond: {error}"
                ) from error
        time.sleep(0.5)


def _stop(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.terminate()
    try:
        child.wait(timeout=15)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


@dataclass
class LocalPeers:
    """The three local protocol peers, with the demo's queues and topics."""

    sqs: SqsPeer
    pubsub: PubSubPeer
    servicebus: ServiceBusPeer

    @classmethod
    def start(cls, sqs_port: int) -> "LocalPeers":
        try:
            sqs = start_sqs_peer("127.0.0.1", sqs_port, in_process=False)
        except RuntimeError as error:
            raise CommandError(
                f"The local SQS peer could not start on 127.0.0.1:{sqs_port}: {error} "
                "Choose another port with --sqs-port."
            ) from error
        for queue in demo.SQS_QUEUES.values():
            create_queue(sqs.endpoint_url, queue, region=demo.DEMO_REGION)

        pubsub = start_pubsub_peer("127.0.0.1")
        topic = create_topic(pubsub.endpoint, demo.PUBSUB_PROJECT, demo.PUBSUB_TOPIC)
        create_subscription(pubsub.endpoint, topic, "demo-orders-sub", ordering=True)

        servicebus = start_servicebus_peer(
            "127.0.0.1",
            session_queues=[demo.SERVICEBUS_QUEUE],
            key_name=demo.SERVICEBUS_KEY_NAME,
        )
        return cls(sqs=sqs, pubsub=pubsub, servicebus=servicebus)

    def environment(self) -> dict[str, str]:
        """Environment variables that send both stages' calls to the peers."""
        return {
            **sqs_peer_environment(self.sqs.endpoint_url),
            **pubsub_peer_environment(self.pubsub.endpoint),
        }

    def stop(self) -> None:
        self.servicebus.stop()
        self.pubsub.stop()
        self.sqs.stop()
