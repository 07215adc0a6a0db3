"""Run a Service Bus peer alone and print its connection string.

    python -m delivery.peers.servicebus --port 5672 --queue orders \
        --session-queue ordered --topic events

It runs until interrupted (Ctrl-C or SIGTERM) and logs each message it accepts.
"""

import argparse
import logging
import signal
import threading

from . import (
    DEFAULT_KEY_NAME,
    DEFAULT_MAX_MESSAGE_SIZE,
    start_servicebus_peer,
)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m delivery.peers.servicebus",
        description=(
            "Run a local AMQP 1.0 peer that accepts sends as an Azure Service Bus "
            "namespace does, and print its connection string."
        ),
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="The address to listen on (default: 127.0.0.1).",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=0,
        help="The TCP port to listen on; 0 picks a free one (default: 0).",
    )
    parser.add_argument(
        "--queue", action="append", default=[], help="A queue to create; repeatable."
    )
    parser.add_argument(
        "--session-queue",
        action="append",
        default=[],
        help="A queue that requires sessions; repeatable.",
    )
    parser.add_argument(
        "--topic", action="append", default=[], help="A topic to create; repeatable."
    )
    parser.add_argument(
        "--session-topic",
        action="append",
        default=[],
        help="A topic whose subscriptions require sessions; repeatable.",
    )
    parser.add_argument(
        "--key-name",
        default=DEFAULT_KEY_NAME,
        help=f"The shared access policy's name (default: {DEFAULT_KEY_NAME}).",
    )
    parser.add_argument(
        "--key",
        default=None,
        help="The shared access policy's key (default: a random key).",
    )
    parser.add_argument(
        "--max-message-size",
        type=int,
        default=DEFAULT_MAX_MESSAGE_SIZE,
        help=(
            "The largest message each entity accepts, in bytes "
            f"(default: {DEFAULT_MAX_MESSAGE_SIZE}, the Standard tier's limit)."
        ),
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    arguments = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    peer = start_servicebus_peer(
        arguments.host,
        arguments.port,
        queues=arguments.queue,
        session_queues=arguments.session_queue,
        topics=arguments.topic,
        session_topics=arguments.session_topic,
        key_name=arguments.key_name,
        key=arguments.key,
        max_message_size=arguments.max_message_size,
    )

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    # The key is a local, made-up one: printing it is the point of this command.
    print(peer.connection_string(), flush=True)
    try:
        stopping.wait()
    except KeyboardInterrupt:
        pass
    finally:
        peer.stop()


if __name__ == "__main__":
    main()
