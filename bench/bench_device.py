"""Benchmark: NsmDevice.handle() beside the library calls it cannot avoid.

Run: python bench/bench_device.py  (after `pip install .`)
"""

from __future__ import annotations

import hashlib
import os
import sys
from importlib import metadata

import cbor2
from _harness import compare
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from virtio_nsm import NsmDevice
from virtio_nsm.nsm import protocol as p


def main() -> int:
    device = NsmDevice()
    print(f"python {sys.version.split()[0]}, cbor2 {metadata.version('cbor2')}, "
          f"cryptography {metadata.version('cryptography')}")

    req = p.encode_request(p.DescribePCR(16))
    value = bytes(48)
    describe_obj = {"DescribePCR": {"lock": False, "data": value}}
    r1 = compare("DescribePCR", lambda: device.handle(req),
                 lambda: cbor2.dumps(describe_obj) if cbor2.loads(req) else None,
                 "raw cbor2 decode+encode", target=0.30)

    ext = p.encode_request(p.ExtendPCR(17, b"\x01" * 32))

    def raw_extend() -> bytes:
        cbor2.loads(ext)
        return cbor2.dumps({"ExtendPCR": {"data": hashlib.sha384(value + b"\x01" * 32).digest()}})

    r3 = compare("ExtendPCR", lambda: device.handle(ext), raw_extend, "raw cbor2 + hashlib",
                 target=0.60)

    rnd = p.encode_request(p.GetRandom())
    compare("GetRandom", lambda: device.handle(rnd),
            lambda: cbor2.dumps({"GetRandom": {"random": os.urandom(256)}}) if cbor2.loads(rnd) else None,
            "raw cbor2 + os.urandom(256)")

    att = p.encode_request(p.Attestation(nonce=b"n" * 32, user_data=b"u" * 64))
    key = ec.generate_private_key(ec.SECP384R1())
    sample = cbor2.loads(cbor2.loads(cbor2.loads(device.handle(att))["Attestation"]["document"])[2])

    def raw_attestation() -> bytes:
        payload = cbor2.dumps(sample)
        sig = key.sign(cbor2.dumps(["Signature1", b"\xa1\x01\x38\x22", b"", payload]),
                       ec.ECDSA(hashes.SHA384()))
        return cbor2.dumps([b"\xa1\x01\x38\x22", {}, payload, sig])

    r2 = compare("Attestation", lambda: device.handle(att), raw_attestation,
                 "raw ES384 sign + cbor2 encode", target=0.85)
    return 0 if r1 >= 0.30 and r2 >= 0.85 and r3 >= 0.60 else 1


if __name__ == "__main__":
    sys.exit(main())
