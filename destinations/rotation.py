"""Re-encryption of every encrypted column with the first key in ENCRYPTION_KEYS.

Shared by `manage.py rotate_secrets` and the admin's "Rotate secrets" button. A value
that the first key already decrypts is left as it is and counted as "already
current", so a second run writes nothing and reports what is left to do.
"""

import logging
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.apps import apps
from django.conf import settings
from django.db import models, transaction

from . import encryption
from .encryption import EncryptedTextField

logger = logging.getLogger(__name__)

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


@dataclass
class Counts:
    """Outcome counts for the values of one column."""

    label: str
    model: type[models.Model] | None = None
    rotated: int = 0
    current: int = 0
    empty: int = 0
    # Rows whose token changed between the read and the UPDATE, which was skipped.
    changed: int = 0
    rotated_pks: list[Any] = field(default_factory=list)
    failed_pks: list[Any] = field(default_factory=list)

    def add(self, other: "Counts") -> None:
        self.rotated += other.rotated
        self.current += other.current
        self.empty += other.empty
        self.changed += other.changed
        self.rotated_pks += other.rotated_pks
        self.failed_pks += other.failed_pks

    def summary(self, dry_run: bool) -> str:
        rotated = "to rotate" if dry_run else "rotated"
        return (
            f"{self.label}: {self.rotated} {rotated}, {self.current} already current, "
            f"{self.empty} empty, {len(self.failed_pks)} failed, {self.changed} "
            "changed during the run"
        )


def total(all_counts: list[Counts]) -> Counts:
    """Return the sum of every column's counts, labelled "Total"."""
    result = Counts(label="Total")
    for counts in all_counts:
        result.add(counts)
    return result


def report_undecryptable(counts: Counts, pk: Any) -> None:
    # Only the model and primary key go into the report: the token is ciphertext
    # that an old key may still open.
    logger.warning(
        "%s of primary key %s cannot be decrypted with any key in ENCRYPTION_KEYS; "
        "it was left unchanged.",
        counts.label,
        pk,
    )


class SecretRotation:
    """One pass over every encrypted column.

    The caller checks ENCRYPTION_KEYS first (destinations.E001 and E002): this class
    raises EncryptionKeyError when they are missing or malformed.
    """

    def __init__(
        self,
        dry_run: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
        on_undecryptable: Callable[[Counts, Any], None] = report_undecryptable,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be 1 or more, not {batch_size}.")
        self.dry_run = dry_run
        self.batch_size = batch_size
        self.on_undecryptable = on_undecryptable

        keys = encryption.parse_keys(settings.ENCRYPTION_KEYS)
        self.first_key: Fernet = keys[0]
        self.all_keys = MultiFernet(keys)

    def run(self) -> list[Counts]:
        """Rotate every encrypted column and return one Counts per column."""
        return [
            self.rotate_column(model, model_field)
            for model, model_field in encrypted_fields()
        ]

    def rotate_column(
        self, model: type[models.Model], model_field: EncryptedTextField
    ) -> Counts:
        counts = Counts(label=f"{model._meta.label}.{model_field.name}", model=model)
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
            counts.failed_pks.append(pk)
            self.on_undecryptable(counts, pk)
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
            counts.rotated_pks.append(pk)
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
