"""Constants from the virtio 1.x specification that this package relies on.

Names follow the specification (and Linux's ``uapi/linux/virtio_*.h``) verbatim.
"""

from __future__ import annotations

from typing import Final

# --- Device IDs ---------------------------------------------------------------
VIRTIO_ID_NSM: Final = 33

# --- Device status field (virtio 1.x, 2.1) --------------------------------------
VIRTIO_CONFIG_S_ACKNOWLEDGE: Final = 1
VIRTIO_CONFIG_S_DRIVER: Final = 2
VIRTIO_CONFIG_S_DRIVER_OK: Final = 4
VIRTIO_CONFIG_S_FEATURES_OK: Final = 8
VIRTIO_CONFIG_S_NEEDS_RESET: Final = 0x40
VIRTIO_CONFIG_S_FAILED: Final = 0x80

# --- Feature bits (bit numbers) -----------------------------------------------------
VIRTIO_F_NOTIFY_ON_EMPTY: Final = 24
VIRTIO_F_ANY_LAYOUT: Final = 27
VIRTIO_RING_F_INDIRECT_DESC: Final = 28
VIRTIO_RING_F_EVENT_IDX: Final = 29
VIRTIO_F_VERSION_1: Final = 32
VIRTIO_F_ACCESS_PLATFORM: Final = 33
VIRTIO_F_RING_PACKED: Final = 34
VIRTIO_F_IN_ORDER: Final = 35

# --- Split virtqueue layout (virtio 1.x, 2.7) -------------------------------------
VIRTQ_DESC_F_NEXT: Final = 1
VIRTQ_DESC_F_WRITE: Final = 2
VIRTQ_DESC_F_INDIRECT: Final = 4

VIRTQ_AVAIL_F_NO_INTERRUPT: Final = 1
VIRTQ_USED_F_NO_NOTIFY: Final = 1

#: ``struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }``
VIRTQ_DESC_SIZE: Final = 16
#: ``struct virtq_used_elem { le32 id; le32 len; }``
VIRTQ_USED_ELEM_SIZE: Final = 8
#: Maximum queue size for a split virtqueue.
VIRTQ_MAX_SIZE: Final = 32768

#: Required alignment of the three areas (virtio 1.x, 2.7 table "Virtqueue Part Alignment").
VIRTQ_DESC_ALIGN: Final = 16
VIRTQ_AVAIL_ALIGN: Final = 2
VIRTQ_USED_ALIGN: Final = 4


def desc_table_size(queue_size: int) -> int:
    """Bytes occupied by the descriptor table."""
    return VIRTQ_DESC_SIZE * queue_size


def avail_ring_size(queue_size: int) -> int:
    """Bytes of ``struct virtq_avail`` including ``used_event``."""
    return 4 + 2 * queue_size + 2


def used_ring_size(queue_size: int) -> int:
    """Bytes of ``struct virtq_used`` including ``avail_event``."""
    return 4 + VIRTQ_USED_ELEM_SIZE * queue_size + 2


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """The EVENT_IDX test: has the index moved past ``event_idx`` since ``old_idx``?

    All arithmetic is modulo 2**16, as in the specification.
    """
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)
