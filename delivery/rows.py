"""Inserting many rows at once, given as column values by field attname."""

from collections.abc import Sequence
from functools import partial
from typing import Any

from django.db import connection
from django.db.models import (
    BooleanField,
    CharField,
    DateTimeField,
    ForeignKey,
    IntegerField,
    Model,
    TextField,
)
from django.db.models.fields import AutoFieldMixin, Field

Row = dict[str, Any]

# Fields whose values go to psycopg as they are: strings, numbers, booleans, keys
# and aware datetimes need no conversion by Django.
_PLAIN_FIELDS = (CharField, TextField, BooleanField, IntegerField, DateTimeField)


def insert_rows(model: type[Model], rows: Sequence[Row]) -> None:
    """Insert `rows` of `model`: with COPY on PostgreSQL, in a multi-row INSERT
    elsewhere. Each row maps every concrete field's attname, except an
    auto-increment primary key, to its value."""
    if connection.vendor == "postgresql":
        copy_rows(model, rows)
    elif rows:
        _fields(model, rows[0])
        model._default_manager.bulk_create([model(**row) for row in rows])


def copy_rows(model: type[Model], rows: Sequence[Row]) -> None:
    """Insert `rows` of `model`, as insert_rows takes them, with PostgreSQL's
    COPY."""
    if not rows:
        return
    fields = _fields(model, rows[0])
    prepared = [
        (field.attname, None)
        if isinstance(field, (*_PLAIN_FIELDS, ForeignKey))
        else (field.attname, partial(field.get_db_prep_save, connection=connection))
        for field in fields
    ]
    quote = connection.ops.quote_name
    columns = ", ".join(quote(str(field.column)) for field in fields)
    statement = f"COPY {quote(model._meta.db_table)} ({columns}) FROM STDIN"
    # COPY bypasses Django's cursor wrapper, which turns driver errors into
    # Django's (IntegrityError and the rest).
    with (
        connection.wrap_database_errors,
        connection.cursor() as cursor,
        cursor.copy(statement) as copy,
    ):
        for row in rows:
            copy.write_row(
                [
                    row[name] if prepare is None else prepare(row[name])
                    for name, prepare in prepared
                ]
            )


def _fields(model: type[Model], row: Row) -> "list[Field[Any, Any]]":
    """Return the fields that a row of `model` gives, in column order. Raise
    ValueError if `row` names other fields."""
    fields = [
        field
        for field in model._meta.concrete_fields
        if not (field.primary_key and isinstance(field, AutoFieldMixin))
    ]
    names = [field.attname for field in fields]
    if set(row) != set(names):
        raise ValueError(
            f"Rows for {model.__name__} must give exactly the fields {sorted(names)}, "
            f"not {sorted(row)}."
        )
    return fields


def column_list(model: type[Model], alias: str) -> str:
    """Return the columns of `model`'s concrete fields, in field order and prefixed
    with `alias`, for a SELECT written by hand."""
    quote = connection.ops.quote_name
    return ", ".join(
        f"{alias}.{quote(str(field.column))}" for field in model._meta.concrete_fields
    )


def attnames(model: type[Model]) -> list[str]:
    """Return the attnames of `model`'s concrete fields, in the order of
    column_list, which from_db takes the values in."""
    return [field.attname for field in model._meta.concrete_fields]
