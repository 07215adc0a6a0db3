"""Re-encrypt every encrypted column with the first key in ENCRYPTION_KEYS.

A value that the first key already decrypts is left as it is and counted as
"already current", so a second run writes nothing and reports what is left to do.
The work itself is in destinations.rotation, which the admin's button also runs.
"""

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from destinations.rotation import (
    DEFAULT_BATCH_SIZE,
    Counts,
    SecretRotation,
    encrypted_fields,
    total,
)
from portal.checks import check_encryption_keys

__all__ = ["Command", "Counts", "encrypted_fields"]


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


class Command(BaseCommand):
    help = (
        "Re-encrypt every encrypted column with the first key in ENCRYPTION_KEYS. "
        "Values the first key already decrypts are left as they are. A value no key "
        "decrypts is reported by model and primary key, left unchanged, and makes the "
        "command exit with status 1."
    )
    # The key check runs inside handle(), so that call_command() and the command
    # line both stop with the check's own message before anything is read.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Read and decrypt every value and report the counts, writing nothing.",
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=DEFAULT_BATCH_SIZE,
            help=(
                f"Rows read and updated per transaction (default {DEFAULT_BATCH_SIZE})."
            ),
        )

    def handle(self, *args: Any, **options: Any) -> None:
        batch_size = options["batch_size"]
        if batch_size < 1:
            raise CommandError(
                f"--batch-size must be 1 or more, not {batch_size}. Leave it out to "
                f"use {DEFAULT_BATCH_SIZE}."
            )
        self.dry_run = options["dry_run"]
        self.check_keys()

        rotation = SecretRotation(
            dry_run=self.dry_run,
            batch_size=batch_size,
            on_undecryptable=self.report_undecryptable,
        )
        self.report(rotation.run())

    def check_keys(self) -> None:
        for error in check_encryption_keys(None):
            message = f"{error.id}: {error.msg}"
            if error.hint:
                message += f" {error.hint}"
            raise CommandError(message)

    def report_undecryptable(self, counts: Counts, pk: Any) -> None:
        # Only the model and primary key go into the report: the token is
        # ciphertext that an old key may still open.
        self.stderr.write(
            f"{counts.label} of primary key {pk} cannot be decrypted with any "
            "key in ENCRYPTION_KEYS; it was left unchanged."
        )

    def report(self, all_counts: list[Counts]) -> None:
        for counts in all_counts:
            self.stdout.write(counts.summary(self.dry_run))

        summed = total(all_counts)
        self.stdout.write(summed.summary(self.dry_run))

        if self.dry_run:
            self.stdout.write("Dry run: nothing was written.")
        if summed.changed:
            self.stdout.write(
                f"{plural(summed.changed, 'value')} changed while this command ran. "
                "Each was left as saved, so run the command again to check them."
            )
        if summed.failed_pks:
            raise CommandError(
                f"Cannot decrypt {plural(len(summed.failed_pks), 'value')} with any "
                "key in ENCRYPTION_KEYS, listed above by model and primary key. Each "
                "was left unchanged. Add the key it was encrypted with to "
                "ENCRYPTION_KEYS and run again, or enter the secret anew in the admin."
            )
