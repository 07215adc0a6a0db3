"""The filter of Django's error reports, which masks secrets even with DEBUG on."""

import re
from typing import Any

from django.http import HttpRequest, QueryDict
from django.views.debug import SafeExceptionReporterFilter

from destinations.forms import SECRET_FIELDS


class SecretsExceptionReporterFilter(SafeExceptionReporterFilter):
    """Django's filter, active with DEBUG on too, that also hides connection URLs
    (which may carry a password) and always masks the destination secret fields.

    Django's own filter masks nothing under DEBUG, so a debug error page would show
    a Service Bus connection string posted to a view that raised.
    """

    hidden_settings = re.compile(
        "API|AUTH|TOKEN|KEY|SECRET|PASS|SIGNATURE|HTTP_COOKIE"
        "|BROKER_URL|DATABASE_URL|CACHE_URL|EMAIL_URL|LOCATION",
        flags=re.IGNORECASE,
    )

    def is_active(self, request: HttpRequest | None) -> bool:
        return True

    def get_post_parameters(self, request: HttpRequest | None) -> Any:
        parameters = super().get_post_parameters(request)
        if not isinstance(parameters, QueryDict):
            return parameters

        # A view that forgot sensitive_post_parameters still gets these masked.
        present = [name for name in SECRET_FIELDS if name in parameters]
        if not present:
            return parameters
        parameters = parameters.copy()
        for name in present:
            parameters.setlist(
                name, [self.cleansed_substitute] * len(parameters.getlist(name))
            )
        return parameters
