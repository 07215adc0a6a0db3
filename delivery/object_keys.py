"""The ordering key of an event: the id of the object it changes.

Events of one object share a key, so a destination that keeps order delivers them in
the order they happened. The platform's event types name their object in `data`:
order actions by order id, product, offer and price/stock events by product id
(they change the same listing), store features by store id. Ids are scoped by channel
and store, since the same order or product id can exist in two stores.
"""

from typing import Any

ORDER_ACTION_TYPES = frozenset(
    {
        "ACCEPT",
        "CREATE_SHIPMENT",
        "CANCEL",
        "REFUND",
        "UPLOAD_DOCUMENT",
        "ACCEPT_RETURN",
        "UPDATE_RETURN_TRACKING_INFORMATION",
        "ACKNOWLEDGE_RETURN_RECEPTION",
        "CLOSE_RETURN",
    }
)
PRODUCT_TYPES = frozenset({"PRODUCT_UPSERT", "OFFER_UPSERT", "PRICE_STOCK_UPSERT"})
STORE_TYPES = frozenset({"STORE_FEATURE"})


class MissingField(ValueError):
    def __init__(self, event_type: str, name: str) -> None:
        super().__init__(
            f"data.{name} is missing or empty, but events of type {event_type} need "
            "it to find the object they change. Publish the event with that field."
        )
        self.field = f"data.{name}"


def object_key(event_type: str, data: dict[str, Any], event_id: str) -> str:
    """Return the ordering key of an event; raise MissingField if a needed id is
    absent. An event of a type not known here is keyed by the first object id its
    data carries, or else by its own id, which orders it with nothing else."""
    if event_type in ORDER_ACTION_TYPES:
        return _order_key(event_type, data)
    if event_type in PRODUCT_TYPES:
        return _product_key(event_type, data)
    if event_type in STORE_TYPES:
        return _store_key(event_type, data)

    # The platform may add types; their consumers are asked to tolerate them.
    if data.get("channel_order_id"):
        return _order_key(event_type, data)
    if data.get("product_id"):
        return _product_key(event_type, data)
    if data.get("store_id"):
        return _store_key(event_type, data)
    return f"event/{event_id}"


def _order_key(event_type: str, data: dict[str, Any]) -> str:
    channel, store, order = _ids(
        event_type, data, "channel_id", "channel_store_id", "channel_order_id"
    )
    return f"{channel}/{store}/order/{order}"


def _product_key(event_type: str, data: dict[str, Any]) -> str:
    channel, store, product = _ids(
        event_type, data, "channel_id", "store_id", "product_id"
    )
    return f"{channel}/{store}/product/{product}"


def _store_key(event_type: str, data: dict[str, Any]) -> str:
    channel, store = _ids(event_type, data, "channel_id", "store_id")
    return f"{channel}/store/{store}"


def _ids(event_type: str, data: dict[str, Any], *names: str) -> list[str]:
    values = []
    for name in names:
        value = data.get(name)
        if value is None or value == "":
            raise MissingField(event_type, name)
        values.append(str(value))
    return values
