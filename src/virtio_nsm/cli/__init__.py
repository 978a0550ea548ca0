"""The ``nsm`` command line.

Each command group lives in its own module and is registered on :data:`main`
below; the modules hold no device logic, only argument handling and output.
"""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="virtio-nsm", prog_name="nsm")
def main() -> None:
    """virtio NitroSecureModule: device, transports, client and verifier."""


# Command modules register themselves on `main` when imported.
from . import demo as _demo  # noqa: E402,F401
from . import device as _device  # noqa: E402,F401
from . import eif as _eif  # noqa: E402,F401
from . import enclave as _enclave  # noqa: E402,F401
from . import serve as _serve  # noqa: E402,F401
from . import state as _state  # noqa: E402,F401
from . import verify as _verify  # noqa: E402,F401
from . import vm as _vm  # noqa: E402,F401
from . import vsock as _vsock  # noqa: E402,F401
