"""Run the whole product on one machine: peers, worker and web server."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser

from delivery.models import Delivery, DeliveryStatus
from delivery.peers.sqs import SqsPeer, create_queue, peer_environment, start_sqs_peer
from delivery.testevents import send_test_event
from destinations import demo
from destinations.models import Destination

SMOKE_TIMEOUT = 60.0


class Command(BaseCommand):
    help = (
        "Migrate, create the demo data, start the local SQS peer, a Celery worker and "
        "the web server, and run until interrupted."
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
                "Start everything, send a test event to the demo FIFO queue through "
                "the worker, check the web server answers, then stop."
            ),
        )

    def handle(self, *args: Any, **options: Any) -> None:
        call_command("check")
        call_command("migrate", interactive=False, verbosity=0)
        login = demo.seed_demo()

        peer = self._start_peer(options["sqs_port"])
        children: list[subprocess.Popen[bytes]] = []
        try:
            environment = {**os.environ, **peer_environment(peer.endpoint_url)}
            children.append(self._start_worker(environment))
            children.append(self._start_web(environment, options["port"]))
            url = f"http://127.0.0.1:{options['port']}/admin/"
            self._print_banner(url, login, peer)

            if options["smoke"]:
                self._smoke(url, peer, children)
            else:
                self._wait(children)
        finally:
            for child in children:
                _stop(child)
            peer.stop()

    def _start_peer(self, port: int) -> SqsPeer:
        try:
            peer = start_sqs_peer("127.0.0.1", port, in_process=False)
        except RuntimeError as error:
            raise CommandError(
                f"The local SQS peer could not start on 127.0.0.1:{port}: {error} "
                "Choose another port with --sqs-port."
            ) from error
        for queue in demo.DEMO_QUEUES.values():
            create_queue(peer.endpoint_url, queue, region=demo.DEMO_REGION)
        return peer

    def _start_worker(self, environment: dict[str, str]) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "celery", "-A", "portal", "worker"]
        return subprocess.Popen(
            [*command, "--concurrency", "2", "--loglevel", "INFO"],
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

    def _print_banner(self, url: str, login: demo.DemoLogin, peer: SqsPeer) -> None:
        self.stdout.write(
            self.style.SUCCESS(
                "\nDestinations portal is starting.\n"
                f"  Admin:          {url}\n"
                f"  Demo login:     {login.username} / {login.password}\n"
                f"  Local SQS peer: {peer.endpoint_url} (TEST and PROD send here)\n"
                "Open a demo destination and press 'Send test event'. "
                "Stop with Ctrl-C.\n"
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

    def _smoke(
        self, url: str, peer: SqsPeer, children: list[subprocess.Popen[bytes]]
    ) -> None:
        destination = Destination.objects.get(
            application__slug="demo-shop", sqs_fifo=True
        )
        delivery = send_test_event(destination, requested_by=None)
        deadline = time.monotonic() + SMOKE_TIMEOUT
        while time.monotonic() < deadline:
            delivery.refresh_from_db()
            if delivery.status not in (DeliveryStatus.PENDING, DeliveryStatus.SENDING):
                break
            if any(child.poll() is not None for child in children):
                raise CommandError("Smoke run: a child process stopped early.")
            time.sleep(0.5)
        _check_delivered(delivery)
        _check_page(url)
        self.stdout.write(
            self.style.SUCCESS(
                f"Smoke run passed: test event {delivery.event_id} reached "
                f"{destination.sqs_queue_url} through {peer.endpoint_url}, and the "
                "admin answered."
            )
        )


def _check_delivered(delivery: Delivery) -> None:
    if delivery.status != DeliveryStatus.DELIVERED:
        attempt = delivery.attempts.first()
        detail = attempt.message if attempt else "no attempt was recorded"
        raise CommandError(
            f"Smoke run: the test event ended as {delivery.status!r}: {detail}"
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
                    f"Smoke run: {url} did not answer: {error}"
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
