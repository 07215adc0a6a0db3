"""The staff form for a destination: one set of fields per kind."""

from typing import Any

from django import forms
from django.http import QueryDict

from portal.form_errors import ExplainedErrors

from .models import Application, Destination, Kind
from .pasted_secrets import SECRET_PASTED, describe_secret, secret_error

COMMON_FIELDS = ("application", "stage", "kind", "name", "enabled")

KIND_FIELDS: dict[str, tuple[str, ...]] = {
    Kind.SQS: (
        "sqs_queue_url",
        "sqs_region",
        "sqs_fifo",
        "sqs_encryption",
        "sqs_kms_key_arn",
    ),
    Kind.PUBSUB: (
        "pubsub_project_id",
        "pubsub_topic_id",
        "pubsub_ordering",
        "pubsub_endpoint",
    ),
    Kind.SERVICEBUS: (
        "servicebus_connection_string",
        "servicebus_entity_type",
        "servicebus_entity_name",
        "servicebus_partitioning",
        "servicebus_sessions",
        "servicebus_max_message_size",
    ),
}

SECRET_FIELDS = ("servicebus_connection_string",)

RETRY_FIELDS = ("retry_initial_delay", "retry_max_delay", "retry_window")


class BlankPastedSecretsMixin(forms.BaseForm):
    """A form that neither re-fills nor quotes a secret pasted into a plain field.

    A rejected form is shown again with each input holding what was submitted, and
    Django's own messages (an invalid choice, for one) quote the value. So after
    cleaning, a field whose submitted text looks like a secret is blanked, and its
    errors are replaced by one that names what was pasted.
    """

    # Fields made for a secret, whose widget never renders the value.
    secret_fields: tuple[str, ...] = ()

    def full_clean(self) -> None:
        super().full_clean()
        if not self.is_bound or not self.errors:
            return

        # A QueryDict copy is mutable and keeps every value of a multiple choice.
        data = self.data.copy() if isinstance(self.data, QueryDict) else {**self.data}
        for name, field in self.fields.items():
            key = self.add_prefix(name)
            value = data.get(key)
            if name in self.secret_fields or not isinstance(value, str):
                continue
            description = describe_secret(value)
            if description is None:
                continue

            data[key] = ""
            errors = self.errors.get(name)
            codes = {error.code for error in errors.as_data()} if errors else set()
            if errors and SECRET_PASTED not in codes:
                label = str(field.label or name)
                error = secret_error(label, description, f"Enter the {label} alone.")
                self.errors[name] = self.error_class(renderer=self.renderer)
                self.errors[name].extend(error.error_list)
        self.data = data


class ApplicationForm(ExplainedErrors, BlankPastedSecretsMixin, forms.ModelForm):
    class Meta:
        model = Application
        fields = ("name", "slug", "contact_emails", "developers")


class DestinationForm(ExplainedErrors, BlankPastedSecretsMixin, forms.ModelForm):
    secret_fields = SECRET_FIELDS

    # Write-only: the stored value is a Fernet token and is never rendered back.
    servicebus_connection_string = forms.CharField(
        label="Connection string",
        required=False,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "off"}),
        help_text=(
            "Endpoint=sb://NAMESPACE.servicebus.windows.net/;SharedAccessKeyName=...;"
            "SharedAccessKey=... from a policy with the Send right only."
        ),
    )

    class Meta:
        model = Destination
        # The secret fields are declared above instead, because Django rejects a
        # non-editable model field named here.
        fields = [
            *COMMON_FIELDS,
            *RETRY_FIELDS,
            *(
                name
                for names in KIND_FIELDS.values()
                for name in names
                if name not in SECRET_FIELDS
            ),
        ]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)

        if "kind" in self.fields:
            # The kind is chosen before the form opens; it travels as a hidden value.
            self.fields["kind"].widget = forms.HiddenInput()

        for name in RETRY_FIELDS:
            if name in self.fields:
                self.fields[name].required = False

        field = self.fields.get("servicebus_connection_string")
        if field is not None and self.instance.servicebus_connection_string:
            field.help_text = (
                "A connection string is stored and is not shown. Leave blank to keep "
                "it, or paste a new one to replace it."
            )

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        # The retry policy is optional in a submission: a blank value keeps the
        # current one (the default, on a new destination).
        for name in RETRY_FIELDS:
            if name in self.fields and cleaned.get(name) is None:
                cleaned[name] = getattr(self.instance, name)
        connection_string = cleaned.get("servicebus_connection_string")
        if connection_string:
            # Parsed and checked by the model's clean(), which runs after this.
            self.instance.set_connection_string(connection_string)
        return cleaned
