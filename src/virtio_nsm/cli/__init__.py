"""The ``nsm`` command line.

Each command group lives in its own module and is registered on :data:`main`
below; the modules hold no device logic, only argument handling and output.
"""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="virtio-nsm", prog_name="nsm")
@click.option("--device", "device", default=None, metavar="DEV",
              help="Device for the device commands (describe, pcr, random, attest), as their "
              "own --device: a /dev/nsm path, vhost-user:SOCKET or local.")
@click.pass_context
def main(ctx: click.Context, device: str | None) -> None:
    """virtio NitroSecureModule: device, transports, client and verifier."""
    if device is not None:
        from .device import _GROUP_DEVICE, DEVICE_COMMANDS

        if ctx.invoked_subcommand not in DEVICE_COMMANDS:
            raise click.UsageError(
                f"`nsm --device` applies to {', '.join(sorted(DEVICE_COMMANDS))}, "
                f"not to `{ctx.invoked_subcommand}`")
        ctx.meta[_GROUP_DEVICE] = device


# Command modules register themselves on `main` when imported.
from . import cuse as _cuse  # noqa: E402,F401
from . import demo as _demo  # noqa: E402,F401
from . import device as _device  # noqa: E402,F401
from . import eif as _eif  # noqa: E402,F401
from . import enclave as _enclave  # noqa: E402,F401
from . import serve as _serve  # noqa: E402,F401
from . import state as _state  # noqa: E402,F401
from . import verify as _verify  # noqa: E402,F401
from . import vm as _vm  # noqa: E402,F401
from . import vsock as _vsock  # noqa: E402,F401
