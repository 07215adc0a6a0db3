"""Pagination for the admin's lists of events and deliveries, which hold millions
of rows: no list ever counts a whole table.

An exact count stops at EXACT_LIMIT rows, so it costs at most that many index
entries. Past that, PostgreSQL's own estimate replaces the total: the
table's row estimate (pg_class.reltuples) when nothing is filtered, the planner's
estimate of the filtered query otherwise. Other databases show no total, only
enough pages to go one page further.
"""

from functools import cached_property
from typing import Any, cast

from django.core.paginator import Page, Paginator
from django.db import connections
from django.db.models import QuerySet
from django.http import HttpRequest

EXACT_LIMIT = 10_000


def table_estimate(queryset: QuerySet[Any]) -> int | None:
    """Return PostgreSQL's row estimate of the queryset's table, or None when it
    has none (another database, or a table never analysed)."""
    connection = connections[queryset.db]
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT reltuples FROM pg_class WHERE oid = %s::regclass",
            [connection.ops.quote_name(queryset.model._meta.db_table)],
        )
        row = cursor.fetchone()
    # PostgreSQL 14 and later store -1 for a table that was never analysed.
    if row is None or row[0] < 0:
        return None
    return int(row[0])


def planner_estimate(queryset: QuerySet[Any]) -> int | None:
    """Return the planner's estimate of the queryset's row count on PostgreSQL."""
    connection = connections[queryset.db]
    if connection.vendor != "postgresql":
        return None
    sql, params = queryset.order_by().values("pk").query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}", params)
        plan = cursor.fetchone()[0]
    return int(plan[0]["Plan"]["Plan Rows"])


class LargeTablePaginator(Paginator):
    """A paginator whose count is exact up to EXACT_LIMIT and estimated past it.

    `estimated` is True when the count is PostgreSQL's estimate. `open_ended` is
    True when there is no total at all, so the count reaches one page past
    `page_number` only.
    """

    def __init__(
        self,
        *args: Any,
        page_number: int = 1,
        exact_limit: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.page_number = page_number
        self.exact_limit = exact_limit or EXACT_LIMIT
        self.estimated = False
        self.open_ended = False

    @cached_property
    def count(self) -> int:
        queryset = cast(QuerySet[Any], self.object_list)
        # At least as many rows as it takes to reach the requested page, so the
        # paginator accepts every link of an estimated page range.
        reach = self.page_number * self.per_page + 1

        if not queryset.query.where:
            estimate = table_estimate(queryset)
            if estimate is not None and estimate > self.exact_limit:
                self.estimated = True
                return max(estimate, reach)

        bounded = queryset.order_by().values("pk")[: self.exact_limit + 1].count()
        if bounded <= self.exact_limit:
            return bounded

        estimate = planner_estimate(queryset)
        if estimate is not None:
            self.estimated = True
            return max(estimate, bounded, reach)
        self.open_ended = True
        return max(bounded, reach)

    def page(self, number: Any) -> Page:
        """Return the page, read in two steps: the page's ids first, from an
        index alone, then its rows with their joins and annotations. A deep
        page then skips index entries, not joined and annotated rows."""
        number = self.validate_number(number)
        bottom = (number - 1) * self.per_page
        queryset = cast(QuerySet[Any], self.object_list)
        ids = list(
            queryset.values_list("pk", flat=True)[bottom : bottom + self.per_page]
        )
        return Page(queryset.filter(pk__in=ids), number, self)


class LargeTableAdminMixin:
    """For a ModelAdmin of a table with millions of rows."""

    show_full_result_count = False

    def get_paginator(
        self,
        request: HttpRequest,
        queryset: QuerySet[Any],
        per_page: int,
        orphans: int = 0,
        allow_empty_first_page: bool = True,
    ) -> LargeTablePaginator:
        try:
            page_number = max(int(request.GET.get("p", 1)), 1)
        except ValueError:
            page_number = 1
        return LargeTablePaginator(
            queryset,
            per_page,
            orphans,
            allow_empty_first_page,
            page_number=page_number,
        )
