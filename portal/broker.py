"""The filesystem broker of the embedded setup, with messages written atomically.

kombu's filesystem transport (kombu 5.7) creates a message file under its final name
and then writes it. A worker polling the same folder can move and read the file in
between, finds it empty, and stops with "Unrecoverable error: JSONDecodeError". This
transport writes each message to a temporary name that no queue matches and renames
it into place, which is atomic within one folder.
"""

import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    # kombu's own Channel renames the base class's `message` parameter to `payload`,
    # so no signature matches both of them.
    def _put(  # type: ignore[override]
        self, queue: str, payload: dict[str, Any], **kwargs: Any
    ) -> None:
        """Put `payload` onto `queue` as a file that appears complete or not at all."""
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        # The reader takes only files named "<prefix>.<queue>.msg".
        partial = os.path.join(self.data_folder_out, f".writing-{uuid.uuid4()}")
        try:
            with open(partial, "wb") as file:
                file.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as error:
            raise ChannelError(f"Cannot add file {final!r} to directory") from error


class Transport(filesystem.Transport):
    Channel = Channel


def use_atomic_filesystem_broker() -> None:
    """Make the filesystem:// broker URL use this module's transport."""
    TRANSPORT_ALIASES["filesystem"] = f"{__name__}:Transport"
