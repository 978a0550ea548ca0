"""An NSM device with durable state: what ``nsm serve --state-dir`` runs.

:class:`DurableNsm` joins three things that know nothing of each other: the
sans-IO :class:`~virtio_nsm.nsm.device.NsmDevice`, the
:class:`~virtio_nsm.persist.StateStore` of a state directory (the device's
``commit`` hook: a state change is on disk before it is answered), and the
transport's per-request token (:mod:`virtio_nsm.vhost_user.inflight`).

Exactly once across a crash: a transport that resubmits a request after a
backend restart passes the same token as the first time.  If the store's record
of the last applied change carries that token and the same request bytes, the
change was applied (and made durable) by the backend that died; the recorded
response is returned and nothing is applied again.  Any other request, and any
request without a token, goes to the device.  Only the last change needs a
record: with inflight tracking the daemon publishes each answer as soon as it
is written, so at most one applied request can be left unanswered by a crash.

It also serves VHOST_USER_PROTOCOL_F_DEVICE_STATE (:meth:`save_state`,
:meth:`load_state`) with the signed snapshots of :mod:`virtio_nsm.persist`
(the format of ``nsm state export``). A load is accepted only if it is signed
with this device's CA root key, is at most :data:`MAX_SNAPSHOT_AGE` old, and is
a state this device could reach by itself (:func:`~virtio_nsm.persist.check_successor`):
a frontend without the key can neither forge nor alter a state, nor roll one back.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Final

from .nsm.device import Commit, DeviceState, NsmDevice
from .nsm.pki import CertificateAuthority
from .persist import Snapshot, StateError, StateStore, check_successor, sign_snapshot, verify_snapshot
from .request import RequestToken

__all__ = ["MAX_SNAPSHOT_AGE", "DurableNsm"]

log = logging.getLogger("virtio_nsm.durable")

#: A migrated state older than this (seconds, by the saver's clock) is refused: it
#: bounds how long a saved state can be replayed into another backend.
MAX_SNAPSHOT_AGE: Final = 600.0
#: Clock skew tolerated between the saving and the loading host (seconds).
MAX_CLOCK_SKEW: Final = 60.0


class DurableNsm:
    """A device whose state lives in ``store`` (or only in memory when ``store`` is None)."""

    def __init__(self, device: NsmDevice, store: StateStore | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.device = device
        self.store = store
        self.clock = clock
        #: Requests answered from the record instead of being applied again.
        self.replayed = 0
        #: Without a store: changes since the start (a store keeps its own sequence).
        self._changes = 0

    @classmethod
    def open(cls, directory: str | os.PathLike[str], *, durable: bool = True,
             ca: CertificateAuthority | None = None, initial: DeviceState | None = None) -> DurableNsm:
        """Lock and load a state directory (initialised if new); raises ``StateError``.

        ``ca``: the root to sign with. A new directory keeps a copy of it; an
        existing one must already hold that same root (else ``StateError``:
        documents would suddenly chain to another root). ``initial``: the boot
        state of a new directory (default: a fresh debug-style boot state).
        """
        store = StateStore.open(directory, durable=durable, ca=ca, initial=initial)
        if ca is not None and store.ca.certificate_der != ca.certificate_der:
            store.close()
            raise StateError(f"{store.directory} holds a different CA than the one given; "
                             "refusing to switch roots (use a new state directory)")
        try:
            device = NsmDevice(state=store.state, ca=store.ca, commit=store.commit)
        except BaseException:
            store.close()
            raise
        return cls(device, store)

    @classmethod
    def ephemeral(cls, ca: CertificateAuthority | None = None,
                  initial: DeviceState | None = None) -> DurableNsm:
        """A fresh in-memory device (booted in ``initial``): its PCRs and locks die with the process."""
        nsm = cls(NsmDevice(ca=ca) if initial is None else NsmDevice(state=initial, ca=ca))
        nsm.device = NsmDevice(state=nsm.device.state, ca=nsm.device.ca, commit=nsm._count)
        return nsm

    def _count(self, change: Commit) -> None:
        self._changes += 1

    def __repr__(self) -> str:
        where = self.store.directory if self.store is not None else "memory"
        return f"<DurableNsm {self.device.state.module_id} in {where}>"

    def handle(self, request: bytes, token: RequestToken | None = None, *,
               max_response: int | None = None) -> bytes:
        """Answer one request; a resubmitted, already applied one from the record.

        ``max_response``: the response buffer's size, see :meth:`NsmDevice.handle`
        (a change whose answer would not fit is not applied).
        """
        if self.store is not None and token is not None:
            recorded = self.store.replay(request, token)
            if recorded is not None:
                self.replayed += 1
                log.warning("request %s was applied before a restart: answered from the record", token)
                return recorded
        return self.device.handle(request, token, max_response=max_response)

    # -- VHOST_USER_PROTOCOL_F_DEVICE_STATE ------------------------------------------

    def _snapshot(self) -> Snapshot:
        if self.store is not None:
            return self.store.snapshot
        return Snapshot(self.device.state, self._changes)

    def save_state(self) -> bytes:
        """The current state, signed with this device's CA root key."""
        return sign_snapshot(self._snapshot(), self.device.ca, self.clock())

    def load_state(self, data: bytes) -> None:
        """Adopt a migrated state (durably first, with a store); raises ``StateError``.

        Nothing changes unless the snapshot verifies against this device's CA,
        is fresh, and is a state this device could reach (see the module docstring).
        """
        source = "migrated device state"
        signed = verify_snapshot(data, self.device.ca.certificate, source)
        age = self.clock() - signed.saved_at
        if age > MAX_SNAPSHOT_AGE:
            raise StateError(f"{source}: saved {age:.0f} s ago, more than {MAX_SNAPSHOT_AGE:.0f} s; "
                             "refusing to load it")
        if age < -MAX_CLOCK_SKEW:
            raise StateError(f"{source}: saved {-age:.0f} s in the future; refusing to load it")
        snapshot = signed.snapshot
        check_successor(self._snapshot(), snapshot, source)
        # Documents keep chaining to this backend's own CA (the one that verified the state).
        commit = self.store.commit if self.store is not None else self._count
        device = NsmDevice(state=snapshot.state, ca=self.device.ca, commit=commit)
        if self.store is not None:
            self.store.install(snapshot, source)  # durable before the device answers from it
        else:
            self._changes = max(self._changes, snapshot.seq) + 1
        self.device = device
        log.info("device state of %s loaded", snapshot.state.module_id)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
