"""Secrets in the destination admin: no lookups through them, and key rotation.

Staff can neither filter, search nor order the changelist by a secret column, since
each of those would let them probe the stored token one character at a time. The
"Rotate secrets" button on the changelist runs the same re-encryption as
`manage.py rotate_secrets`, for superusers only.
"""

import logging
from typing import TYPE_CHECKING, Any

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.decorators import method_decorator
from django.views.decorators.debug import sensitive_post_parameters
from django.views.decorators.http import require_http_methods

from portal.changelists import SafeChangeList
from portal.checks import check_encryption_keys

from .audit import log_rotation
from .masking import is_secret_lookup
from .models import Destination
from .rotation import Counts, SecretRotation, total

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from django.contrib.admin import ModelAdmin

    _AdminBase = ModelAdmin[Destination]
else:
    _AdminBase = object

ROTATE_ACTION = "Rotate secrets"


class SecretSafeChangeList(SafeChangeList):
    """A changelist whose `o=` parameter never orders by a secret column."""

    def get_ordering_field(self, field_name: Any) -> Any:
        order_field = super().get_ordering_field(field_name)
        if isinstance(order_field, str) and is_secret_lookup(order_field.lstrip("-")):
            return None
        return order_field


def rotation_messages(all_counts: list[Counts]) -> list[tuple[int, str]]:
    """Return the admin messages (level, text) that report a rotation."""
    summed = total(all_counts)
    result = [
        (
            messages.SUCCESS,
            f"Re-encrypted secrets with the first key in ENCRYPTION_KEYS: "
            f"{summed.rotated} rotated, {summed.current} already current, "
            f"{summed.empty} empty, {len(summed.failed_pks)} failed.",
        )
    ]
    if summed.changed:
        result.append(
            (
                messages.WARNING,
                f"Values changed while the rotation ran: {summed.changed}. Each was "
                "left as saved; rotate again to check them.",
            )
        )
    for counts in all_counts:
        if not counts.failed_pks:
            continue
        ids = ", ".join(str(pk) for pk in counts.failed_pks)
        result.append(
            (
                messages.ERROR,
                f"{counts.label}: no key in ENCRYPTION_KEYS decrypts the value of "
                f"IDs {ids}, which were left unchanged. Add the key they were "
                "encrypted with to ENCRYPTION_KEYS and rotate again, or enter each "
                "secret anew.",
            )
        )
    return result


class SecretsAdminMixin(_AdminBase):
    """Keeps DestinationAdmin's lookups off secret columns and adds key rotation."""

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest) -> bool:
        # A rejected lookup makes the changelist return 400 Bad Request.
        if is_secret_lookup(lookup):
            return False
        return super().lookup_allowed(lookup, value, request)

    def get_search_fields(self, request: HttpRequest) -> Any:
        fields = super().get_search_fields(request)
        return [name for name in fields if not is_secret_lookup(name.lstrip("^=@"))]

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> Any:
        return SecretSafeChangeList

    def get_urls(self) -> list[URLPattern]:
        rotate = path(
            "rotate-secrets/",
            self.admin_site.admin_view(self.rotate_secrets_view),
            name="destinations_destination_rotate_secrets",
        )
        return [rotate, *super().get_urls()]

    @method_decorator(sensitive_post_parameters())
    @method_decorator(require_http_methods(["GET", "POST"]))
    def rotate_secrets_view(self, request: HttpRequest) -> HttpResponse:
        """Show what a rotation would do (GET) or rotate every secret (POST)."""
        if not request.user.is_superuser:
            raise PermissionDenied
        changelist = reverse("admin:destinations_destination_changelist")

        errors = check_encryption_keys(None)
        if errors:
            for error in errors:
                self.message_user(
                    request,
                    f"{error.id}: {error.msg} {error.hint or ''}".strip(),
                    messages.ERROR,
                )
            return redirect(changelist)

        if request.method == "GET":
            preview = SecretRotation(dry_run=True).run()
            context = {
                **self.admin_site.each_context(request),
                "opts": self.opts,
                "title": "Rotate secrets",
                "counts": preview,
                "total": total(preview),
            }
            return TemplateResponse(
                request, "admin/destinations/destination/rotate_secrets.html", context
            )

        all_counts = SecretRotation().run()
        logger.info(
            "User %s rotated secrets: %s",
            request.user.pk,
            total(all_counts).summary(dry_run=False),
        )
        for counts in all_counts:
            if counts.model is Destination:
                log_rotation(request.user.pk, counts.rotated_pks, ROTATE_ACTION)
        for level, text in rotation_messages(all_counts):
            self.message_user(request, text, level)
        return redirect(changelist)
