"""Who may use the staff admin. Partner staff (staff in the "Partner staff" group)
use every page and action. App developers are not staff and get no admin page."""

from collections.abc import Callable
from typing import Any

import pytest
from django.contrib import admin
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Group, User
from django.contrib.messages import get_messages
from django.test import Client
from django.urls import NoReverseMatch, reverse

from delivery.models import Attempt, Delivery, Event
from delivery.testevents import send_test_event
from destinations.models import Application, Destination, Kind, Stage

pytestmark = pytest.mark.django_db

PASSWORD = "pw-roles-1-tests"
ADMIN_LOGIN_URL = reverse("admin:login")
GROUP_NAME = "Partner staff"

EXPECTED_PERMISSIONS = {
    "destinations.add_application",
    "destinations.change_application",
    "destinations.delete_application",
    "destinations.view_application",
    "destinations.add_destination",
    "destinations.change_destination",
    "destinations.delete_destination",
    "destinations.view_destination",
    "delivery.view_event",
    "delivery.view_delivery",
    "delivery.change_delivery",
    "delivery.view_attempt",
}


@pytest.fixture(autouse=True)
def fast_password_hashing(settings: Any) -> None:
    # The default hasher takes about half a second per user on a small machine.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


class Objects:
    """One of each object the admin pages show, with ids for their URLs."""

    def __init__(self, destination: Destination, delivery: Delivery) -> None:
        self.destination = destination
        self.application = destination.application
        self.delivery = delivery
        self.event = delivery.event


@pytest.fixture
def objects(
    sqs_endpoint: Any, make_sqs_queue: Callable[..., Any], admin_user: User
) -> Objects:
    # The queue is on the local SQS peer, so "Check access" calls only 127.0.0.1.
    queue = make_sqs_queue("roles")
    application = Application.objects.create(name="Shop", slug="shop")
    destination = Destination.objects.create(
        application=application,
        stage=Stage.TEST,
        kind=Kind.SQS,
        name="Orders",
        sqs_queue_url=queue.url,
    )
    delivery = send_test_event(destination, requested_by=admin_user)
    return Objects(destination, delivery)


def url_of(name: str, *args: Any) -> str:
    return reverse(f"admin:{name}", args=args)


# Each GET page: a name and how to build its URL from the objects.
PAGES: dict[str, Callable[[Objects], str]] = {
    "admin index": lambda o: url_of("index"),
    "application changelist": lambda o: url_of("destinations_application_changelist"),
    "application add": lambda o: url_of("destinations_application_add"),
    "application change": lambda o: url_of(
        "destinations_application_change", o.application.pk
    ),
    "application history": lambda o: url_of(
        "destinations_application_history", o.application.pk
    ),
    "application delete": lambda o: url_of(
        "destinations_application_delete", o.application.pk
    ),
    "destination changelist": lambda o: url_of("destinations_destination_changelist"),
    "destination add, kind choice": lambda o: url_of("destinations_destination_add"),
    "destination add, SQS form": lambda o: (
        url_of("destinations_destination_add") + "?kind=sqs"
    ),
    "destination change": lambda o: url_of(
        "destinations_destination_change", o.destination.pk
    ),
    "destination history": lambda o: url_of(
        "destinations_destination_history", o.destination.pk
    ),
    "destination delete": lambda o: url_of(
        "destinations_destination_delete", o.destination.pk
    ),
    "event changelist": lambda o: url_of("delivery_event_changelist"),
    "event change": lambda o: url_of("delivery_event_change", o.event.pk),
    "event history": lambda o: url_of("delivery_event_history", o.event.pk),
    "delivery changelist": lambda o: url_of("delivery_delivery_changelist"),
    "delivery change": lambda o: url_of("delivery_delivery_change", o.delivery.pk),
    "delivery history": lambda o: url_of("delivery_delivery_history", o.delivery.pk),
}


def _optional_url(name: str) -> Callable[[Objects], str] | None:
    """Return a builder for a per-destination POST view, if the admin has it."""
    try:
        reverse(f"admin:{name}", args=[1])
    except NoReverseMatch:
        return None
    return lambda o: url_of(name, o.destination.pk)


# Each POST endpoint that is not an action.
POSTS: dict[str, Callable[[Objects], str]] = {
    name: builder
    for name, builder in {
        "send test": _optional_url("destinations_destination_send_test"),
        "check access": _optional_url("destinations_destination_check_access"),
    }.items()
    if builder is not None
}


def _actions() -> list[tuple[str, str]]:
    """Return (changelist URL name, action) for every action of the admin's
    models, and delete_selected for applications and destinations."""
    found = []
    for model, model_admin in admin.site._registry.items():
        if model not in (Application, Destination, Event, Delivery):
            continue
        changelist = f"{model._meta.app_label}_{model._meta.model_name}_changelist"
        # Events and deliveries are records, which the admin never deletes.
        names = [] if model in (Event, Delivery) else ["delete_selected"]
        names += [
            action if isinstance(action, str) else action.__name__
            for action in model_admin.actions or ()
        ]
        found += [(changelist, name) for name in names]
    return found


ACTIONS = _actions()


def selected_pk(objects: Objects, changelist: str) -> Any:
    if changelist.startswith("delivery_delivery"):
        return objects.delivery.pk
    if changelist.startswith("delivery_event"):
        return objects.event.pk
    if changelist.startswith("destinations_application"):
        return objects.application.pk
    return objects.destination.pk


@pytest.fixture
def partner_staff(django_user_model: type[User]) -> User:
    user = django_user_model.objects.create_user(
        username="partner", password=PASSWORD, is_staff=True
    )
    user.groups.add(Group.objects.get(name=GROUP_NAME))
    return user


@pytest.fixture
def developer(django_user_model: type[User], objects: Objects) -> User:
    """An app developer of the objects' application: not staff."""
    user = django_user_model.objects.create_user(username="dev", password=PASSWORD)
    objects.application.developers.add(user)
    return user


@pytest.fixture
def partner_client(client: Client, partner_staff: User) -> Client:
    client.force_login(partner_staff)
    return client


@pytest.fixture
def developer_client(client: Client, developer: User) -> Client:
    client.force_login(developer)
    return client


def is_login_redirect(response: Any) -> bool:
    return response.status_code == 302 and response["Location"].startswith(
        ADMIN_LOGIN_URL
    )


def state(objects: Objects) -> tuple[int, int, int, int, bool]:
    """Counts and flags that any admin POST would change."""
    objects.destination.refresh_from_db()
    return (
        Event.objects.count(),
        Delivery.objects.count(),
        Attempt.objects.count(),
        LogEntry.objects.count(),
        objects.destination.enabled,
    )


# The group.


def test_partner_staff_group_has_permissions() -> None:
    group = Group.objects.get(name=GROUP_NAME)

    granted = {
        f"{permission.content_type.app_label}.{permission.codename}"
        for permission in group.permissions.select_related("content_type")
    }
    assert granted == EXPECTED_PERMISSIONS


def test_partner_staff_user_gets_group_permissions(partner_staff: User) -> None:
    assert partner_staff.get_all_permissions() == EXPECTED_PERMISSIONS


# Partner staff.


@pytest.mark.parametrize("page", PAGES)
def test_partner_staff_opens_page(
    partner_client: Client, objects: Objects, page: str
) -> None:
    response = partner_client.get(PAGES[page](objects))

    assert response.status_code == 200


def test_partner_staff_sees_attempts(partner_client: Client, objects: Objects) -> None:
    response = partner_client.get(
        url_of("delivery_delivery_change", objects.delivery.pk)
    )

    inlines = [
        formset.opts.model for formset in response.context["inline_admin_formsets"]
    ]
    assert Attempt in inlines


@pytest.mark.parametrize("endpoint", POSTS)
def test_partner_staff_posts_endpoint(
    partner_client: Client, objects: Objects, endpoint: str
) -> None:
    response = partner_client.post(POSTS[endpoint](objects))

    assert response.status_code == 302
    assert response["Location"] == url_of(
        "destinations_destination_change", objects.destination.pk
    )
    shown = [str(message) for message in get_messages(response.wsgi_request)]
    assert shown
    assert not any("permission" in text.lower() for text in shown)


@pytest.mark.parametrize(("changelist", "action"), ACTIONS)
def test_partner_staff_runs_action(
    partner_client: Client, objects: Objects, changelist: str, action: str
) -> None:
    url = url_of(changelist)
    offered = partner_client.get(url).context["action_form"].fields["action"].choices

    response = partner_client.post(
        url,
        {"action": action, "_selected_action": [str(selected_pk(objects, changelist))]},
    )

    assert action in [name for name, _ in offered]
    assert response.status_code in (200, 302)
    assert not is_login_redirect(response)
    shown = [str(message) for message in get_messages(response.wsgi_request)]
    assert not any("No action selected" in text for text in shown)


def test_partner_staff_cannot_rotate_secrets(partner_client: Client) -> None:
    url = url_of("destinations_destination_rotate_secrets")

    assert partner_client.get(url).status_code == 403
    assert partner_client.post(url).status_code == 403


def test_partner_staff_logs_in_to_admin(client: Client, partner_staff: User) -> None:
    response = client.post(
        ADMIN_LOGIN_URL,
        {"username": "partner", "password": PASSWORD, "next": "/admin/"},
    )

    assert response.status_code == 302
    assert response["Location"] == "/admin/"
    assert client.get("/admin/").status_code == 200


# App developers.


@pytest.mark.parametrize("page", PAGES)
def test_developer_redirected_from_page(
    developer_client: Client, objects: Objects, page: str
) -> None:
    response = developer_client.get(PAGES[page](objects))

    assert is_login_redirect(response)


@pytest.mark.parametrize("endpoint", [*POSTS, "rotate secrets"])
def test_developer_refused_endpoint(
    developer_client: Client, objects: Objects, endpoint: str
) -> None:
    if endpoint == "rotate secrets":
        url = url_of("destinations_destination_rotate_secrets")
    else:
        url = POSTS[endpoint](objects)
    before = state(objects)

    response = developer_client.post(url)

    assert is_login_redirect(response) or response.status_code == 403
    assert state(objects) == before


def test_developer_redirected_from_rotation_page(developer_client: Client) -> None:
    response = developer_client.get(url_of("destinations_destination_rotate_secrets"))

    assert is_login_redirect(response)


@pytest.mark.parametrize(("changelist", "action"), ACTIONS)
def test_developer_refused_action(
    developer_client: Client, objects: Objects, changelist: str, action: str
) -> None:
    before = state(objects)

    response = developer_client.post(
        url_of(changelist),
        {"action": action, "_selected_action": [str(selected_pk(objects, changelist))]},
    )

    assert is_login_redirect(response) or response.status_code == 403
    assert state(objects) == before


def test_admin_login_rejects_developer(client: Client, developer: User) -> None:
    response = client.post(
        ADMIN_LOGIN_URL, {"username": "dev", "password": PASSWORD, "next": "/admin/"}
    )

    assert response.status_code == 200
    assert "staff account" in response.text
    assert "_auth_user_id" not in client.session
    assert is_login_redirect(client.get("/admin/"))


def test_developer_signed_in_elsewhere_gets_no_admin(
    client: Client, developer: User
) -> None:
    response = client.post(reverse("login"), {"username": "dev", "password": PASSWORD})
    assert response.status_code == 302

    assert is_login_redirect(client.get("/admin/"))
    assert is_login_redirect(client.get(url_of("destinations_destination_changelist")))


def test_every_action_is_covered() -> None:
    destination_actions = {
        action for changelist, action in ACTIONS if "destination_" in changelist
    }

    assert {"enable_destinations", "disable_destinations", "delete_selected"} <= (
        destination_actions
    )
    assert "retry_selected" in {action for _, action in ACTIONS}
