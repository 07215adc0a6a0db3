"""Re-encrypt every encrypted column with the first key in ENCRYPTION_KEYS.

A value that the first key already decrypts is left as it is and counted as
"already current", so a second run writes nothing and reports what is left to do.
"""

from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.apps import apps
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import models, transaction

from destinations import encryption
from destinations.encryption import EncryptedTextField
from portal.checks import check_encryption_keys

DEFAULT_BATCH_SIZE = 500


def encrypted_fields() -> Iterator[tuple[type[models.Model], EncryptedTextField]]:
    """Yield each model and EncryptedTextField that owns a database column.

    Only local concrete fields count, so a proxy model or a multi-table child never
    yields its parent's column a second time.
    """
    for model in apps.get_models():
        if model._meta.proxy:
            continue
        for model_field in model._meta.local_concrete_fields:
            if isinstance(model_field, EncryptedTextField):
                yield model, model_field


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


@dataclass
class Counts:
    """Outcome counts for the values of one column."""

    label: str
    rotated: int = 0
    current: int = 0
    empty: int = 0
    # Rows whose token changed between the read and the UPDATE, which was skipped.
    changed: int = 0
    failed_pks: list[Any] = field(default_factory=list)

    def summary(self, dry_run: bool) -> str:
        rotated = "to rotate" if dry_run else "rotated"
        return (
            f"{self.label}: {self.rotated} {rotated}, {self.current} already current, "
            f"{self.empty} empty, {len(self.failed_pks)} failed, {self.changed} "
            "changed during the run"
        )


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
        self.batch_size = batch_size
        self.load_keys()

        all_counts = [
            self.rotate_column(model, model_field)
            for model, model_field in encrypted_fields()
        ]
        self.report(all_counts)

    def load_keys(self) -> None:
        for error in check_encryption_keys(None):
            message = f"{error.id}: {error.msg}"
            if error.hint:
                message += f" {error.hint}"
            raise CommandError(message)

        keys = encryption.parse_keys(settings.ENCRYPTION_KEYS)
        self.first_key: Fernet = keys[0]
        self.all_keys = MultiFernet(keys)

    def rotate_column(
        self, model: type[models.Model], model_field: EncryptedTextField
    ) -> Counts:
        counts = Counts(label=f"{model._meta.label}.{model_field.name}")
        for batch in self.batches(model, model_field.attname):
            # A dry run takes no write lock, which SQLite would hold for the batch.
            writing = nullcontext() if self.dry_run else transaction.atomic()
            with writing:
                for pk, token in batch:
                    self.rotate_value(model, model_field.attname, pk, token, counts)
        return counts

    def batches(
        self, model: type[models.Model], attname: str
    ) -> Iterator[list[tuple[Any, str | None]]]:
        # Keyset pagination on the primary key: each batch is one short query, and
        # rows inserted or deleted meanwhile cannot shift a later batch.
        rows = model._base_manager.order_by("pk").values_list("pk", attname)
        last_pk = None
        while True:
            page = rows if last_pk is None else rows.filter(pk__gt=last_pk)
            batch = list(page[: self.batch_size])
            if not batch:
                return
            yield batch
            last_pk = batch[-1][0]

    def rotate_value(
        self,
        model: type[models.Model],
        attname: str,
        pk: Any,
        token: str | None,
        counts: Counts,
    ) -> None:
        if not token:
            counts.empty += 1
            return

        if self.is_current(token):
            counts.current += 1
            return

        try:
            new_token = self.rotate_token(token)
        except InvalidToken:
            # Only the model and primary key go into the report: the token is
            # ciphertext that an old key may still open.
            counts.failed_pks.append(pk)
            self.stderr.write(
                f"{counts.label} of primary key {pk} cannot be decrypted with any "
                "key in ENCRYPTION_KEYS; it was left unchanged."
            )
            return

        if self.dry_run:
            counts.rotated += 1
            return

        # Conditional on the token read, so an edit saved since then is not
        # overwritten with the older secret.
        updated = model._base_manager.filter(pk=pk, **{attname: token}).update(
            **{attname: new_token}
        )
        if updated:
            counts.rotated += 1
        else:
            counts.changed += 1

    def is_current(self, token: str) -> bool:
        try:
            self.first_key.decrypt(token.encode())
        except InvalidToken:
            return False
        return True

    def rotate_token(self, token: str) -> str:
        """Decrypt with any configured key and encrypt with the first one."""
        return self.all_keys.rotate(token.encode()).decode()

    def report(self, all_counts: list[Counts]) -> None:
        for counts in all_counts:
            self.stdout.write(counts.summary(self.dry_run))

        total = Counts(label="Total")
        for counts in all_counts:
            total.rotated += counts.rotated
            total.current += counts.current
            total.empty += counts.empty
            total.changed += counts.changed
            total.failed_pks += counts.failed_pks
        self.stdout.write(total.summary(self.dry_run))

        if self.dry_run:
            self.stdout.write("Dry run: nothing was written.")
        if total.changed:
            self.stdout.write(
                f"{plural(total.changed, 'value')} changed while this command ran. "
                "Each was left as saved, so run the command again to check them."
            )
        if total.failed_pks:
            raise CommandError(
                f"Cannot decrypt {plural(len(total.failed_pks), 'value')} with any key "
                "in ENCRYPTION_KEYS, listed above by model and primary key. Each was "
                "left unchanged. Add the key it was encrypted with to ENCRYPTION_KEYS "
                "and run again, or enter the secret anew in the admin."
            )
