"""The embedded broker: kombu's filesystem transport, with messages that appear whole.

kombu's own transport (``kombu.transport.filesystem``) creates a message's file, then
locks and writes it, while a consumer lists the folder and takes any ``.msg`` file
without the lock. A consumer can so take a file that is still empty: it fails to decode
it (an exception that stops the Celery worker) after it has already moved it away (the
message is lost). The exchange tables in the control folder have the same window: a
table is truncated before it is locked, so a publisher can read it empty, and two
processes binding at once can drop each other's binding. And kombu keeps one binding
state per process, whatever the folder.

Here, with everything else (queues, fanout tables, ``store_processed``, purge, size) as
kombu's:

- a publisher writes a message under a name no consumer matches (``.tmp`` after the
  ``.msg``), fsyncs it and renames it into place, atomically, so a ``.msg`` file is
  always whole;
- a consumer claims a file by renaming it (``.claimed`` after the ``.msg``) before it
  reads it: of consumers that list the same file, one rename wins and the others move
  on, so no message is delivered twice;
- a file that cannot be decoded as a message is logged (ERROR, with its path) and moved
  to the quarantine folder (transport option ``quarantine_folder``), and the consumer
  goes on with the next one;
- an exchange table is never truncated before it is locked, and an empty one reads as
  no bindings (a binding still being written);
- bindings are remembered per control folder, not per process.

Every process on one folder must use this transport: a message written by kombu's own
publisher can still be read before it is whole. ``worker.config`` selects it for
``filesystem://`` broker URLs, so every conveyor process does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from queue import Empty
from time import monotonic
from typing import Any, ClassVar

from kombu.exceptions import ChannelError
from kombu.transport import filesystem, virtual
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads
from kombu.utils.url import maybe_sanitize_url

log = logging.getLogger(__name__)

#: ``broker_transport`` value (a kombu transport path) that selects this transport.
TRANSPORT = "worker.filesystem_transport:Transport"
# Suffixes after a message's ``<time>_<uuid>.<queue>.msg`` name: a consumer looks for
# names that end in ``.<queue>.msg`` only, so it never sees these.
WRITING = ".tmp"
CLAIMED = ".claimed"
QUARANTINE = "quarantine"
# A row of an exchange's table: routing key, pattern, queue.
Binding = filesystem.exchange_queue_t
# A change to an exchange's bindings: the new table, or None to leave it as it is.
Edit = Callable[[list[Binding]], list[Binding] | None]
# kombu's file locks (fcntl on POSIX, win32 on Windows); its stubs omit the flags.
LOCK_SH: int = filesystem.LOCK_SH  # type: ignore[attr-defined]
LOCK_EX: int = filesystem.LOCK_EX  # type: ignore[attr-defined]


class Channel(filesystem.Channel):
    """A filesystem channel whose message files appear whole and are claimed atomically."""

    # Typed as kombu's stubs type the filesystem channel's (they disagree with virtual's).
    def _put(self, queue: str, payload: dict[str, Any], **kwargs: Any) -> None:  # type: ignore[override]
        """Write the message under a temporary name, fsync it, rename it into place."""
        # kombu's name, so messages keep kombu's order (oldest first) and queue matching.
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        path = os.path.join(self.data_folder_out, name)
        partial = path + WRITING
        try:
            with open(partial, "xb") as file:
                file.write(str_to_bytes(dumps(payload)))
                file.flush()
                # On disk before it is visible: a message taken from the queue is whole
                # even after a crash of the machine (a rename may reach disk before data).
                os.fsync(file.fileno())
            os.replace(partial, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.remove(partial)
            raise ChannelError(f"Cannot add file {path!r} to directory") from exc

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        """Claim, read and retire the oldest whole message of ``queue``."""
        wanted = f"{queue}.msg"
        folder = self.data_folder_in
        for name in sorted(os.listdir(folder)):
            if name.partition(".")[2] != wanted:
                continue
            claimed = os.path.join(folder, name + CLAIMED)
            try:
                os.rename(os.path.join(folder, name), claimed)
            except OSError:  # another consumer claimed it first
                continue
            try:
                with open(claimed, "rb") as file:
                    data = file.read()
            except OSError as exc:
                raise ChannelError(f"Cannot read file {claimed!r} from queue.") from exc
            try:
                payload = loads(bytes_to_str(data))
                # What the consumer will build from it: a payload that is JSON but not a
                # message (no properties, a body that does not decode) fails here, not
                # in the worker's consumer loop, where it would stop the worker.
                self.Message(payload, channel=self)
            except Exception as exc:
                self._quarantine(claimed, name, exc)
                continue
            self._retire(claimed, name)
            return payload  # type: ignore[no-any-return]
        raise Empty()

    def _retire(self, claimed: str, name: str) -> None:
        """Keep a delivered message in the processed folder, or delete it."""
        try:
            if self.store_processed:
                shutil.move(claimed, os.path.join(self.processed_folder, name))
            else:
                os.remove(claimed)
        except OSError:
            # Delivered already: a file left behind under its claimed name is never
            # delivered again, so this is not worth stopping the consumer for.
            log.warning("could not retire delivered message file %s", claimed, exc_info=True)

    def _quarantine(self, claimed: str, name: str, error: Exception) -> None:
        """Set an undecodable message file aside, with an ERROR naming it."""
        folder = self.quarantine_folder
        target = os.path.join(folder, name)
        try:
            os.makedirs(folder, exist_ok=True)
            shutil.move(claimed, target)
        except OSError:
            log.exception(
                "undecodable message %s (%s) could not be moved to %s; left as %s",
                os.path.join(self.data_folder_in, name),
                error,
                folder,
                claimed,
            )
            return
        log.error(
            "undecodable message %s (%r) moved to %s",
            os.path.join(self.data_folder_in, name),
            error,
            target,
        )

    @property
    def quarantine_folder(self) -> str:
        """Where undecodable message files go (default: ``quarantine`` in the queue folder)."""
        folder = self.transport_options.get("quarantine_folder")
        return str(folder) if folder else os.path.join(self.data_folder_in, QUARANTINE)

    def get_table(self, exchange: str) -> list[Binding]:  # type: ignore[override]
        """The exchange's bindings; an empty table file is one still being written."""
        file: Path = self._exchange_file(exchange)  # type: ignore[attr-defined]  # not in stubs
        try:
            with file.open("rb", buffering=0) as table:
                filesystem.lock(table, LOCK_SH)
                try:
                    return _bindings(table.read())
                finally:
                    filesystem.unlock(table)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ChannelError(f"Cannot open {file}") from exc

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str | None, queue: str) -> None:
        binding = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        self._edit_table(exchange, lambda bindings: _with(bindings, binding))

    def _delete(
        self,
        queue: str,
        exchange: str,
        routing_key: str,
        pattern: str | None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        # The virtual channel's part (a purge); kombu's own would read the table unguarded.
        virtual.Channel._delete(self, queue, exchange, routing_key, pattern, *args, **kwargs)
        binding = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        self._edit_table(exchange, lambda bindings: _without(bindings, binding), create=False)

    def _edit_table(self, exchange: str, edit: Edit, create: bool = True) -> None:
        """Rewrite an exchange's table under its lock; opened without truncating it."""
        file: Path = self._exchange_file(exchange)  # type: ignore[attr-defined]  # not in stubs
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        try:
            if create:
                self.control_folder.mkdir(exist_ok=True)
            try:
                descriptor = os.open(file, flags, 0o666)
            except FileNotFoundError:
                if create:
                    raise
                return  # removed meanwhile: nothing to unbind
            with os.fdopen(descriptor, "rb+", buffering=0) as table:
                filesystem.lock(table, LOCK_EX)
                try:
                    bindings = _bindings(table.read())
                    changed = edit(bindings)
                    if changed is not None:
                        table.seek(0)
                        table.write(str_to_bytes(dumps(changed)))
                        table.truncate()
                finally:
                    filesystem.unlock(table)
        except OSError as exc:
            raise ChannelError(f"Cannot open {file}") from exc


def _bindings(data: bytes) -> list[Binding]:
    return [filesystem.exchange_queue_t(*row) for row in loads(bytes_to_str(data))] if data else []


def _with(bindings: list[Binding], binding: Binding) -> list[Binding] | None:
    """The table with ``binding`` first (kombu's order), or None when it is there."""
    return None if binding in bindings else [binding, *bindings]


def _without(bindings: list[Binding], binding: Binding) -> list[Binding] | None:
    """The table without ``binding``, or None when it was not there."""
    return [b for b in bindings if b != binding] if binding in bindings else None


class Transport(filesystem.Transport):
    """kombu's filesystem transport with :class:`Channel`, its bindings kept per folder."""

    Channel = Channel
    # kombu keeps one binding state per process, whatever the folder: a process on a
    # second folder (two apps, tests) took its queues for bound already, wrote no
    # exchange table there, and its messages were dropped as undeliverable.
    states: ClassVar[dict[str, virtual.BrokerState]] = {}
    # Selected by ``broker_transport`` while the URL stays ``filesystem://``: taking the
    # URL as it is (this transport reads nothing from it) keeps it the name shown in the
    # worker's banner and logs, instead of the transport's import path.
    can_parse_url = True

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        options = client.transport_options or {}
        folder = os.path.abspath(options.get("control_folder", "control"))
        self.state = self.states.setdefault(folder, virtual.BrokerState())

    def as_uri(self, uri: str, include_password: bool = False, mask: str = "**") -> str:
        """The broker URL as given (it holds no password)."""
        return uri if include_password else str(maybe_sanitize_url(uri, mask))
