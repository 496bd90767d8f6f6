"""The data plane's wire format: one `ExpertRequest` or its answer as a frame in a flat buffer.

A frame is a 64-byte header and a payload of aligned sections, laid out the same way in a
shared-memory region and on a socket, so both transports read and write through `FrameBuffer`:

    request: header | x [n, D] | expert_ids [n, k] int64 | gates [n, k] | tags (utf-8, '\\n'-joined)
    reply:   header | y [n, D]
    error:   header | message (utf-8)   (the shard's own code raised: the channel stays in step)
    refused: header | message (utf-8)   (the frame broke the agreement: the channel is over)

Every header carries a magic number, the format version and the sender's sequence number: the
receiver refuses (`FrameError`, a clear message, never a wrong answer) a frame whose magic, kind,
sequence number, sizes or dtypes are not what the channel agreed on. Reading a frame makes tensor
views into the buffer, not copies, and the views of a given frame shape are made once per buffer and
reused: no pickling, no per-layer allocation. Writing gathers a request's rows straight into the
buffer (`index_select` into the frame's view), so the dispatcher never copies them twice.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache
from typing import NamedTuple

import torch

MAGIC = 0x4D524159  # "MRAY"
VERSION = 2  # 2: REFUSED frames
# magic kind version seq layer rows slots dim x_dtype gates_dtype (pad) tag_bytes payload
HEADER = struct.Struct("<IHHQiiiiBBHIQ")
HEADER_BYTES = 64
ALIGN = 64
MAX_TAG_BYTES = 1 << 16  # request ids of one step, for the shards' logs
MAX_MESSAGE_BYTES = 4096  # an error's text
DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


class Kind(IntEnum):
    REQUEST = 1
    REPLY = 2
    ERROR = 3  # the shard refused the frame or its own code raised; payload: the message
    DRAIN = 4  # the shard is stopping: send it nothing more, close the channel
    HELLO = 5  # opens a channel: rows = max rows per frame, dim, dtypes; payload: the token
    WELCOME = 6  # the shard accepted a HELLO
    REFUSED = 7  # the receiver refused a frame (or a HELLO); it reads nothing more on the channel


KINDS = frozenset(int(k) for k in Kind)
MAX_VIEWS = 1024  # tensor views a FrameBuffer keeps (one per frame shape seen; cleared when full)


class FrameError(ValueError):
    """A frame that breaks the channel's agreement (truncated, out of sequence, oversized, wrong dtype)."""


class RefusedError(FrameError):
    """The peer refused our frame (it broke the channel's agreement): the channel is out of step."""


class RemoteError(RuntimeError):
    """The peer's own code raised while answering (the channel stays in step), or it refused a HELLO."""


class Header(NamedTuple):  # a tuple: built and read on every frame, so no dataclass machinery
    kind: int
    seq: int
    layer: int
    rows: int
    slots: int
    dim: int
    x_dtype: int
    gates_dtype: int
    tag_bytes: int
    payload: int

    def pack_into(self, buf: memoryview) -> None:
        HEADER.pack_into(buf, 0, MAGIC, self.kind, VERSION, self.seq, self.layer, self.rows, self.slots,
                         self.dim, self.x_dtype, self.gates_dtype, 0, self.tag_bytes, self.payload)

    @classmethod
    def unpack(cls, buf: memoryview) -> Header:
        if len(buf) < HEADER_BYTES:
            raise FrameError(f"truncated frame: {len(buf)} bytes, a header needs {HEADER_BYTES}")
        magic, kind, version, seq, layer, rows, slots, dim, xd, gd, _, tags, payload = HEADER.unpack_from(buf)
        if magic != MAGIC:
            raise FrameError(f"not a moray frame (magic {magic:#x})")
        if version != VERSION:
            raise FrameError(f"frame format version {version}, this side speaks {VERSION}")
        if kind not in KINDS:
            raise FrameError(f"unknown frame kind {kind}")
        return cls(kind, seq, layer, rows, slots, dim, xd, gd, tags, payload)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def dtype_code(dtype: torch.dtype) -> int:
    if dtype not in DTYPE_CODES:
        raise FrameError(f"dtype {dtype} cannot travel on the data plane")
    return DTYPE_CODES[dtype]


@dataclass(frozen=True)
class Sections:
    """Byte offsets of a request's sections after the header, and the payload's length."""

    x: int
    ids: int
    gates: int
    tags: int
    end: int

    @classmethod
    def of(cls, rows: int, slots: int, dim: int, x_size: int, gates_size: int, tag_bytes: int) -> Sections:
        return _sections(rows, slots, dim, x_size, gates_size, tag_bytes)


@lru_cache(maxsize=4096)  # a handful of shapes, looked up on every frame
def _sections(rows: int, slots: int, dim: int, x_size: int, gates_size: int, tag_bytes: int) -> Sections:
    x = HEADER_BYTES
    ids = x + _align(rows * dim * x_size)
    gates = ids + _align(rows * slots * 8)
    tags = gates + _align(rows * slots * gates_size)
    return Sections(x, ids, gates, tags, tags + tag_bytes)


def capacity(max_rows: int, dim: int, dtype: torch.dtype, max_slots: int = 2) -> int:
    """Bytes of the largest frame either way on a channel of `max_rows` rows (requests are larger)."""
    size = dtype.itemsize
    return Sections.of(max_rows, max_slots, dim, size, size, MAX_TAG_BYTES).end


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts on one channel."""

    max_rows: int
    dim: int
    dtype: torch.dtype
    num_layers: int
    max_slots: int = 2


@dataclass
class Request:
    seq: int
    layer: int
    x: torch.Tensor  # [n, D], a view into the buffer
    expert_ids: torch.Tensor  # [n, k] int64
    gates: torch.Tensor  # [n, k]
    tags: tuple[str, ...]


class FrameBuffer:
    """Frames written into and read out of one buffer (a shared-memory mapping or a socket's buffer)."""

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.u8 = torch.frombuffer(buf, dtype=torch.uint8) if len(buf) else torch.empty(0, dtype=torch.uint8)
        self._views: dict[tuple[int, int, int, torch.dtype], torch.Tensor] = {}

    def _view(self, offset: int, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """The [rows, cols] `dtype` tensor at `offset` in the buffer (made once per shape, then reused)."""
        key = (offset, rows, cols, dtype)
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= MAX_VIEWS:
                self._views.clear()
            view = self.u8[offset:offset + rows * cols * dtype.itemsize].view(dtype).view(rows, cols)
            self._views[key] = view
        return view

    def _room(self, end: int) -> None:
        if end > len(self.buf):
            raise FrameError(f"oversized frame: {end} bytes, the channel holds {len(self.buf)}")

    def write_request(self, seq: int, layer: int, x: torch.Tensor, expert_ids: torch.Tensor,
                      gates: torch.Tensor, tags: bytes = b"", rows: torch.Tensor | None = None) -> int:
        """Write a request: the rows `rows` of x (every row when None) with their expert ids and gates
        [len(rows), k]; returns the frame's length in bytes."""
        dim, slots = x.shape[1], expert_ids.shape[1]
        n = x.shape[0] if rows is None else len(rows)
        sec = Sections.of(n, slots, dim, x.element_size(), gates.element_size(), len(tags))
        self._room(sec.end)
        xs = self._view(sec.x, n, dim, x.dtype)
        if rows is None:
            xs.copy_(x)
        elif x.device == xs.device:
            torch.index_select(x, 0, rows, out=xs)  # gathered straight into the frame
        else:
            xs.copy_(x.index_select(0, rows.to(x.device)))
        self._view(sec.ids, n, slots, torch.int64).copy_(expert_ids)
        self._view(sec.gates, n, slots, gates.dtype).copy_(gates)
        if tags:
            self.buf[sec.tags:sec.end] = tags
        Header(Kind.REQUEST, seq, layer, n, slots, dim, dtype_code(x.dtype), dtype_code(gates.dtype),
               len(tags), sec.end - HEADER_BYTES).pack_into(self.buf)
        return sec.end

    def read_request(self, expected_seq: int, limits: Limits) -> Request:
        h = self.header(Kind.REQUEST, expected_seq)
        if not 0 <= h.layer < limits.num_layers:
            raise FrameError(f"layer {h.layer} out of range (the model has {limits.num_layers})")
        if not 0 < h.rows <= limits.max_rows:
            raise FrameError(f"oversized frame: {h.rows} rows, the channel takes 1..{limits.max_rows}")
        if not 0 < h.slots <= limits.max_slots or h.dim != limits.dim or h.tag_bytes > MAX_TAG_BYTES:
            raise FrameError(f"frame shape rows={h.rows} slots={h.slots} dim={h.dim} tags={h.tag_bytes} "
                             f"does not fit the channel (dim {limits.dim}, at most {limits.max_slots} slots)")
        x_dtype, gates_dtype = CODE_DTYPES.get(h.x_dtype), CODE_DTYPES.get(h.gates_dtype)
        if x_dtype != limits.dtype or gates_dtype is None:
            raise FrameError(f"frame dtypes {x_dtype}/{gates_dtype}, the channel carries {limits.dtype}")
        sec = Sections.of(h.rows, h.slots, h.dim, x_dtype.itemsize, gates_dtype.itemsize, h.tag_bytes)
        if h.payload != sec.end - HEADER_BYTES:
            raise FrameError(f"truncated or padded frame: payload {h.payload} bytes, its header implies "
                             f"{sec.end - HEADER_BYTES}")
        self._room(sec.end)
        tags = bytes(self.buf[sec.tags:sec.end]).decode("utf-8", "replace") if h.tag_bytes else ""
        return Request(h.seq, h.layer, self._view(sec.x, h.rows, h.dim, x_dtype),
                       self._view(sec.ids, h.rows, h.slots, torch.int64),
                       self._view(sec.gates, h.rows, h.slots, gates_dtype),
                       tuple(tags.split("\n")) if tags else ())

    def write_reply(self, seq: int, layer: int, y: torch.Tensor) -> int:
        rows, dim = y.shape
        end = HEADER_BYTES + rows * dim * y.element_size()
        self._room(end)
        self._view(HEADER_BYTES, rows, dim, y.dtype).copy_(y)
        Header(Kind.REPLY, seq, layer, rows, 0, dim, dtype_code(y.dtype), 0, 0, end - HEADER_BYTES
               ).pack_into(self.buf)
        return end

    def write_message(self, kind: Kind, seq: int, message: str = "") -> int:
        """An ERROR, REFUSED, DRAIN, HELLO or WELCOME frame: a header and some text."""
        data = message.encode()[:min(MAX_MESSAGE_BYTES, len(self.buf) - HEADER_BYTES)]
        self.buf[HEADER_BYTES:HEADER_BYTES + len(data)] = data
        Header(kind, seq, -1, 0, 0, 0, 0, 0, 0, len(data)).pack_into(self.buf)
        return HEADER_BYTES + len(data)

    @staticmethod
    def bare(kind: Kind) -> bytearray:
        """A frame of `kind` with no payload (DRAIN, WELCOME)."""
        buf = bytearray(HEADER_BYTES)
        FrameBuffer(memoryview(buf)).write_message(kind, 0)
        return buf

    def read_reply(self, expected_seq: int, rows: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
        """The answer y [rows, dim] to request `expected_seq`; `RemoteError` if the peer's code raised,
        `RefusedError` if it refused the request."""
        h = Header.unpack(self.buf)
        if h.kind == Kind.ERROR:
            raise RemoteError(self.message(h))
        if h.kind == Kind.REFUSED:
            raise RefusedError(f"the shard refused the frame: {self.message(h)}")
        h = self.header(Kind.REPLY, expected_seq)
        if (h.rows, h.dim, CODE_DTYPES.get(h.x_dtype)) != (rows, dim, dtype):
            raise FrameError(f"reply of {h.rows}x{h.dim} {CODE_DTYPES.get(h.x_dtype)}, "
                             f"expected {rows}x{dim} {dtype}")
        if h.payload != rows * dim * dtype.itemsize:
            raise FrameError(f"truncated reply: payload {h.payload} bytes, "
                             f"expected {rows * dim * dtype.itemsize}")
        return self._view(HEADER_BYTES, rows, dim, dtype)

    def header(self, kind: Kind, expected_seq: int) -> Header:
        h = Header.unpack(self.buf)
        if h.kind != kind:
            raise FrameError(f"expected a {kind.name} frame, got {Kind(h.kind).name}")
        if h.seq != expected_seq:
            raise FrameError(f"frame out of sequence: expected {expected_seq}, got {h.seq}")
        if h.payload > len(self.buf) - HEADER_BYTES:
            raise FrameError(f"oversized frame: payload {h.payload} bytes, the channel holds "
                             f"{len(self.buf) - HEADER_BYTES}")
        return h

    def message(self, h: Header) -> str:
        n = min(h.payload, MAX_MESSAGE_BYTES, len(self.buf) - HEADER_BYTES)
        return bytes(self.buf[HEADER_BYTES:HEADER_BYTES + n]).decode("utf-8", "replace")
