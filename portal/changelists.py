"""Admin change lists that treat a filter the database rejects as an invalid lookup.

Django turns a lookup it cannot build (an unknown field, a value of the wrong type)
into IncorrectLookupParameters, and the change list view then redirects to the
unfiltered list with `?e=1`. Some values only fail once the query runs: an invalid
regular expression (`?name__regex=[`), a year past 9999
(`?created_at__year=99999999`), or a NUL character on PostgreSQL. Without
SafeChangeList each of those is a server error.

Every ModelAdmin of this project gets SafeChangeList through SafeChangeListMixin.
"""

import logging
from typing import TYPE_CHECKING, Any

from django.contrib import messages
from django.contrib.admin import helpers
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.admin.views.main import IGNORED_PARAMS, ChangeList
from django.core.exceptions import ValidationError
from django.db import DataError, OperationalError, connections, transaction
from django.db.models import QuerySet
from django.http import HttpRequest

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from django.contrib.admin import ModelAdmin

    _AdminBase = ModelAdmin[Any]
else:
    _AdminBase = object

# The message SQLite gives when a function that Django registers in Python, such as
# REGEXP, raises on a value.
SQLITE_FUNCTION_ERROR = "user-defined function raised exception"


def rejects_value(database: str, error: Exception) -> bool:
    """Return whether `error`, raised while a change list ran its queries, comes
    from a value in the query string rather than from the database or the code."""
    if isinstance(error, DataError | ValueError | OverflowError):
        return True
    return (
        isinstance(error, OperationalError)
        and connections[database].vendor == "sqlite"
        and str(error) == SQLITE_FUNCTION_ERROR
    )


class SafeChangeList(ChangeList):
    """A change list whose filters and search, when the database rejects their
    values, lead back to the unfiltered list with a message, not to a 500."""

    def get_results(self, request: HttpRequest) -> None:
        database = self.queryset.db
        try:
            # A savepoint, so that inside a transaction (a test, or
            # ATOMIC_REQUESTS) PostgreSQL can run further queries after the error.
            with transaction.atomic(using=database):
                super().get_results(request)
        except (DataError, OperationalError, ValueError, OverflowError) as error:
            if not rejects_value(database, error):
                raise
            logger.info(
                "The database rejected the filters of the %s change list: %s",
                self.opts.label,
                error,
            )
            messages.error(request, self.rejected_message(error))
            raise IncorrectLookupParameters(error) from error

    def rejected_message(self, error: Exception) -> str:
        filters = [
            f"{name}={value}"
            for name, values in self.filter_params.items()
            if name not in IGNORED_PARAMS
            for value in values
        ]
        if self.query:
            filters.append(f"search “{self.query}”")
        described = ", ".join(filters) or "(none)"
        return (
            f"The database rejected this list's filters {described}: {error}. The "
            "list below shows every row. Correct the value in the address, or choose "
            "a filter from the side panel."
        )


class SafeChangeListMixin(_AdminBase):
    """A ModelAdmin mixin whose change list is a SafeChangeList, and whose object
    pages and actions treat an id the database would reject as not found."""

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> Any:
        return SafeChangeList

    def get_object(
        self, request: HttpRequest, object_id: str, from_field: str | None = None
    ) -> Any:
        # Django returns None for an id its field cannot convert, but passes a
        # text id with a NUL to PostgreSQL, which raises DataError on it.
        if "\x00" in object_id:
            return None
        return super().get_object(request, object_id, from_field)

    def response_action(
        self, request: HttpRequest, queryset: QuerySet[Any], *args: Any, **kwargs: Any
    ) -> Any:
        # Django filters by the posted ids as they are, and raises ValueError (or
        # the database an error) on one that is not a valid primary key.
        selected = request.POST.getlist(helpers.ACTION_CHECKBOX_NAME)
        invalid = [value for value in selected if not self._is_primary_key(value)]
        if invalid:
            logger.info(
                "Rejected an action on %s with invalid ids: %r",
                self.opts.label,
                invalid[:10],
            )
            messages.error(
                request,
                f"The selection contains {len(invalid)} invalid ids, such as "
                f"{invalid[0]!r:.40}, so no action ran. Select rows in the list and "
                "try again.",
            )
            return None
        return super().response_action(request, queryset, *args, **kwargs)

    def _is_primary_key(self, value: str) -> bool:
        """Return whether `value` converts to a primary key that the database can
        compare: a NUL is not allowed in text, and integers take 64 bits."""
        if "\x00" in value:
            return False
        try:
            converted = self.opts.pk.to_python(value)
        except ValidationError:
            return False
        return not isinstance(converted, int) or -(2**63) <= converted < 2**63
