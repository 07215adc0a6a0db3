"""The admin in Chromium for Pub/Sub and Service Bus destinations, the grant panel and
the history page."""

from typing import TYPE_CHECKING

import pytest
from playwright.sync_api import Page, expect
from pytest_django import Settings

from delivery.peers.pubsub import PubSubPeer
from delivery.peers.servicebus import ServiceBusPeer
from delivery.testevents import TEST_EVENT_TYPE
from destinations.models import Destination, Kind, Stage
from tests.pubsub_fixtures import PUBSUB_PROJECT, new_topic
from tests.servicebus_fixtures import unique_entity_name

from .test_admin_browser import (
    KIND_FORMS,
    add_application,
    add_destination,
    latest_result,
    latest_result_shown,
    reload_until,
)

if TYPE_CHECKING:
    from tests.conftest import Worker

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

REGIONAL_ENDPOINT = "europe-west1-pubsub.googleapis.com:443"


def fill_pubsub_form(page: Page, project: str, topic: str) -> None:
    page.locator("#id_pubsub_project_id").fill(project)
    page.locator("#id_pubsub_topic_id").fill(topic)
    page.locator("#id_pubsub_ordering").check()
    page.locator("#id_pubsub_endpoint").fill(REGIONAL_ENDPOINT)


def fill_servicebus_form(page: Page, connection_string: str, queue: str) -> None:
    page.locator("#id_servicebus_connection_string").fill(connection_string)
    page.locator("#id_servicebus_entity_type").select_option("queue")
    page.locator("#id_servicebus_entity_name").fill(queue)
    page.locator("#id_servicebus_sessions").check()


KIND_FORMS[Kind.PUBSUB] = fill_pubsub_form
KIND_FORMS[Kind.SERVICEBUS] = fill_servicebus_form


def send_test_and_wait(page: Page, name: str) -> str:
    """Press "Send test event" and reload until the result shows; return it."""
    page.locator("#send-test-event").click()
    expect(page.locator(".messagelist .success")).to_contain_text(
        f"Test event queued for {name}"
    )
    reload_until(page, lambda: latest_result_shown(page), "the test event's result")
    return latest_result(page, "success").inner_text()


def test_pubsub_destination_sends_test_event(
    admin_page: Page, worker: "Worker", local_pubsub_peer: PubSubPeer
) -> None:
    page = admin_page
    topic = new_topic(local_pubsub_peer.endpoint, ordering=True)
    add_application(page, "Orders", "orders")

    add_destination(
        page,
        Kind.PUBSUB,
        name="Orders topic",
        application="Orders",
        stage=Stage.TEST,
        project=PUBSUB_PROJECT,
        topic=topic.topic_id,
    )
    result = send_test_and_wait(page, "Orders topic")

    destination = Destination.objects.get(name="Orders topic")
    [message] = topic.pull(1)
    assert destination.pubsub_ordering
    assert f"message ID {message.message_id}" in result
    assert message.attributes["event_type"] == TEST_EVENT_TYPE
    assert message.ordering_key == f"test/{destination.pk}"


def test_servicebus_destination_sends_test_event(
    admin_page: Page, worker: "Worker", servicebus: ServiceBusPeer
) -> None:
    page = admin_page
    queue = unique_entity_name("browser")
    servicebus.add_queue(queue, requires_session=True)
    add_application(page, "Orders", "orders")

    add_destination(
        page,
        Kind.SERVICEBUS,
        name="Orders bus",
        application="Orders",
        stage=Stage.TEST,
        connection_string=servicebus.connection_string(),
        queue=queue,
    )
    result = send_test_and_wait(page, "Orders bus")

    destination = Destination.objects.get(name="Orders bus")
    [message] = servicebus.messages(queue)
    assert servicebus.key not in page.content()
    assert f"message ID {message.message_id}" in result
    assert message.session_id == f"test/{destination.pk}"


def test_grant_panel_names_stage_identity(admin_page: Page, settings: Settings) -> None:
    role = "arn:aws:iam::111122223333:role/platform-test-sender"
    settings.STAGE_IDENTITIES = {
        "TEST": {"aws_principal_arn": role},
        "PROD": {"aws_principal_arn": "arn:aws:iam::444455556666:role/prod"},
    }
    page = admin_page
    add_application(page, "Orders", "orders")
    add_destination(
        page,
        Kind.SQS,
        name="Orders queue",
        application="Orders",
        stage=Stage.TEST,
        queue_url="https://sqs.eu-west-1.amazonaws.com/123456789012/orders.fifo",
        fifo=True,
    )

    panel = page.locator("#what-to-grant")
    expect(panel).to_be_visible()
    expect(panel).to_contain_text("Stage TEST sends as")
    expect(panel).to_contain_text(role)
    expect(panel).to_contain_text("arn:aws:sqs:eu-west-1:123456789012:orders.fifo")
    assert "444455556666" not in panel.inner_text()


def test_history_page_shows_old_and_new_values(admin_page: Page) -> None:
    page = admin_page
    add_application(page, "Orders", "orders")
    add_destination(
        page,
        Kind.SQS,
        name="Orders queue",
        application="Orders",
        stage=Stage.TEST,
        queue_url="https://sqs.eu-west-1.amazonaws.com/123456789012/orders.fifo",
        fifo=True,
    )

    page.locator("#id_name").fill("Orders queue renamed")
    page.get_by_role("button", name="Save and continue editing").click()
    expect(page.locator(".messagelist .success")).to_be_visible()
    page.get_by_role("link", name="History").click()

    changes = page.locator(".audit-changes li")
    expect(
        changes.filter(has_text="Orders queue → Orders queue renamed")
    ).to_have_count(1)
    expect(page.locator("#change-history tbody tr").first).to_contain_text("admin")
