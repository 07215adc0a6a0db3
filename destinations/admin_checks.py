"""The admin's "Check access" button: a check of a destination that sends nothing.

Each transport's `check()` reads what its protocol allows without side effects (the
queue's attributes, the topic's IAM permissions, a sender link opened and closed)
and the result appears on the destination's change page as messages.
"""

import logging
from typing import TYPE_CHECKING

from django.contrib import messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed
from django.shortcuts import redirect
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from delivery.transports import transport_for
from delivery.transports.base import CheckResult, Failure

from .models import Destination

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from django.contrib.admin import ModelAdmin

    _AdminBase = ModelAdmin[Destination]
else:
    _AdminBase = object


def check_destination(destination: Destination) -> CheckResult:
    """Run the check of `destination`'s transport. Transports bound their own
    network timeouts, so this returns within a few of them."""
    transport = transport_for(destination)
    if transport is None:
        return CheckResult(
            ok=False,
            findings=[
                f"The platform cannot send to {destination.get_kind_display()} "
                "destinations yet, so there is nothing to check."
            ],
        )
    try:
        return transport.check()
    except Exception as error:
        # A bug in a check must not hide the destination's change page behind an
        # error page; the log keeps the traceback.
        logger.exception("Checking access of destination %s failed", destination.pk)
        return CheckResult(
            ok=False,
            failure=Failure(
                kind="internal_error",
                message=(
                    f"The check failed inside the platform ({type(error).__name__}). "
                    "Send a test event instead; the platform's operators can find "
                    "the error in the portal's log."
                ),
                permanent=False,
            ),
        )


def _items(lines: list[str]) -> SafeString:
    if not lines:
        return SafeString("")
    return format_html(
        '<ul class="check-items">{}</ul>',
        format_html_join("", "<li>{}</li>", ((line,) for line in lines)),
    )


def report(destination: Destination, result: CheckResult) -> tuple[int, SafeString]:
    """Return the message level and the HTML text that show `result`."""
    name = destination.name
    if result.failure is not None:
        text = format_html(
            "Check access for {} failed ({}): {} "
            '<a href="#what-to-grant">What the {} identity needs</a>',
            name,
            result.failure.kind,
            result.failure.message,
            destination.stage,
        )
        return messages.ERROR, text + _items(result.findings)
    if result.mismatches:
        text = format_html(
            "Check access for {}: these settings differ from the {}'s:",
            name,
            _resource(destination),
        )
        text += _items(result.mismatches)
        if result.findings:
            text += SafeString("Also found:") + _items(result.findings)
        return messages.WARNING, text
    if not result.ok:
        text = format_html("Check access for {} could not confirm access:", name)
        return messages.WARNING, text + _items(result.findings)
    text = format_html("Check access for {} found no problem:", name)
    return messages.SUCCESS, text + _items(result.findings)


def _resource(destination: Destination) -> str:
    return {"sqs": "queue", "pubsub": "topic"}.get(
        destination.kind, destination.servicebus_entity_type
    )


class CheckAccessMixin(_AdminBase):
    """Adds the check-access view to DestinationAdmin."""

    def get_urls(self) -> list[URLPattern]:
        check_access = path(
            "<path:object_id>/check-access/",
            self.admin_site.admin_view(self.check_access_view),
            name="destinations_destination_check_access",
        )
        return [check_access, *super().get_urls()]

    def destination_for_post(
        self, request: HttpRequest, object_id: str
    ) -> Destination | HttpResponse:
        """Return the destination a POST-only button acts on, or the response that
        refuses the request: 405 for another method, a redirect with a warning for
        an unknown id. Raise PermissionDenied without the change right."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        destination = self.get_object(request, unquote(object_id))
        if destination is None:
            self.message_user(
                request,
                f"No destination with ID {object_id!r} exists; it may have been "
                "deleted.",
                messages.WARNING,
            )
            return redirect(reverse("admin:destinations_destination_changelist"))
        if not self.has_change_permission(request, destination):
            raise PermissionDenied
        return destination

    def check_access_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        destination = self.destination_for_post(request, object_id)
        if isinstance(destination, HttpResponse):
            return destination

        result = check_destination(destination)
        level, text = report(destination, result)
        self.message_user(request, text, level)
        return redirect(
            reverse("admin:destinations_destination_change", args=[destination.pk])
        )
