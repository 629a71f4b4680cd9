"""Which test holds a worker's carried lease, in memory the worker and the broker share.

A worker that hands its lease on to its next test must tell the broker the new test id (for
``gpushare status``), but a message per test costs a system call and wakes the broker's thread
for nothing it has to decide. So the worker writes the id into a small shared memory file (a
``memfd``, passed to the broker once with :class:`~pytest_gpushare.broker.protocol.Slot`), and
the broker reads it every :data:`~pytest_gpushare.broker.engine.PUBLISH_S` while the worker
holds a lease, before it writes the session's running file. No system call on either side.

Layout: an 8-byte sequence number, a 4-byte length, then that many bytes of a JSON array
``[lease_id, test_id, taken_at]``. The writer makes the sequence odd, writes, then makes it even
again; a reader that sees an odd sequence, or a different one after reading, reads again later
(a seqlock: one writer, the worker's main thread).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct

__all__ = ["SLOT_BYTES", "SlotReader", "SlotWriter"]

SLOT_BYTES = 16384
_HEAD = struct.Struct("=QI")
#: JSON's quoted string, from the C encoder json itself uses (a JSONEncoder builds its encoder
#: anew for every call).
_quoted = json.encoder.encode_basestring_ascii


class SlotWriter:
    """The worker's side: :meth:`write` the test that holds the carried lease now."""

    def __init__(self) -> None:
        fd = os.memfd_create("gpushare-carried", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, SLOT_BYTES)
            self._map = mmap.mmap(fd, SLOT_BYTES)
        except BaseException:
            os.close(fd)
            raise
        self.fd: int | None = fd  # to pass to the broker, then close
        self._seq = 0

    def write(self, lease_id: str, test_id: str, taken_at: float) -> bool:
        """Record the carried lease's new holder; False when it does not fit (send it instead)."""
        data = f"[{_quoted(lease_id)},{_quoted(test_id)},{float(taken_at)!r}]".encode()
        if _HEAD.size + len(data) > SLOT_BYTES:
            return False
        _HEAD.pack_into(self._map, 0, self._seq + 1, 0)
        self._map[_HEAD.size : _HEAD.size + len(data)] = data
        self._seq += 2
        _HEAD.pack_into(self._map, 0, self._seq, len(data))
        return True

    def close_fd(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class SlotReader:
    """The broker's side: what the worker wrote last, once per write."""

    def __init__(self, fd: int) -> None:
        try:
            if os.fstat(fd).st_size < SLOT_BYTES:
                raise OSError("a slot smaller than a slot")
            self._map = mmap.mmap(fd, SLOT_BYTES, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self._seen = 0

    def read(self) -> tuple[str, str, float] | None:
        """``(lease_id, test_id, taken_at)`` written since the last call, or None."""
        seq, size = _HEAD.unpack_from(self._map)
        if seq == self._seen or seq % 2 or size > SLOT_BYTES - _HEAD.size:
            return None
        data = self._map[_HEAD.size : _HEAD.size + size]
        if _HEAD.unpack_from(self._map)[0] != seq:
            return None  # written meanwhile: the next read sees it
        self._seen = seq
        try:
            lease_id, test_id, taken_at = json.loads(data)
        except (ValueError, TypeError):
            return None
        if not (type(lease_id) is str and type(test_id) is str and type(taken_at) in (int, float)):
            return None
        return lease_id, test_id, float(taken_at)

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self._map.close()
