"""Measuring an enclave image: our reader beside the raw SHA-384 passes it needs.

    PYTHONPATH=src python bench/bench_eif.py [--size-mib 256] [--rounds 5] [--dir DIR]

Generates an image of about ``--size-mib`` MiB in a temporary directory (a
12 MiB kernel, a 4 MiB bootstrap ramdisk and one application ramdisk for the
rest, like an image nitro-cli builds), then in alternating rounds (medians):

* ``read_eif``: the whole check -- layout, CRC32 of every byte, PCR0/1/2 --
  reading the file in 1 MiB chunks;
* the raw SHA-384 passes the formulas need over the same bytes, hashed straight
  from a memory map (no reads, no copies, no CRC): every byte goes into PCR0
  and into PCR1 (kernel, cmdline, first ramdisk) or PCR2 (the other ramdisks),
  so two passes over everything;
* for reference, the lighter count "kernel, cmdline and first ramdisk twice,
  the rest once" (one pass short of what PCR2 needs: no reader can reach it).

Then peak RSS of ``read_eif`` in a fresh process for a 1/8-size image and the
full one: flat means the reader's memory does not grow with the image.

Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from virtio_nsm.eif import SectionType, build_eif, read_eif

MiB = 1 << 20


def _random_file(path: Path, size: int) -> Path:
    with path.open("wb") as fh:
        left = size
        while left:
            n = min(left, 4 * MiB)
            fh.write(os.urandom(n))
            left -= n
    return path


def make_image(directory: Path, size_mib: int) -> Path:
    kernel = _random_file(directory / "bzImage", 12 * MiB)
    boot = _random_file(directory / "bootstrap.cpio", 4 * MiB)
    app = _random_file(directory / "app.cpio", max(size_mib - 16, 1) * MiB)
    output = directory / f"bench-{size_mib}.eif"
    build_eif(output, kernel=kernel, cmdline="reboot=k panic=30 pci=off nomodules console=ttyS0",
              ramdisks=[boot, app], metadata=None)
    for path in (kernel, boot, app):
        path.unlink()
    return output


def raw_passes(path: Path, lighter: bool = False) -> None:
    image = read_eif(path)  # offsets only; timed separately below
    measured = [s for s in image.sections if s.type in (SectionType.KERNEL, SectionType.CMDLINE,
                                                        SectionType.RAMDISK)]
    _raw(path, [(s.offset + 12, s.size, s.type) for s in measured], lighter)


def _raw(path: Path, spans: list[tuple[int, int, SectionType]], lighter: bool) -> float:
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        start = time.perf_counter()
        image, boot, app = hashlib.sha384(), hashlib.sha384(), hashlib.sha384()
        ramdisks = 0
        for offset, size, kind in spans:
            data = view[offset:offset + size]
            image.update(data)
            first = kind is not SectionType.RAMDISK or ramdisks == 0
            if kind is SectionType.RAMDISK:
                ramdisks += 1
            if first:
                boot.update(data)
            elif not lighter:
                app.update(data)
        image.digest(), boot.digest(), app.digest()
        elapsed = time.perf_counter() - start
        del data, view
    return elapsed


def _timed_read(path: Path, parallel: bool) -> float:
    start = time.perf_counter()
    read_eif(path, parallel=parallel)
    return time.perf_counter() - start


def peak_rss_kib(path: Path) -> int:
    # VmHWM of the fresh process (ru_maxrss would carry over this process's mmap across exec)
    code = ("import sys; from virtio_nsm.eif import read_eif; read_eif(sys.argv[1]); "
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    out = subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return int(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = Path(tmp)
        path = make_image(directory, args.size_mib)
        size = path.stat().st_size
        image = read_eif(path)
        spans = [(s.offset + 12, s.size, s.type) for s in image.sections]
        measured = sum(s.size for s in image.sections)
        ours, single, formula, lighter = [], [], [], []
        for _ in range(args.rounds):
            ours.append(_timed_read(path, parallel=True))
            formula.append(_raw(path, spans, lighter=False))
            single.append(_timed_read(path, parallel=False))
            lighter.append(_raw(path, spans, lighter=True))
        o, s1, f, li = (statistics.median(x) for x in (ours, single, formula, lighter))
        print(f"image {size / MiB:.1f} MiB ({measured / MiB:.1f} MiB of section data), "
              f"{args.rounds} alternating rounds, medians; Python {sys.version.split()[0]}, "
              f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
        print(f"  read_eif (layout + CRC32 + PCR0/1/2, 1 MiB reads)  {o * 1000:8.1f} ms  "
              f"{size / MiB / o:7.1f} MiB/s   (hashes on two threads, the default for this size)")
        print(f"  read_eif, one thread                                {s1 * 1000:8.1f} ms  "
              f"{size / MiB / s1:7.1f} MiB/s   ratio to raw passes {f / s1:6.1%}")
        print(f"  raw SHA-384, the formulas' passes (2x every byte)   {f * 1000:8.1f} ms  "
              f"{size / MiB / f:7.1f} MiB/s   ratio {f / o:6.1%}  target >= 90%: "
              f"{'met' if f / o >= 0.9 else 'NOT met'}")
        print(f"  raw SHA-384, 'first three twice, the rest once'     {li * 1000:8.1f} ms  "
              f"{size / MiB / li:7.1f} MiB/s   ratio {li / o:6.1%}  (one PCR2 pass short)")
        small = make_image(directory, max(args.size_mib // 8, 17))
        small_rss, big_rss = peak_rss_kib(small), peak_rss_kib(path)
        print(f"  peak RSS (VmHWM) of read_eif in a fresh process: {small.stat().st_size / MiB:.0f} MiB "
              f"image {small_rss / 1024:.1f} MiB, {size / MiB:.0f} MiB image {big_rss / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
