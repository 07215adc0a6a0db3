"""Validation of a Pub/Sub destination: project, topic, ordering and endpoint."""

import re
from collections import defaultdict

from django.core.exceptions import ValidationError

from ..models import Destination

PROJECT_ID = r"[a-z][a-z0-9-]{4,28}[a-z0-9]"
# Legacy projects are scoped to a domain: example.com:my-project.
DOMAIN = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)+"
PROJECT_ID_RE = re.compile(rf"(?:{DOMAIN}:)?{PROJECT_ID}")

TOPIC_ID_CHARACTERS_RE = re.compile(r"[A-Za-z0-9._~+%-]*")
# A topic's full resource name, as the console and gcloud show it.
TOPIC_PATH_RE = re.compile(
    r"(?://pubsub\.googleapis\.com/)?projects/(?P<project>[^/]+)/topics/(?P<topic>[^/]+)"
)
PROJECT_PATH_RE = re.compile(r"projects/(?P<project>[^/]+)/?")

REGIONAL_ENDPOINT_RE = re.compile(
    r"[a-z]+-[a-z]+[0-9]+-pubsub\.googleapis\.com(?::443)?"
)
GLOBAL_ENDPOINT_RE = re.compile(r"pubsub\.googleapis\.com(?::443)?")

EXAMPLE_ENDPOINT = "europe-west1-pubsub.googleapis.com:443"

# Per field, the value to enter instead of a secret pasted there by mistake. The
# service account key belongs to the partner: the platform publishes with its own
# identity, which the partner grants on the topic.
PASTE_HINTS = {
    "pubsub_project_id": "Enter the project ID, such as my-project-123456.",
    "pubsub_topic_id": (
        "Enter the topic ID, such as partner-events, or the topic's full name "
        "projects/PROJECT/topics/TOPIC. No key file is needed."
    ),
    "pubsub_endpoint": (
        f"Enter a regional endpoint, such as {EXAMPLE_ENDPOINT}, or leave it blank."
    ),
}


def validate(destination: Destination) -> None:
    """Normalise and check the Pub/Sub columns of `destination`."""
    errors: dict[str, list[ValidationError]] = defaultdict(list)

    split_resource_names(destination, errors)
    check_project_id(destination.pubsub_project_id, errors)
    check_topic_id(destination.pubsub_topic_id, errors)
    check_endpoint(destination, errors)

    if errors:
        raise ValidationError(dict(errors))


def split_resource_names(
    destination: Destination, errors: dict[str, list[ValidationError]]
) -> None:
    """Strip both IDs and split a pasted projects/P/topics/T into its parts."""
    project = (destination.pubsub_project_id or "").strip()
    topic = (destination.pubsub_topic_id or "").strip()

    project_in_topic = topic_in_project = None
    if match := TOPIC_PATH_RE.fullmatch(topic):
        topic, project_in_topic = match["topic"], match["project"]
    if match := TOPIC_PATH_RE.fullmatch(project):
        project, topic_in_project = match["project"], match["topic"]
    elif match := PROJECT_PATH_RE.fullmatch(project):
        project = match["project"]

    if project_in_topic is not None:
        if project and project != project_in_topic:
            errors["pubsub_project_id"].append(
                ValidationError(
                    f"Project ID {project!r} differs from project "
                    f"{project_in_topic!r} in the topic's full name. Clear the "
                    "project ID to take it from the topic name, or correct one of "
                    "them.",
                    code="project_mismatch",
                )
            )
        project = project or project_in_topic

    if topic_in_project is not None:
        if topic and topic != topic_in_project:
            errors["pubsub_topic_id"].append(
                ValidationError(
                    f"Topic ID {topic!r} differs from topic {topic_in_project!r} in "
                    "the full name pasted into the project ID. Enter the project ID "
                    "alone, or correct the topic ID.",
                    code="topic_mismatch",
                )
            )
        topic = topic or topic_in_project

    destination.pubsub_project_id = project
    destination.pubsub_topic_id = topic


def check_project_id(project: str, errors: dict[str, list[ValidationError]]) -> None:
    if not project:
        errors["pubsub_project_id"].append(
            ValidationError(
                "Enter the ID of the Google Cloud project that contains the topic, "
                "for example my-project-123456.",
                code="missing",
            )
        )
    elif not PROJECT_ID_RE.fullmatch(project):
        errors["pubsub_project_id"].append(
            ValidationError(
                f"{project!r} is not a Google Cloud project ID. A project ID has 6 to "
                "30 lowercase letters, digits or hyphens, starts with a letter and "
                "does not end with a hyphen. Enter the ID that the console's project "
                "picker shows, not the project's name or number.",
                code="invalid_project_id",
            )
        )


def check_topic_id(topic: str, errors: dict[str, list[ValidationError]]) -> None:
    """Check `topic` against Pub/Sub's resource name rules, one message per rule."""
    if not topic:
        errors["pubsub_topic_id"].append(
            ValidationError(
                "Enter the topic ID, such as partner-events, or the topic's full name "
                "projects/PROJECT/topics/TOPIC.",
                code="missing",
            )
        )
        return

    problems = []
    if "/" in topic:
        problems.append(
            "Enter the topic ID alone, such as partner-events, or the topic's full "
            "name projects/PROJECT/topics/TOPIC."
        )
    elif not TOPIC_ID_CHARACTERS_RE.fullmatch(topic):
        problems.append(
            "A topic ID may only contain letters, digits and the characters - _ . ~ "
            "+ %."
        )
    if not 3 <= len(topic) <= 255:
        problems.append(f"A topic ID has 3 to 255 characters, not {len(topic)}.")
    if not topic[0].isascii() or not topic[0].isalpha():
        problems.append("A topic ID must start with a letter.")
    if topic.startswith("goog"):
        problems.append("Topic IDs starting with goog are reserved by Google.")

    for problem in problems:
        errors["pubsub_topic_id"].append(
            ValidationError(
                f"Topic ID {topic!r} is not valid. {problem}", code="invalid_topic_id"
            )
        )


def check_endpoint(
    destination: Destination, errors: dict[str, list[ValidationError]]
) -> None:
    """Check the endpoint, which message ordering needs to be regional."""
    endpoint = (destination.pubsub_endpoint or "").strip().lower()
    # The client takes host[:port] as its API endpoint, not a URL. A pasted https://
    # adds nothing, so it is dropped instead of rejected.
    endpoint = endpoint.removeprefix("https://").rstrip("/")
    destination.pubsub_endpoint = endpoint

    ordering = destination.pubsub_ordering
    if not endpoint:
        if ordering:
            errors["pubsub_endpoint"].append(
                ValidationError(
                    "Message ordering needs a regional endpoint, such as "
                    f"{EXAMPLE_ENDPOINT}, because Pub/Sub keeps the order of an "
                    "ordering key only among messages published in one region. Enter "
                    "the endpoint of the topic's region, or turn message ordering off.",
                    code="missing",
                )
            )
    elif GLOBAL_ENDPOINT_RE.fullmatch(endpoint):
        if ordering:
            errors["pubsub_endpoint"].append(
                ValidationError(
                    f"{endpoint!r} is the global endpoint, which may route messages "
                    "to different regions, and Pub/Sub keeps the order of an ordering "
                    "key only within one region. Enter a regional endpoint, such as "
                    f"{EXAMPLE_ENDPOINT}, or turn message ordering off.",
                    code="ordering_needs_regional_endpoint",
                )
            )
    elif not REGIONAL_ENDPOINT_RE.fullmatch(endpoint):
        blank_hint = "" if ordering else ", or leave it blank for the global one"
        errors["pubsub_endpoint"].append(
            ValidationError(
                f"{endpoint!r} is not a Pub/Sub regional endpoint. Enter "
                "REGION-pubsub.googleapis.com with an optional :443, such as "
                f"{EXAMPLE_ENDPOINT}{blank_hint}.",
                code="invalid_endpoint",
            )
        )
