"""The embedded filesystem broker writes each message atomically."""

import os
from pathlib import Path
from queue import Empty
from typing import Any

import pytest
from kombu import Connection

from portal import broker


def channel_in(folder: Path) -> Any:
    connection = Connection(
        "filesystem://",
        transport_options={
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            "control_folder": str(folder / "control"),
        },
    )
    return connection.channel()


def test_filesystem_url_uses_atomic_transport(tmp_path: Path) -> None:
    channel = channel_in(tmp_path)

    assert isinstance(channel, broker.Channel)


def test_message_being_written_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    channel = channel_in(tmp_path)
    seen_while_writing: list[Any] = []
    real_replace = os.replace

    def replace(source: str, target: str) -> None:
        # The message is written but not renamed yet: a poll must not take it.
        try:
            seen_while_writing.append(channel._get("celery"))
        except Empty:
            seen_while_writing.append(None)
        real_replace(source, target)

    monkeypatch.setattr(broker.os, "replace", replace)

    channel._put("celery", {"body": "wake up"})

    assert seen_while_writing == [None]
    assert channel._get("celery") == {"body": "wake up"}
    assert [path.name for path in tmp_path.iterdir() if path.is_file()] == []
