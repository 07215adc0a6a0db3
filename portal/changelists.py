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
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.admin.views.main import IGNORED_PARAMS, ChangeList
from django.db import DataError, OperationalError, connections, transaction
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
    """A ModelAdmin mixin whose change list is a SafeChangeList."""

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> Any:
        return SafeChangeList
