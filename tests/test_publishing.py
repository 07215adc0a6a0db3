"""Publishing: checking envelopes, ordering keys per event type, recording events
with their deliveries in the caller's transaction, and the publish_events command."""

import csv
import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import connection, transaction
from django.utils import timezone

from delivery import publishing
from delivery.models import Delivery, DeliveryStatus, Event
from delivery.publishing import InvalidEvent, parse_envelope, publish, publish_many
from delivery.rows import insert_rows
from destinations.models import Application, Destination, Stage

from .conftest import TEST_ENCRYPTION_KEY, database_url
from .delivery_doubles import make_application, make_destination

pytestmark = pytest.mark.django_db

FIXTURES = Path(__file__).parent / "fixtures"
STREAM = FIXTURES / "stream.jsonl"
STREAM_INDEX = FIXTURES / "stream_index.csv"
STREAM_EVENTS = 500
ACCEPT_DATA = {
    "channel_id": "4102",
    "channel_store_id": "st-1",
    "channel_order_id": "o-1",
}


def envelope(**fields: Any) -> dict[str, Any]:
    values = {
        "id": "01jndgay2hjz1mv1tjv14z4gpq",
        "time": "2025-03-03T08:00:40.017Z",
        "type": "ACCEPT",
        "data": ACCEPT_DATA,
    }
    values.update(fields)
    return values


def without(name: str) -> str:
    values = envelope()
    del values[name]
    return json.dumps(values)


def stream_lines() -> list[str]:
    return STREAM.read_text(encoding="utf-8").splitlines()


class TerminalStringIO(StringIO):
    """Captured output that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def application() -> Application:
    return make_application()


def run_publish_events(path: Path, **streams: Any) -> None:
    call_command(
        "publish_events",
        str(path),
        "--application",
        "shop",
        "--stage",
        "PROD",
        **streams,
    )


# Checking envelopes.


def test_parse_names_missing_id() -> None:
    with pytest.raises(InvalidEvent, match="id is missing; it must be a non-empty"):
        parse_envelope(without("id"))


def test_parse_names_missing_type() -> None:
    with pytest.raises(InvalidEvent, match="type is missing"):
        parse_envelope(without("type"))


def test_parse_names_bad_time() -> None:
    with pytest.raises(InvalidEvent, match="time is 'yesterday'; it must be an ISO"):
        parse_envelope(envelope(time="yesterday"))


def test_parse_rejects_time_without_zone() -> None:
    with pytest.raises(InvalidEvent, match=r"time is '2025-03-03T08:00:40'.*time zone"):
        parse_envelope(envelope(time="2025-03-03T08:00:40"))


@pytest.mark.parametrize(
    "time",
    [
        "2025-03-03T13:30:55.017+05:30:15",
        # Python reads an offset with a fraction of a second, which PostgreSQL's
        # timestamptz input rejects.
        "2025-03-03T13:30:55.517+05:30:15.5",
    ],
)
def test_publish_stores_time_with_odd_offset(
    application: Application, time: str
) -> None:
    make_destination(application)

    publish(application, Stage.PROD, json.dumps(envelope(time=time)))

    event = Event.objects.get()
    expected = datetime(2025, 3, 3, 8, 0, 40, 17000, tzinfo=UTC)
    assert event.time == expected
    assert event.deliveries.get().event_time == expected
    assert event.body() == json.dumps(envelope(time=time)).encode()


def test_parse_names_non_object_data() -> None:
    with pytest.raises(InvalidEvent, match=r"data is \[1, 2\], not a JSON object"):
        parse_envelope(envelope(data=[1, 2]))


def test_parse_rejects_invalid_json() -> None:
    with pytest.raises(InvalidEvent, match=r"not valid JSON \(.* at character 1\)"):
        parse_envelope('{not json"}')


def test_parse_rejects_non_object_envelope() -> None:
    with pytest.raises(InvalidEvent, match="JSON list, not an object"):
        parse_envelope("[1, 2]")


def test_parse_names_missing_order_id() -> None:
    data = {"channel_id": "4102", "channel_store_id": "st-1"}

    with pytest.raises(InvalidEvent) as error:
        parse_envelope(envelope(type="CREATE_SHIPMENT", data=data))

    assert "data.channel_order_id is missing" in str(error.value)
    assert "CREATE_SHIPMENT" in str(error.value)
    assert "01jndgay2hjz1mv1tjv14z4gpq" in str(error.value)


def test_parse_rejects_overlong_id() -> None:
    with pytest.raises(InvalidEvent, match="is 65 characters long; the limit is 64"):
        parse_envelope(envelope(id="e" * 65))


def test_parse_keeps_published_text() -> None:
    line = json.dumps(envelope(), indent=None)

    parsed = parse_envelope(line + "\n")

    assert parsed.raw == line


# Ordering keys.


def test_stream_keys_match_index() -> None:
    with STREAM_INDEX.open(encoding="utf-8", newline="") as index:
        expected = {row["id"]: row["group_key"] for row in csv.DictReader(index)}

    keys = {
        parsed.id: parsed.object_key
        for parsed in (parse_envelope(line) for line in stream_lines())
    }

    assert len(keys) == STREAM_EVENTS
    assert keys == expected


def test_unknown_type_keyed_by_product() -> None:
    data = {"channel_id": "4102", "store_id": "st-1", "product_id": "p-9"}

    parsed = parse_envelope(envelope(type="PRODUCT_DELETE", data=data))

    assert parsed.object_key == "4102/st-1/product/p-9"


def test_unknown_type_without_ids_keyed_alone() -> None:
    parsed = parse_envelope(envelope(type="CATALOG_SYNC_DONE", data={"batch": 7}))

    assert parsed.object_key == "event/01jndgay2hjz1mv1tjv14z4gpq"


# Recording events and deliveries.


def test_publish_queues_delivery_per_destination(application: Application) -> None:
    fifo = make_destination(application, ordered=True)
    standard = make_destination(application, ordered=False)
    make_destination(application, stage=Stage.TEST, name="Test stage")

    result = publish(application, Stage.PROD, json.dumps(envelope()))

    deliveries = {
        delivery.destination_id: delivery for delivery in Delivery.objects.all()
    }
    event = Event.objects.get()
    assert result.recorded == 1
    assert result.deliveries == 2
    assert set(deliveries) == {fifo.pk, standard.pk}
    assert deliveries[fifo.pk].status == DeliveryStatus.PENDING
    assert deliveries[fifo.pk].ordering_key == "4102/st-1/order/o-1"
    assert deliveries[standard.pk].ordering_key == ""
    assert deliveries[fifo.pk].event_time == event.time


def test_publish_rolls_back_with_caller(application: Application) -> None:
    make_destination(application)

    with pytest.raises(RuntimeError), transaction.atomic():
        publish(application, Stage.PROD, json.dumps(envelope()))
        raise RuntimeError("the caller's own work failed")

    assert not Event.objects.exists()
    assert not Delivery.objects.exists()


def test_publish_wakes_workers_after_commit(
    application: Application, django_capture_on_commit_callbacks: Any
) -> None:
    make_destination(application)

    with django_capture_on_commit_callbacks() as callbacks:
        publish(application, Stage.PROD, json.dumps(envelope()))

    assert len(callbacks) == 1


def test_publish_skips_recorded_id(application: Application) -> None:
    make_destination(application)
    publish(application, Stage.PROD, json.dumps(envelope()))

    result = publish(application, Stage.PROD, json.dumps(envelope()))

    assert result.recorded == 0
    assert result.duplicates == 1
    assert result.deliveries == 0
    assert Delivery.objects.count() == 1


def test_concurrent_duplicate_is_skipped(
    application: Application,
) -> None:
    destination = make_destination(application)
    first = parse_envelope(json.dumps(envelope()))
    second = parse_envelope(json.dumps(envelope(id="01jndgay2hjz1mv1tjv14z4gpr")))
    # Another publisher records the first event after this one checked for it.
    publish_many(application, Stage.PROD, [first])
    now = timezone.now()
    both = (first, second)
    events = [publishing._event(application, Stage.PROD, item, now) for item in both]
    deliveries = [publishing._delivery(item, destination, now) for item in both]

    publishing._insert(events, deliveries)

    assert sorted(Event.objects.values_list("id", flat=True)) == [first.id, second.id]
    assert Delivery.objects.filter(event_id=first.id).count() == 1
    stored = Event.objects.get(pk=second.id)
    assert stored.data == ACCEPT_DATA
    assert stored.body() == second.raw.encode()
    assert stored.recorded_at is not None
    delivery = Delivery.objects.get(event_id=second.id)
    assert delivery.status == DeliveryStatus.PENDING
    assert delivery.ordering_key == second.object_key


def test_concurrent_other_stage_id_skipped(
    application: Application, monkeypatch: pytest.MonkeyPatch
) -> None:
    destination = make_destination(application)
    make_destination(application, stage=Stage.TEST, name="Orders TEST")
    event = parse_envelope(json.dumps(envelope()))
    real_insert = publishing._insert

    def insert_after_other_publisher(*args: Any) -> Any:
        # Another publisher records the id for TEST after this PROD publish checked
        # for it, as when the platform publishes an event to both stages at once.
        monkeypatch.setattr(publishing, "_insert", real_insert)
        publish_many(application, Stage.TEST, [event])
        return real_insert(*args)

    monkeypatch.setattr(publishing, "_insert", insert_after_other_publisher)

    result = publish_many(application, Stage.PROD, [event])

    assert Event.objects.get(pk=event.id).stage == Stage.TEST
    assert not Delivery.objects.filter(destination=destination).exists()
    assert result.conflicts == [event.id]
    assert result.recorded == 0
    assert result.deliveries == 0


def test_publish_many_skips_repeated_id(application: Application) -> None:
    make_destination(application)
    first = parse_envelope(envelope())
    second = parse_envelope(envelope(id="01jndgc8kta42bb9qh4pbfgzh8"))

    result = publish_many(application, Stage.PROD, [first, second, first])

    assert result.recorded == 2
    assert result.duplicates == 1
    assert Delivery.objects.count() == 2


def test_publish_dict_body_is_compact_json(application: Application) -> None:
    publish(application, Stage.PROD, envelope())

    event = Event.objects.get()

    assert json.loads(event.body()) == envelope()
    assert b" " not in event.body()


# The publish_events command.


def test_publish_events_reports_counts(application: Application) -> None:
    make_destination(application, ordered=True)
    make_destination(application, ordered=False, paused_at=timezone.now())
    stdout = StringIO()

    run_publish_events(STREAM, stdout=stdout, stderr=StringIO())

    assert stdout.getvalue().strip() == (
        "shop PROD: 500 events recorded, 0 already recorded and skipped, 0 invalid; "
        "1000 deliveries queued (500 held for paused or disabled destinations)."
    )
    assert Event.objects.count() == STREAM_EVENTS


def test_publish_events_twice_skips_all(application: Application) -> None:
    make_destination(application)
    run_publish_events(STREAM, stdout=StringIO(), stderr=StringIO())
    stdout = StringIO()

    run_publish_events(STREAM, stdout=stdout, stderr=StringIO())

    assert "0 events recorded, 500 already recorded and skipped" in stdout.getvalue()
    assert Delivery.objects.count() == STREAM_EVENTS


def test_publish_events_reports_invalid_line(
    application: Application, tmp_path: Path
) -> None:
    lines = stream_lines()
    path = tmp_path / "events.jsonl"
    path.write_text(f"{lines[0]}\n{{not json\n{lines[1]}\n", encoding="utf-8")
    stdout, stderr = StringIO(), StringIO()

    with pytest.raises(
        CommandError, match="1 line was invalid and not published"
    ) as error:
        run_publish_events(path, stdout=stdout, stderr=stderr)

    assert error.value.returncode == 1
    assert "line 2: The envelope is not valid JSON" in stderr.getvalue()
    assert "2 events recorded, 0 already recorded and skipped, 1 invalid" in (
        stdout.getvalue()
    )
    assert Event.objects.count() == 2


def test_publish_events_names_unknown_application(application: Application) -> None:
    with pytest.raises(CommandError, match="No application has the slug 'nope'"):
        call_command(
            "publish_events", str(STREAM), "--application", "nope", "--stage", "PROD"
        )


def test_publish_events_shows_progress_on_terminal(application: Application) -> None:
    stderr = TerminalStringIO()

    run_publish_events(STREAM, stdout=StringIO(), stderr=stderr)

    assert "\r[" in stderr.getvalue()
    assert "500/500 lines" in stderr.getvalue()


def test_publish_events_quiet_when_redirected(application: Application) -> None:
    stderr = StringIO()

    run_publish_events(STREAM, stdout=StringIO(), stderr=stderr)

    assert stderr.getvalue() == ""


def test_event_body_is_published_bytes(application: Application) -> None:
    run_publish_events(STREAM, stdout=StringIO(), stderr=StringIO())

    expected = {json.loads(line)["id"]: line.encode() for line in stream_lines()}
    bodies = {event.id: event.body() for event in Event.objects.all()}

    assert bodies == expected


@pytest.mark.django_db(transaction=True)
def test_publish_events_exits_nonzero_on_invalid(
    tmp_path: Path, celery_broker: dict[str, str]
) -> None:
    # Committed, so the command's own process can read the application.
    Application.objects.create(name="Shop", slug="shop")
    lines = stream_lines()
    path = tmp_path / "events.jsonl"
    path.write_text(f"{lines[0]}\n[]\n", encoding="utf-8")
    environment = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "portal.settings",
        "ENV_FILE": "",
        "DATABASE_URL": database_url(connection.settings_dict),
        "ENCRYPTION_KEYS": TEST_ENCRYPTION_KEY,
        **celery_broker,
    }

    finished = subprocess.run(
        [
            sys.executable,
            "manage.py",
            "publish_events",
            str(path),
            *("--application", "shop", "--stage", "PROD"),
        ],
        cwd=settings.BASE_DIR,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert finished.returncode == 1
    assert "line 2: The envelope is a JSON list, not an object" in finished.stderr
    assert Event.objects.filter(id=json.loads(lines[0])["id"]).exists()
    assert not Destination.objects.exists()


# Hostile input: each is one clear error, never a crash.


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (json.dumps(envelope(time="2025-02-30T08:00:00Z")), "time is"),
        (json.dumps(envelope(time="0001-01-01T00:00:00+14:00")), "time is"),
        (json.dumps(envelope(id="a/b")), "id 'a/b' has characters"),
        ('{"id": "x", "type": "ACCEPT", "data": NaN}', "contains NaN"),
        ("[" * 100_000 + "]" * 100_000, "nests objects or arrays too deeply"),
        (json.dumps(envelope(type="A\u0000")), "NUL character"),
        (
            json.dumps(envelope(data={**ACCEPT_DATA, "channel_order_id": "o" * 600})),
            "the limit is 512",
        ),
    ],
    ids=[
        "impossible-date",
        "overflowing-offset",
        "slash-in-id",
        "nan",
        "deep",
        "nul",
        "long-key",
    ],
)
def test_parse_rejects_hostile_envelope(text: str, expected: str) -> None:
    with pytest.raises(InvalidEvent, match=re.escape(expected)):
        parse_envelope(text)


# A high surrogate without its low one. json.dumps writes it as the escape \ud800,
# which json.loads accepts.
LONE_SURROGATE = "\ud800"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({**ACCEPT_DATA, "note": LONE_SURROGATE}, "data.note"),
        (
            {**ACCEPT_DATA, "lines": [{"sku": "a"}, {"sku": LONE_SURROGATE}]},
            "data.lines[1].sku",
        ),
        ({**ACCEPT_DATA, "k" + LONE_SURROGATE: 1}, "a key of data"),
        (
            {**ACCEPT_DATA, "channel_order_id": "o" + LONE_SURROGATE},
            "data.channel_order_id",
        ),
    ],
    ids=["value", "nested", "key", "object-key"],
)
@pytest.mark.parametrize("as_text", [True, False], ids=["text", "dict"])
def test_parse_rejects_lone_surrogate(
    data: dict[str, Any], field: str, as_text: bool
) -> None:
    raw = envelope(data=data)

    with pytest.raises(InvalidEvent) as error:
        parse_envelope(json.dumps(raw) if as_text else raw)

    message = str(error.value)
    assert message.startswith(f"{field} is ")
    assert "contains a lone surrogate" in message
    assert "Send the character itself" in message
    assert LONE_SURROGATE not in message


def test_parse_rejects_upper_case_surrogate_escape() -> None:
    text = json.dumps(envelope(data={**ACCEPT_DATA, "note": LONE_SURROGATE}))

    with pytest.raises(InvalidEvent, match=r"^data.note is '\\ud800'"):
        parse_envelope(text.replace("\\ud800", "\\uD800"))


def test_parse_rejects_lone_surrogate_in_type() -> None:
    with pytest.raises(InvalidEvent, match=r"^type is 'A\\ud800', which contains"):
        parse_envelope(envelope(type="A" + LONE_SURROGATE))


def test_parse_keeps_surrogate_pair() -> None:
    text = json.dumps(envelope(data={**ACCEPT_DATA, "note": "\U0001f600"}))

    parsed = parse_envelope(text)

    assert "\\ud83d\\ude00" in text
    assert parsed.data["note"] == "\U0001f600"


@pytest.mark.parametrize("note", ["C:\\u0000", "\\ud800"], ids=["nul", "surrogate"])
def test_parse_keeps_escaped_backslash_before_u(note: str) -> None:
    # A backslash followed by the letters of an escape, not the escape: JSON text
    # "C:\\u0000" has the substring \u0000 but decodes to no NUL.
    text = json.dumps(envelope(data={**ACCEPT_DATA, "note": note}))

    parsed = parse_envelope(text)

    assert parsed.data["note"] == note
    assert parsed.raw == text


def test_parse_names_nul_in_dict_envelope() -> None:
    with pytest.raises(
        InvalidEvent, match=r"^data.note is 'a\\x00', which contains a NUL"
    ):
        parse_envelope(envelope(data={**ACCEPT_DATA, "note": "a\x00"}))


def test_publish_events_reports_lone_surrogate(
    application: Application, tmp_path: Path
) -> None:
    lines = stream_lines()
    bad = json.dumps(envelope(data={**ACCEPT_DATA, "note": LONE_SURROGATE}))
    path = tmp_path / "events.jsonl"
    path.write_text(f"{lines[0]}\n{bad}\n", encoding="utf-8")
    stderr = StringIO()

    with pytest.raises(CommandError, match="1 line was invalid"):
        run_publish_events(path, stdout=StringIO(), stderr=stderr)

    assert "line 2: data.note is '\\ud800', which contains a lone" in stderr.getvalue()
    assert list(Event.objects.values_list("id", flat=True)) == [
        json.loads(lines[0])["id"]
    ]


def test_publish_rejects_unknown_stage(application: Application) -> None:
    with pytest.raises(ValueError, match="stage is 'test'"):
        publish(application, "test", json.dumps(envelope()))

    assert not Event.objects.exists()


def test_publish_reports_id_of_other_application(application: Application) -> None:
    other = Application.objects.create(name="Other", slug="other")
    make_destination(other)
    publish(application, Stage.PROD, json.dumps(envelope()))

    result = publish(other, Stage.PROD, json.dumps(envelope()))

    assert result.conflicts == [envelope()["id"]]
    assert result.duplicates == 0
    assert result.recorded == 0


def test_publish_events_names_conflicting_id(
    application: Application, tmp_path: Path
) -> None:
    publish(application, Stage.TEST, json.dumps(envelope()))
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps(envelope()) + "\n", encoding="utf-8")
    stderr = StringIO()

    with pytest.raises(CommandError, match="1 line was invalid"):
        run_publish_events(path, stdout=StringIO(), stderr=stderr)

    assert f"event {envelope()['id']}: already recorded" in stderr.getvalue()


def test_publish_events_names_non_utf8_line(
    application: Application, tmp_path: Path
) -> None:
    lines = stream_lines()
    path = tmp_path / "events.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf" + lines[0].encode() + b"\n\xff\xfe\n" + lines[1].encode()
    )
    stderr = StringIO()

    with pytest.raises(CommandError, match="1 line was invalid"):
        run_publish_events(path, stdout=StringIO(), stderr=stderr)

    assert "line 2: byte 1 is not UTF-8" in stderr.getvalue()
    assert Event.objects.count() == 2


def test_insert_rows_names_missing_field() -> None:
    row = {"event_id": "e-1", "destination_id": 1}

    with pytest.raises(ValueError, match="must give exactly the fields") as raised:
        insert_rows(Delivery, [row])

    assert "'status'" in str(raised.value)


def test_missing_object_id_names_event_type() -> None:
    data = {
        key: value for key, value in ACCEPT_DATA.items() if key != "channel_order_id"
    }

    with pytest.raises(InvalidEvent) as error:
        parse_envelope(envelope(data=data))

    assert "but events of type ACCEPT need it" in str(error.value)
