"""Attempt records: the paid attempts of an image not yet settled, where any worker finds them.

A paid attempt with a receiver is recorded before its request leaves, so that a run resumed
after a kill, on any worker that shares the result storage, looks for its delivery before
paying again (:mod:`prefect_journey.recovery`). The records of one image are one small JSON
document beside the ``imagine`` task's cache records (its result storage), named after the
image's cache key. Each record carries when it was sent and when it expires: past the
provider's last delivery retry nothing can arrive for it any more. A record is deleted when
its attempt settles, and an expired one by the next run that reads the document, so records
do not pile up.

The records need a filesystem to be deleted: the result storage is Prefect's
``LocalFileSystem`` (the default) or ``RemoteFileSystem`` (any fsspec URL, such as
``s3://bucket/results``, which several workers share). Any other storage block is refused
with a :class:`~prefect_journey.errors.ConfigurationError` before a paid attempt is
recorded.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import fsspec
from fsspec.implementations.local import LocalFileSystem as LocalFileSystemView
from prefect.filesystems import LocalFileSystem, RemoteFileSystem, WritableFileSystem
from prefect.results import get_default_result_storage
from pydantic import BaseModel, SecretStr

from prefect_journey import settings
from prefect_journey._compat import call_sync
from prefect_journey.cache import imagine_record_store, new_holder, release_if_held
from prefect_journey.errors import ConfigurationError
from prefect_journey.models import ImagineRequest

# One document per image, named after its cache key.
RECORDS_PREFIX = "journey-attempts-"
RECORDS_SUFFIX = ".json"
# The result storage as an fsspec filesystem, and the folder of the records in it.
Filesystem = tuple[fsspec.AbstractFileSystem, str]


class AttemptRecord(BaseModel):
    """One paid attempt, as recorded before it was sent: what a resumed run reads.

    Attributes:
        id: The attempt's id (a digest of its token, never the token).
        sent_at: When the request left (epoch seconds).
        deadline: Until when its delivery is waited for (epoch seconds): sent, plus the
            attempt's timeout, plus the recovery window.
        expires_at: When the record is dropped: after the provider's last delivery retry.
        answered: The provider answered 503 or 408 ("not now"): nothing should have been
            made, so its delivery is looked for but not waited for.
    """

    id: str
    sent_at: float
    deadline: float
    expires_at: float
    answered: Literal["", "unavailable"] = ""

    def expired(self, now: float) -> bool:
        """Whether nothing can be delivered for the attempt any more."""
        return now >= self.expires_at


@dataclass(frozen=True)
class Attempt:
    """One paid attempt: its record, and the webhook it sends (never recorded or logged)."""

    record: AttemptRecord
    webhook_url: str = field(repr=False)
    webhook_secret: SecretStr = field(repr=False)

    @property
    def id(self) -> str:
        """The attempt's id (a digest of its token)."""
        return self.record.id

    def request(self, request: ImagineRequest) -> ImagineRequest:
        """``request`` with this attempt's ``webhook_url`` and ``webhook_secret``.

        Args:
            request: The request, without a webhook (its cache key is computed from it).

        Returns:
            A copy to send.
        """
        return request.model_copy(
            update={"webhook_url": self.webhook_url, "webhook_secret": self.webhook_secret}
        )


def _name(key: str) -> str:
    return f"{RECORDS_PREFIX}{key}{RECORDS_SUFFIX}"


def _storage() -> WritableFileSystem:
    storage = imagine_record_store().result_storage
    if storage is None:
        storage = call_sync(get_default_result_storage)
    return storage


def check_records_storage() -> None:
    """Fail now, before any paid attempt, if the records could not be kept.

    Raises:
        ConfigurationError: The result storage is a block that cannot delete files.
    """
    _filesystem()


def check_shared_setup() -> None:
    """Fail now, before any paid call, if ``JOURNEY_REDIS_URL`` is set but the run cannot
    keep its promise: two machines pay once for an image only if they share its lock (Redis)
    and its records (the result storage). Does nothing without ``JOURNEY_REDIS_URL``.

    Raises:
        ConfigurationError: The result storage is local to this worker (Prefect's
            ``LocalFileSystem``, its default): another machine would not see the images
            this one paid for, and pay again. The message names the setting to change,
            ``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK``.
        RedisUnavailableError: The Redis does not answer.
    """
    url = settings.redis_url()
    if url is None:
        return
    storage = _storage()
    if isinstance(storage, LocalFileSystem):
        raise ConfigurationError(
            f"{settings.REDIS_URL.name} is set, so runs on several machines share their "
            f"image locks, but the result storage is local to this worker "
            f"({storage.basepath or '.'}): the cache and attempt records of the images it "
            "pays for would be invisible to the others, which would pay again. Save a "
            "RemoteFileSystem block on a shared bucket (such as s3://bucket/prefect-results) "
            "and name it in PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK (remote-file-system/<name>) "
            f"on every worker, or unset {settings.REDIS_URL.name} to run on one machine"
        )
    from prefect_journey import coordination

    coordination.check_reachable(url)


def _filesystem() -> Filesystem:
    """The result storage as an fsspec filesystem and the folder of the records."""
    storage = _storage()
    if isinstance(storage, LocalFileSystem):
        root = Path(storage.basepath or ".").expanduser().resolve()
        return fsspec.filesystem("file"), str(root)
    if isinstance(storage, RemoteFileSystem):
        return storage.filesystem, storage.basepath.rstrip("/")
    raise ConfigurationError(
        f"attempt records need a result storage that can delete files, not a "
        f"{type(storage).__name__} block: use LocalFileSystem, or RemoteFileSystem with an "
        "fsspec URL (such as s3://bucket/results) to share it between workers"
    )


def _read(where: Filesystem, key: str) -> list[AttemptRecord]:
    fs, root = where
    try:
        content = fs.cat_file(f"{root}/{_name(key)}")
    except FileNotFoundError:
        return []
    # An unreadable document is an error, not "none": taking it for none would let the next
    # write drop attempts still in flight.
    document = json.loads(content)
    return [AttemptRecord.model_validate(item) for item in document["attempts"]]


def _write(where: Filesystem, key: str, records: list[AttemptRecord]) -> None:
    fs, root = where
    path = f"{root}/{_name(key)}"
    if records:
        content = json.dumps({"attempts": [r.model_dump() for r in records]}).encode()
        fs.makedirs(root, exist_ok=True)
        if isinstance(fs, LocalFileSystemView):
            # Whole or not at all: a write cut short (a kill, a task timeout) would leave a
            # document nobody can read, and an unreadable one is never taken for none.
            temporary = f"{path}.{secrets.token_hex(8)}.tmp"
            fs.pipe_file(temporary, content)
            os.replace(temporary, path)
        else:  # an object store's put is whole or not at all
            fs.pipe_file(path, content)
    else:
        with contextlib.suppress(FileNotFoundError):  # no document: nothing was recorded
            fs.rm_file(path)


def recorded_attempts(key: str) -> list[AttemptRecord]:
    """The attempts recorded for the image of cache key ``key``, unsettled and unexpired.

    Expired records are deleted on the way (the caller holds the image's lock).

    Args:
        key: The image's cache key (the ``imagine`` task's).

    Returns:
        The records, oldest first; empty when there are none.

    Raises:
        Exception: The document exists and cannot be read (the filesystem's or JSON's
            error): an unreadable record is not taken for none.
    """
    where = _filesystem()
    records = _read(where, key)
    now = time.time()
    live = [record for record in records if not record.expired(now)]
    if len(live) < len(records):
        _write(where, key, live)
    return live


def save_attempts(key: str, records: Iterable[AttemptRecord]) -> None:
    """Replace the attempt records of ``key``'s image; none left deletes the document.

    The caller holds the image's lock (the task engine's, or a campaign item's), so
    reading and rewriting the document is safe.

    Args:
        key: The image's cache key.
        records: The attempts still to settle.
    """
    _write(_filesystem(), key, list(records))


def sweep_expired() -> int:
    """Delete the attempt documents whose every record has expired, each under its image's
    lock (a document whose lock is held is left to its holder).

    An expired record is otherwise removed only when a run reads it again: this clears those
    of images nobody asks for any more. The campaign flows call it at their end.

    Returns:
        The documents deleted.
    """
    fs, root = _filesystem()
    locks = imagine_record_store().lock_manager
    now, swept = time.time(), 0
    for name in records_left():
        key = name.removeprefix(RECORDS_PREFIX).removesuffix(RECORDS_SUFFIX)
        holder = new_holder()
        if locks is not None and not locks.acquire_lock(key, holder, acquire_timeout=0):
            continue
        try:
            if all(record.expired(now) for record in _read((fs, root), key)):
                fs.rm_file(f"{root}/{name}")
                swept += 1
        except (OSError, ValueError):  # gone meanwhile, or unreadable: left to its readers
            continue
        finally:
            release_if_held(locks, key, holder)
    return swept


def records_left() -> list[str]:
    """The names of the attempt documents in the result storage (a check for tests and
    operators: once every attempt of a campaign has settled, none is left).

    Returns:
        The documents' names.
    """
    fs, root = _filesystem()
    found: list[Any] = fs.glob(f"{root}/{RECORDS_PREFIX}*{RECORDS_SUFFIX}")
    return sorted(str(path).rsplit("/", 1)[-1] for path in found)
