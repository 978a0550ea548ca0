"""The metadata section: JSON exactly as AWS's builder writes it.

AWS's builder serialises an ``EifIdentityInfo`` with ``serde_json::to_vec``:
compact, fields in declaration order (``ImageName``, ``ImageVersion``,
``BuildMetadata`` {``BuildTime``, ``BuildTool``, ``BuildToolVersion``,
``OperatingSystem``, ``KernelVersion``}, ``DockerInfo``, ``CustomMetadata``),
and the free-form values (``DockerInfo``, ``CustomMetadata``) as
``serde_json::Value``, whose objects keep their keys sorted. :func:`dumps`
writes any JSON value the way serde_json does (sorted keys, its escapes, its
float format), so the same inputs give the same bytes.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass
from typing import Any, Final

from .format import EifError

#: nitro-cli refuses custom metadata files larger than this.
MAX_CUSTOM_METADATA: Final = 4096
#: Largest metadata section read.
MAX_METADATA_SECTION: Final = 1 << 20

_ESCAPES: Final = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
                   "\t": "\\t"}


def _string(text: str) -> str:
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch < " ":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _float(value: float) -> str:
    # ryu's format (serde_json): shortest round-trip digits; plain notation for
    # decimal exponents -5 < e <= 16 (counted as the decimal point's position),
    # scientific "1e20" / "1.5e-7" otherwise; integral values keep ".0".
    if not math.isfinite(value):
        raise ValueError("JSON has no NaN or infinity")
    sign = "-" if math.copysign(1.0, value) < 0 else ""
    if value == 0:
        return sign + "0.0"
    mantissa, _, exponent = repr(abs(value)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    shift = int(exponent) if exponent else 0
    # 0.000ddd: the point is before the fraction's leading zeros
    leading = len(fraction) - len(fraction.lstrip("0"))
    point = shift - leading if whole == "0" else shift + len(whole)
    digits = (whole + fraction).lstrip("0").rstrip("0") or "0"
    if 0 < point <= 16 and len(digits) <= point:
        return sign + digits + "0" * (point - len(digits)) + ".0"
    if 0 < point <= 16:
        return sign + digits[:point] + "." + digits[point:]
    if -5 < point <= 0:
        return sign + "0." + "0" * -point + digits
    exp = point - 1
    body = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{sign}{body}e{exp}"


def dumps(value: Any) -> str:
    """``serde_json::to_string`` of the ``serde_json::Value`` equal to ``value``."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        if -(1 << 63) <= value < (1 << 64):
            return str(value)
        return _float(float(value))  # serde_json parses larger integers as f64
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, str):
        value.encode("utf-8")  # lone surrogates cannot be written (serde_json refuses them)
        return _string(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    if isinstance(value, dict):
        items = sorted((str(k), v) for k, v in value.items())
        return "{" + ",".join(f"{_string(k)}:{dumps(v)}" for k, v in items) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def rfc3339(when: dt.datetime) -> str:
    """chrono's ``to_rfc3339`` of a UTC time: fraction in 0, 3, 6 digits."""
    when = when.astimezone(dt.UTC)
    text = when.strftime("%Y-%m-%dT%H:%M:%S")
    if when.microsecond:
        fraction = f"{when.microsecond:06d}"
        text += "." + (fraction[:3] if when.microsecond % 1000 == 0 else fraction)
    return text + "+00:00"


@dataclass(frozen=True)
class Identity:
    """What the builder puts in the metadata section."""

    image_name: str
    image_version: str = "1.0"
    build_time: str = ""
    build_tool: str = "virtio-nsm"
    build_tool_version: str = ""
    operating_system: str = "OS"
    kernel_version: str = "kernel"
    docker_info: Any = None
    custom_metadata: Any = None

    def to_json(self) -> bytes:
        build = (
            f'{{"BuildTime":{_string(self.build_time)},"BuildTool":{_string(self.build_tool)},'
            f'"BuildToolVersion":{_string(self.build_tool_version)},'
            f'"OperatingSystem":{_string(self.operating_system)},'
            f'"KernelVersion":{_string(self.kernel_version)}}}'
        )
        text = (
            f'{{"ImageName":{_string(self.image_name)},"ImageVersion":{_string(self.image_version)},'
            f'"BuildMetadata":{build},"DockerInfo":{dumps(self.docker_info)},'
            f'"CustomMetadata":{dumps(self.custom_metadata)}}}'
        )
        return text.encode("utf-8")


def kernel_config_identity(config: str) -> tuple[str, str]:
    """(OperatingSystem, KernelVersion) from a kernel ``.config`` as nitro-cli reads it.

    nitro-cli takes the third line, ``# Linux/x86_64 6.1.0 Kernel Configuration``,
    splits it at spaces, slashes and dashes and keeps words 1 and 3.
    """
    lines = config.splitlines()
    if len(lines) < 3:
        raise ValueError("the kernel config has fewer than 3 lines")
    words = lines[2].replace("/", " ").replace("-", " ").split(" ")
    return (words[1] if len(words) > 1 else "Unknown", words[3] if len(words) > 3 else "Unknown")


#: serde_json's recursion limit: deeper documents do not parse in AWS's tools.
MAX_DEPTH: Final = 128


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _depth(value: Any) -> int:
    depth, level = 0, [value]
    while level:
        depth += 1
        nested: list[Any] = []
        for item in level:
            if isinstance(item, dict):
                nested.extend(item.values())
            elif isinstance(item, list):
                nested.extend(item)
        level = [v for v in nested if isinstance(v, dict | list)]
        if not level:
            return depth if isinstance(value, dict | list) else 0
    return depth


def loads(text: bytes, what: str) -> Any:
    """Strict JSON (UTF-8, no NaN/Infinity, at most 128 levels deep, as serde_json)."""
    try:
        value = json.loads(text.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{what} is not JSON: {exc}") from None
    if _depth(value) > MAX_DEPTH:
        raise ValueError(f"{what} nests deeper than {MAX_DEPTH} levels")
    return value


def parse_custom_metadata(data: bytes) -> Any:
    """A ``--metadata`` file: JSON, at most 4096 bytes (nitro-cli's limit)."""
    if len(data) > MAX_CUSTOM_METADATA:
        raise ValueError(f"metadata file is {len(data)} bytes, the limit is {MAX_CUSTOM_METADATA}")
    return loads(data, "metadata file")


def parse_metadata_section(data: bytes) -> dict[str, Any]:
    """The metadata section as a JSON object; :class:`EifError` if it is not one."""
    if len(data) > MAX_METADATA_SECTION:
        raise EifError(f"metadata section of {len(data)} bytes is larger than the "
                       f"{MAX_METADATA_SECTION}-byte limit")
    try:
        value = loads(data, "metadata section")
    except ValueError as exc:
        raise EifError(str(exc)) from None
    if not isinstance(value, dict):
        raise EifError("metadata section is not a JSON object")
    return value


def describe_metadata(metadata: dict[str, Any]) -> tuple[str | None, str | None, dict[str, Any] | None]:
    """(ImageName, ImageVersion, Metadata) as ``nitro-cli describe-eif`` shows them.

    Fields that are missing or of the wrong type are left out rather than
    refused: the PCRs do not cover this section, it is informational.
    """
    name = metadata.get("ImageName")
    version = metadata.get("ImageVersion")
    build = metadata.get("BuildMetadata")
    described: dict[str, Any] | None = None
    if isinstance(build, dict):
        described = {key: build[key] for key in ("BuildTime", "BuildTool", "BuildToolVersion",
                                                   "OperatingSystem", "KernelVersion") if key in build}
        described["DockerInfo"] = metadata.get("DockerInfo")
        custom = metadata.get("CustomMetadata")
        if isinstance(custom, dict):
            described.update(custom)  # nitro-cli flattens the custom object into Metadata
    return (name if isinstance(name, str) else None,
            version if isinstance(version, str) else None, described)
