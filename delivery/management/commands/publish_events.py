"""Publish a JSON-lines file of event envelopes for an application and stage."""

import sys
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, BinaryIO

from django.core.management.base import (
    BaseCommand,
    CommandError,
    CommandParser,
    OutputWrapper,
)
from django.db import transaction

from delivery.publishing import (
    Envelope,
    InvalidEvent,
    PublishResult,
    parse_envelope,
    publish_many,
)
from destinations.models import Application, Stage

# Invalid lines listed in the summary; the rest are only counted.
SHOWN_ERRORS = 20


class Command(BaseCommand):
    help = (
        "Publish a JSON-lines file of event envelopes ({id, time, type, data} per "
        "line) to every destination of an application's stage. Event ids already "
        "recorded are skipped."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", type=Path, help="The JSON-lines file; - for stdin.")
        parser.add_argument(
            "--application", required=True, help="The application's slug."
        )
        parser.add_argument(
            "--stage", required=True, choices=Stage.values, help="TEST or PROD."
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=500,
            help="Events recorded per transaction (default 500).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        slug = options["application"]
        try:
            application = Application.objects.get(slug=slug)
        except Application.DoesNotExist as error:
            known = ", ".join(Application.objects.values_list("slug", flat=True)[:20])
            raise CommandError(
                f"No application has the slug {slug!r}. Known slugs: {known or 'none'}."
            ) from error
        if options["batch_size"] < 1:
            raise CommandError(
                f"--batch-size is {options['batch_size']}; give 1 or more."
            )

        path: Path = options["file"]
        total = _count_lines(path)
        progress = Progress(self.stderr, total)
        result = PublishResult()
        errors: list[str] = []
        batch: list[Envelope] = []
        with _open(path) as lines:
            for number, raw in enumerate(lines, start=1):
                progress.update(number)
                try:
                    # utf-8-sig drops a byte order mark, which editors may add.
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as error:
                    errors.append(
                        f"line {number}: byte {error.start + 1} is not UTF-8 "
                        f"({raw[error.start : error.start + 1]!r}). Save the file "
                        "as UTF-8."
                    )
                    continue
                if not line.strip():
                    continue
                try:
                    batch.append(parse_envelope(line))
                except InvalidEvent as error:
                    errors.append(f"line {number}: {error}")
                if len(batch) >= options["batch_size"]:
                    _publish(application, options["stage"], batch, result)
                    batch = []
        _publish(application, options["stage"], batch, result)
        progress.finish()
        errors += [
            f"event {event_id}: already recorded for another application or stage; "
            "event ids are unique across the platform, so give this event a new id."
            for event_id in result.conflicts
        ]

        self._summary(application, options["stage"], result, errors)
        if errors:
            count = "1 line was" if len(errors) == 1 else f"{len(errors)} lines were"
            raise CommandError(
                f"{count} invalid and not published; fix them and publish the file "
                "again (recorded events are skipped)."
            )

    def _summary(
        self,
        application: Application,
        stage: str,
        result: PublishResult,
        errors: list[str],
    ) -> None:
        self.stdout.write(
            f"{application.slug} {stage}: {result.recorded} events recorded, "
            f"{result.duplicates} already recorded and skipped, {len(errors)} "
            f"invalid; {result.deliveries} deliveries queued ({result.held} held "
            "for paused or disabled destinations)."
        )
        for error in errors[:SHOWN_ERRORS]:
            self.stderr.write(error)
        if len(errors) > SHOWN_ERRORS:
            self.stderr.write(f"... and {len(errors) - SHOWN_ERRORS} more.")


def _publish(
    application: Application,
    stage: str,
    batch: list[Envelope],
    result: PublishResult,
) -> None:
    if not batch:
        return
    with transaction.atomic():
        published = publish_many(application, stage, batch)
    result.recorded += published.recorded
    result.duplicates += published.duplicates
    result.deliveries += published.deliveries
    result.held += published.held
    result.conflicts += published.conflicts


def _open(path: Path) -> AbstractContextManager[BinaryIO]:
    """Open the file as bytes, so each line is decoded, and reported, on its own."""
    if str(path) == "-":
        # Leave stdin open for the caller of the command.
        return nullcontext(sys.stdin.buffer)
    try:
        return path.open("rb")
    except OSError as error:
        raise CommandError(f"Cannot read {path}: {error.strerror}.") from error


def _count_lines(path: Path) -> int | None:
    if str(path) == "-":
        return None
    try:
        with path.open("rb") as file:
            return sum(1 for _ in file)
    except OSError as error:
        raise CommandError(f"Cannot read {path}: {error.strerror}.") from error


class Progress:
    """A one-line progress bar on a terminal; nothing when output is redirected."""

    WIDTH = 30

    def __init__(self, stream: OutputWrapper, total: int | None) -> None:
        self.stream = stream
        self.total = total
        self.enabled = stream.isatty()

    def update(self, done: int) -> None:
        if not self.enabled or (done % 50 and done != self.total):
            return
        if self.total:
            filled = self.WIDTH * done // self.total
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            self.stream.write(f"\r[{bar}] {done}/{self.total} lines", ending="")
        else:
            self.stream.write(f"\r{done} lines", ending="")
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self.stream.write("")
