"""Applications and the destinations their events go to."""

from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import (
    MaxValueValidator,
    MinValueValidator,
    validate_email,
)
from django.db import models, transaction

from . import encryption
from .access_keys import shown_key_name
from .encryption import EncryptedTextField
from .pasted_secrets import check_not_secret


class Stage(models.TextChoices):
    TEST = "TEST", "TEST"
    PROD = "PROD", "PROD"


class Kind(models.TextChoices):
    SQS = "sqs", "AWS SQS"
    PUBSUB = "pubsub", "GCP Pub/Sub"
    SERVICEBUS = "servicebus", "Azure Service Bus"


class SqsEncryption(models.TextChoices):
    NONE = "none", "None"
    SSE_SQS = "sse-sqs", "SSE-SQS (key managed by SQS)"
    SSE_KMS = "sse-kms", "SSE-KMS (customer managed KMS key)"


class EntityType(models.TextChoices):
    QUEUE = "queue", "Queue"
    TOPIC = "topic", "Topic"


class State(models.TextChoices):
    """Whether a destination receives events, derived from its columns."""

    ACTIVE = "active", "Active"
    PAUSED = "paused", "Paused (destination rejected events)"
    DISABLED = "disabled", "Disabled (kept failing)"
    OFF = "off", "Off (disabled by staff)"

    @classmethod
    def filter(cls, value: str) -> models.Q:
        """Return the lookup that selects destinations in state `value`."""
        return {
            cls.ACTIVE: models.Q(enabled=True, paused_at__isnull=True),
            cls.PAUSED: models.Q(paused_at__isnull=False, disabled_at__isnull=True),
            cls.DISABLED: models.Q(disabled_at__isnull=False),
            cls.OFF: models.Q(enabled=False, disabled_at__isnull=True),
        }[cls(value)]


def split_emails(value: str) -> list[str]:
    """Split a comma, semicolon or newline separated list of addresses."""
    separators = value.replace(";", ",").replace("\n", ",")
    return [part.strip() for part in separators.split(",") if part.strip()]


def validate_email_list(value: str) -> None:
    secret = check_not_secret(
        "Contact e-mails", value, "Enter e-mail addresses, one per line."
    )
    if secret is not None:
        raise secret
    for address in split_emails(value):
        try:
            validate_email(address)
        except ValidationError as error:
            raise ValidationError(
                f"{address!r} is not a valid e-mail address. Write one address per "
                "line or separate them with commas.",
                code="invalid_email",
            ) from error


class Application(models.Model):
    """A partner application; each stage of it has its own destinations."""

    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=100, unique=True)
    contact_emails = models.TextField(
        blank=True,
        validators=[validate_email_list],
        help_text="Who is told when delivery fails: one address per line or commas.",
    )
    developers = models.ManyToManyField(
        settings.AUTH_USER_MODEL,
        blank=True,
        related_name="applications",
        help_text="App developers who may see this application's delivery status.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        secret = check_not_secret(
            "Name", self.name, "Enter the application's name, such as Shop."
        )
        if secret is not None:
            raise ValidationError({"name": secret})

    @property
    def contact_email_list(self) -> list[str]:
        return split_emails(self.contact_emails)


# The columns `Destination.is_ordered` reads.
ORDERING_FIELDS = frozenset(
    {"kind", "sqs_fifo", "pubsub_ordering", "servicebus_sessions"}
)


class Destination(models.Model):
    """Where one application's events for one stage are sent.

    The columns of every kind live on this one table, prefixed by kind, so a list of
    destinations of mixed kinds needs no join. Only the columns of `kind` are used.
    """

    application = models.ForeignKey(
        Application, on_delete=models.CASCADE, related_name="destinations"
    )
    stage = models.CharField(max_length=4, choices=Stage.choices)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    name = models.CharField(max_length=200)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    sqs_queue_url = models.CharField("queue URL", max_length=255, blank=True)
    sqs_region = models.CharField(
        "region",
        max_length=32,
        blank=True,
        help_text="Taken from the queue URL when left blank.",
    )
    sqs_fifo = models.BooleanField(
        "FIFO queue", default=False, help_text="The queue name ends in .fifo."
    )
    sqs_encryption = models.CharField(
        "server-side encryption",
        max_length=8,
        choices=SqsEncryption.choices,
        default=SqsEncryption.NONE,
    )
    sqs_kms_key_arn = models.CharField(
        "KMS key ARN",
        max_length=2048,
        blank=True,
        help_text="With SSE-KMS: the key's ARN, so the platform can be granted on it.",
    )

    pubsub_project_id = models.CharField("project ID", max_length=100, blank=True)
    pubsub_topic_id = models.CharField("topic ID", max_length=255, blank=True)
    pubsub_ordering = models.BooleanField(
        "message ordering",
        default=False,
        help_text="Publish with an ordering key per object; needs a regional endpoint.",
    )
    pubsub_endpoint = models.CharField(
        "regional endpoint",
        max_length=255,
        blank=True,
        help_text="For example europe-west1-pubsub.googleapis.com:443.",
    )

    servicebus_connection_string = EncryptedTextField(
        "connection string", blank=True, editable=False
    )
    servicebus_namespace = models.CharField(
        "namespace host",
        max_length=255,
        blank=True,
        editable=False,
        help_text="Read from the connection string's Endpoint.",
    )
    servicebus_key_name = models.CharField(
        "shared access key name", max_length=256, blank=True, editable=False
    )
    servicebus_entity_path = models.CharField(
        "EntityPath in the connection string",
        max_length=260,
        blank=True,
        editable=False,
    )
    servicebus_entity_type = models.CharField(
        "entity type",
        max_length=8,
        choices=EntityType.choices,
        default=EntityType.QUEUE,
    )
    servicebus_entity_name = models.CharField(
        "entity name",
        max_length=260,
        blank=True,
        help_text="Filled from the connection string's EntityPath when left blank.",
    )
    servicebus_partitioning = models.BooleanField("partitioned entity", default=False)
    servicebus_sessions = models.BooleanField("sessions required", default=False)
    servicebus_max_message_size = models.PositiveIntegerField(
        "maximum message size (bytes)",
        default=262144,
        help_text=(
            "256 KB on the Standard tier; on Premium, the entity's own maximum (up to "
            "100 MB)."
        ),
    )

    # Delivery state, kept by the delivery engine.
    paused_at = models.DateTimeField(null=True, blank=True, editable=False)
    pause_reason = models.TextField(blank=True, editable=False)
    disabled_at = models.DateTimeField(
        null=True,
        blank=True,
        editable=False,
        help_text="Set when the engine disabled the destination after failing.",
    )
    disabled_reason = models.TextField(blank=True, editable=False)
    consecutive_failures = models.PositiveIntegerField(default=0, editable=False)
    failing_since = models.DateTimeField(null=True, blank=True, editable=False)
    last_error = models.TextField(blank=True, editable=False)
    last_success_at = models.DateTimeField(null=True, blank=True, editable=False)

    # Retry policy for transient failures.
    retry_initial_delay = models.PositiveIntegerField(
        "first retry after (seconds)",
        default=5,
        validators=[MinValueValidator(1), MaxValueValidator(3600)],
        help_text="Each further retry waits twice as long, with jitter.",
    )
    retry_max_delay = models.PositiveIntegerField(
        "longest wait between retries (seconds)",
        default=6 * 3600,
        validators=[MinValueValidator(1), MaxValueValidator(24 * 3600)],
    )
    retry_window = models.PositiveIntegerField(
        "give up after (hours)",
        default=72,
        validators=[MinValueValidator(1), MaxValueValidator(14 * 24)],
        help_text="A delivery still failing this long after it was queued fails.",
    )

    class Meta:
        ordering = ["application__name", "stage", "name"]
        indexes = [models.Index(fields=["application", "stage", "enabled"])]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(stage__in=Stage.values), name="destination_stage"
            ),
            models.CheckConstraint(
                condition=models.Q(kind__in=Kind.values), name="destination_kind"
            ),
        ]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._new_connection_string: str | None = None
        # Whether the stored row keeps order; None when unknown, as for a row
        # loaded without the ordering columns.
        self._stored_ordered: bool | None = None

    def __str__(self) -> str:
        return f"{self.application} / {self.stage} / {self.name}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        # Every save validates, so destinations created in code or by commands obey
        # the same rules as the admin form.
        self.full_clean()
        if self._new_connection_string is not None:
            self.servicebus_connection_string = encryption.encrypt(
                self._new_connection_string.strip()
            )
            self._new_connection_string = None
        adding = self._state.adding
        update_fields = kwargs.get("update_fields")
        touches_ordering = update_fields is None or bool(
            ORDERING_FIELDS & set(update_fields)
        )
        with transaction.atomic():
            super().save(*args, **kwargs)
            changed = self._stored_ordered != self.is_ordered
            if touches_ordering and not adding and changed:
                self._align_ordering_keys()
        if touches_ordering:
            self._stored_ordered = self.is_ordered

    @classmethod
    def from_db(cls, *args: Any, **kwargs: Any) -> "Destination":
        instance = super().from_db(*args, **kwargs)
        instance._remember_ordered()
        return instance

    def refresh_from_db(
        self,
        using: str | None = None,
        fields: Any = None,
        from_queryset: Any = None,
    ) -> None:
        super().refresh_from_db(using, fields, from_queryset)
        # A partial refresh leaves unsaved ordering columns as they were.
        if fields is None or set(fields) >= ORDERING_FIELDS:
            self._remember_ordered()

    def _remember_ordered(self) -> None:
        # Reading a deferred column would cost a query per loaded row.
        loaded = not (ORDERING_FIELDS & self.get_deferred_fields())
        self._stored_ordered = self.is_ordered if loaded else None

    def _align_ordering_keys(self) -> None:
        """Set the ordering key of this destination's unfinished deliveries to the
        one publishing would set now. The engine keeps order only among keyed
        deliveries."""
        # NOTE: a publish that read this destination before the save commits still
        # creates its delivery with the old key.
        from delivery.models import UNFINISHED, Delivery, Event

        unfinished = Delivery.objects.filter(destination=self, status__in=UNFINISHED)
        if self.is_ordered:
            object_key = Event.objects.filter(pk=models.OuterRef("event_id"))
            # Test events go out alone, whatever the destination's ordering.
            unfinished.filter(ordering_key="", is_test=False).update(
                ordering_key=models.Subquery(object_key.values("object_key")[:1])
            )
        else:
            unfinished.exclude(ordering_key="").update(ordering_key="")

    def clean(self) -> None:
        from .validation import validate_destination

        validate_destination(self)

    def set_connection_string(self, plaintext: str) -> None:
        """Replace the Service Bus connection string; it is parsed by `clean()` and
        encrypted by `save()`."""
        self._new_connection_string = plaintext

    def connection_string(self) -> str:
        """Decrypt the Service Bus connection string, for sending only."""
        return encryption.decrypt(self.servicebus_connection_string)

    @property
    def is_fifo(self) -> bool:
        return self.kind == Kind.SQS and self.sqs_fifo

    @property
    def is_ordered(self) -> bool:
        """Whether the destination keeps per-object order, so its deliveries of one
        ordering key must go out one at a time."""
        if self.kind == Kind.SQS:
            return self.sqs_fifo
        if self.kind == Kind.PUBSUB:
            return self.pubsub_ordering
        return self.servicebus_sessions

    @property
    def state(self) -> "State":
        if self.disabled_at is not None:
            return State.DISABLED
        if self.paused_at is not None:
            return State.PAUSED
        return State.ACTIVE if self.enabled else State.OFF

    @property
    def holds_deliveries(self) -> bool:
        """Whether new events are kept as held deliveries instead of sent: the
        engine paused or disabled the destination. One that staff disabled by hand
        gets no deliveries at all."""
        return self.paused_at is not None or self.disabled_at is not None

    @property
    def target(self) -> str:
        """Where the events go, with no secret in it."""
        if self.kind == Kind.SQS:
            return self.sqs_queue_url
        if self.kind == Kind.PUBSUB:
            return f"projects/{self.pubsub_project_id}/topics/{self.pubsub_topic_id}"
        return self.servicebus_summary

    @property
    def servicebus_summary(self) -> str:
        """The masked form of the connection string: namespace, key name, entity."""
        if not self.servicebus_connection_string and not self._new_connection_string:
            return ""
        return (
            f"{self.servicebus_namespace} {self.servicebus_entity_type} "
            f"{self.servicebus_entity_name} "
            f"(key {shown_key_name(self.servicebus_key_name)}, secret hidden)"
        )
