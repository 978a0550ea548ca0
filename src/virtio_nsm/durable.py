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
:meth:`load_state`) with the versioned, checksummed snapshot format of
:mod:`virtio_nsm.persist`, the same bytes as ``nsm state export``.
"""

from __future__ import annotations

import logging
import os

from .nsm.device import NsmDevice
from .nsm.pki import CertificateAuthority
from .persist import Snapshot, StateError, StateStore, decode_snapshot, encode_snapshot

__all__ = ["DurableNsm"]

log = logging.getLogger("virtio_nsm.durable")


class DurableNsm:
    """A device whose state lives in ``store`` (or only in memory when ``store`` is None)."""

    def __init__(self, device: NsmDevice, store: StateStore | None = None) -> None:
        self.device = device
        self.store = store
        #: Requests answered from the record instead of being applied again.
        self.replayed = 0

    @classmethod
    def open(cls, directory: str | os.PathLike[str], *, durable: bool = True,
             ca: CertificateAuthority | None = None) -> DurableNsm:
        """Lock and load a state directory (initialised if new); raises ``StateError``.

        ``ca``: the root to sign with. A new directory keeps a copy of it; an
        existing one must already hold that same root (else ``StateError``:
        documents would suddenly chain to another root).
        """
        store = StateStore.open(directory, durable=durable, ca=ca)
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
    def ephemeral(cls, ca: CertificateAuthority | None = None) -> DurableNsm:
        """A fresh in-memory device: its PCRs and locks die with the process."""
        return cls(NsmDevice(ca=ca))

    def __repr__(self) -> str:
        where = self.store.directory if self.store is not None else "memory"
        return f"<DurableNsm {self.device.state.module_id} in {where}>"

    def handle(self, request: bytes, token: object = None, *,
               max_response: int | None = None) -> bytes:
        """Answer one request; a resubmitted, already applied one from the record.

        ``max_response``: the response buffer's size, see :meth:`NsmDevice.handle`
        (a change whose answer would not fit is not applied).
        """
        if self.store is not None and isinstance(token, tuple):
            recorded = self.store.replay(request, token)
            if recorded is not None:
                self.replayed += 1
                log.warning("request %s was applied before a restart: answered from the record", token)
                return recorded
        return self.device.handle(request, token, max_response=max_response)

    # -- VHOST_USER_PROTOCOL_F_DEVICE_STATE ------------------------------------------

    def save_state(self) -> bytes:
        if self.store is not None:
            return encode_snapshot(self.store.snapshot)
        return encode_snapshot(Snapshot(self.device.state, 0))

    def load_state(self, data: bytes) -> None:
        """Adopt a migrated state (durably first, with a store); raises ``StateError``."""
        snapshot = decode_snapshot(data, "migrated device state")
        commit = None
        if self.store is not None:
            self.store.install(snapshot)
            commit = self.store.commit
        # Documents keep chaining to this backend's own CA (copy ca/ to keep the root).
        self.device = NsmDevice(state=snapshot.state, ca=self.device.ca, commit=commit)
        log.info("device state of %s loaded", snapshot.state.module_id)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
