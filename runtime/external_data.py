"""The external-data files an ONNX graph names, read off its protobuf, so that a reader that follows them wherever
they point (OpenVINO's) is given only graphs whose weights lie inside the bundle folder.

Hand-written rather than `onnx.load`: the runtime does not depend on the onnx package, and this reads only the few
fields that can hold a tensor (initializers, sparse initializers, node attributes, subgraphs, functions), skipping
every tensor's bytes without copying them.
"""

from __future__ import annotations

import mmap
from pathlib import Path

from .errors import BundleError

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

# message -> {field number: the message that field holds}; every other field is skipped (onnx.proto3's numbers)
_MESSAGES = {
    "model": {7: "graph", 25: "function"},
    "function": {7: "node"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
    "entry": {},
}
_MAX_DEPTH = 64  # subgraphs in subgraphs: deeper than any real graph, shallow enough for Python's stack


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf, start: int, end: int):
    """(field number, start, end) of each length-delimited field in buf[start:end]; other wire types are skipped."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, pos = _varint(buf, pos)
        elif wire == _I64:
            pos += 8
        elif wire == _I32:
            pos += 4
        elif wire == _LEN:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise ValueError("field runs past its message")
            yield number, pos, pos + size
            pos += size
        else:
            raise ValueError(f"wire type {wire}")
        if pos > end:
            raise ValueError("field runs past its message")


def _locations(buf, start: int, end: int, message: str, depth: int, found: list[str]) -> None:
    if depth > _MAX_DEPTH:
        raise ValueError("graphs nested too deep")
    if message == "entry":  # StringStringEntryProto: key = 1, value = 2; the "location" entry names the file
        parts = {n: bytes(buf[s:e]) for n, s, e in _fields(buf, start, end) if n in (1, 2)}
        if parts.get(1) == b"location":
            found.append(parts.get(2, b"").decode("utf-8", "replace"))
        return
    children = _MESSAGES[message]
    for number, s, e in _fields(buf, start, end):
        if number in children:
            _locations(buf, s, e, children[number], depth + 1, found)


def external_locations(path: Path) -> list[str]:
    """Every external-data location the ONNX graph at `path` names (as written: relative to the graph's folder)."""
    found: list[str] = []
    with open(path, "rb") as fh:
        if Path(path).stat().st_size == 0:
            raise ValueError("empty file")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf, memoryview(buf) as view:
            _locations(view, 0, len(view), "model", 0, found)
    return found


def check_external_data(graph: Path, bundle_path) -> None:
    """Every external-data file `graph` names must be a relative path that stays inside the bundle folder."""
    root = Path(bundle_path).resolve()
    try:
        locations = external_locations(graph)
    except ValueError as exc:
        raise BundleError("graph_unreadable", path=bundle_path, file=Path(graph).name, detail=str(exc)) from None
    for location in sorted(set(locations)):
        rel = Path(location)
        if not location or rel.is_absolute() or ".." in rel.parts:
            raise BundleError("file_outside", path=bundle_path, file=location)
        if not (Path(graph).parent / rel).resolve().is_relative_to(root):  # a symlink out of the folder
            raise BundleError("file_outside", path=bundle_path, file=location)
