"""virtio-vsock constants (virtio 1.x, 5.10; Linux ``uapi/linux/virtio_vsock.h``, ``vm_sockets.h``).

Names follow the specification and Linux verbatim.
"""

from __future__ import annotations

from typing import Final

#: virtio device ID of a socket device.
VIRTIO_ID_VSOCK: Final = 19

# --- Queues -----------------------------------------------------------------------
RX_QUEUE: Final = 0
TX_QUEUE: Final = 1
EVENT_QUEUE: Final = 2
NUM_QUEUES: Final = 3

# --- Feature bits (bit numbers) ---------------------------------------------------------
VIRTIO_VSOCK_F_STREAM: Final = 0
VIRTIO_VSOCK_F_SEQPACKET: Final = 1

# --- Config space: ``struct virtio_vsock_config { le64 guest_cid; }`` --------------------
CONFIG_SIZE: Final = 8

# --- Addresses --------------------------------------------------------------------------
VMADDR_CID_HYPERVISOR: Final = 0
VMADDR_CID_LOCAL: Final = 1
VMADDR_CID_HOST: Final = 2
#: The parent instance's address as an AWS Nitro enclave sees it.
NITRO_PARENT_CID: Final = 3
#: ``VMADDR_CID_ANY`` / ``VMADDR_PORT_ANY`` (-1U): never a valid peer address.
VMADDR_CID_ANY: Final = 0xFFFFFFFF
VMADDR_PORT_ANY: Final = 0xFFFFFFFF

# --- Packet header ------------------------------------------------------------------------
#: ``struct virtio_vsock_hdr``: le64 src_cid, dst_cid; le32 src_port, dst_port, len;
#: le16 type, op; le32 flags, buf_alloc, fwd_cnt.
HEADER_SIZE: Final = 44

VIRTIO_VSOCK_TYPE_STREAM: Final = 1
VIRTIO_VSOCK_TYPE_SEQPACKET: Final = 2

VIRTIO_VSOCK_OP_INVALID: Final = 0
VIRTIO_VSOCK_OP_REQUEST: Final = 1
VIRTIO_VSOCK_OP_RESPONSE: Final = 2
VIRTIO_VSOCK_OP_RST: Final = 3
VIRTIO_VSOCK_OP_SHUTDOWN: Final = 4
VIRTIO_VSOCK_OP_RW: Final = 5
VIRTIO_VSOCK_OP_CREDIT_UPDATE: Final = 6
VIRTIO_VSOCK_OP_CREDIT_REQUEST: Final = 7

#: SHUTDOWN flags: the sender will receive no more / send no more.
VIRTIO_VSOCK_SHUTDOWN_RCV: Final = 1
VIRTIO_VSOCK_SHUTDOWN_SEND: Final = 2
VIRTIO_VSOCK_SHUTDOWN_MASK: Final = VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND

#: The largest payload Linux puts in one packet (``VIRTIO_VSOCK_MAX_PKT_BUF_SIZE``).
MAX_PKT_PAYLOAD: Final = 64 * 1024
#: Linux's default socket buffer (``VIRTIO_VSOCK_DEFAULT_BUF_SIZE``): the credit it grants.
DEFAULT_BUF_SIZE: Final = 256 * 1024

# --- Event queue: ``struct virtio_vsock_event { le32 id; }`` --------------------------------
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: Final = 0
EVENT_SIZE: Final = 4

#: Counters in headers (``buf_alloc``, ``fwd_cnt``) are 32-bit and wrap.
U32_MASK: Final = 0xFFFFFFFF
