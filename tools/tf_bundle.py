"""Read (and, for tests, write) TensorFlow checkpoints without TensorFlow.

A TF checkpoint ``PREFIX`` (V2 "tensor bundle", what ``tf.train.Saver`` and ``tf.train.Checkpoint``
write) is two kinds of file:

* ``PREFIX.index``: an SSTable in LevelDB's table format. From the end: a 48-byte footer holding
  two ``BlockHandle``s (offset and size, varints: the metaindex block, unused here, and the index
  block) and a magic number; the index block maps separator keys to the handles of the data
  blocks. Every block ends in a 5-byte trailer (compression type, masked CRC32C of the block and
  type byte); inside a block, entries are prefix-compressed (shared/unshared key lengths and
  value length as varints, then the unshared key bytes and the value), followed by the restart
  offsets and their count. Keys are the variable names; the empty key holds a
  ``BundleHeaderProto`` (number of data shards, endianness), every other value a
  ``BundleEntryProto`` (dtype, shape, shard id, offset, size, masked CRC32C of the bytes).
* ``PREFIX.data-0000S-of-0000N``: the raw tensor bytes, little-endian, back to back.

Why hand-written: TensorFlow is a ~600 MB dependency for reading a key-value file, and the
``protobuf`` package alone lacks TF's generated messages. The two messages need a few varint,
length-delimited and fixed32 fields, decoded below. Bundles are written uncompressed, so snappy
blocks are refused with a clear message rather than implemented. Partitioned (sliced) variables
and string tensors are refused the same way. Checksums (block trailers and tensor bytes) are
verified with a vectorised CRC32C, so a corrupt download is named instead of converted.

:func:`write_bundle` writes the same format (uncompressed, one or more shards); the tests use it to make
damaged or edited copies of a checkpoint.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np

from utils.errors import UserError

__all__ = ["BundleEntry", "BundleError", "BundleReader", "crc32c", "masked_crc32c", "write_bundle"]

_MAGIC = 0xDB4775248B80FB57  # LevelDB table magic number (little-endian fixed64)
_FOOTER_SIZE = 48  # two BlockHandles padded to 40 bytes + 8-byte magic
_TRAILER_SIZE = 5  # compression type + masked CRC32C
_NO_COMPRESSION, _SNAPPY = 0, 1
_HEADER_KEY = b""

# tensorflow/core/framework/types.proto DataType values -> numpy dtype names.
_DTYPES: Dict[int, str] = {
    1: "float32",
    2: "float64",
    3: "int32",
    4: "uint8",
    5: "int16",
    6: "int8",
    9: "int64",
    10: "bool",
    14: "bfloat16",
    17: "uint16",
    19: "float16",
    22: "uint32",
    23: "uint64",
}
_DTYPE_NAMES = {7: "string", 8: "complex64", 18: "complex128", 20: "resource", 21: "variant"}
_DTYPE_ENUM = {name: enum for enum, name in _DTYPES.items()}
_ITEMSIZE = {"bfloat16": 2}


class BundleError(UserError):
    """The checkpoint files are missing, damaged or use a feature this reader does not support
    (a user error: one line naming the file or entry, exit code 2)."""


# ------------------------------------------------------------------------------------------ CRC32C
_POLY = 0x82F63B78  # CRC32C (Castagnoli), reflected


def _byte_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_POLY), table >> 1).astype(np.uint32)
    return table


_TABLE = _byte_table()
# The register update for one zero byte is linear over GF(2); an operator is stored as the images
# of the 32 unit vectors, and _ZERO_POW[k] advances the register over 2**k zero bytes.
_ZERO_POW: List[List[int]] = [[int(_TABLE[(1 << j) & 0xFF]) ^ ((1 << j) >> 8) for j in range(32)]]


def _apply(op: List[int], value: int) -> int:
    out, j = 0, 0
    while value:
        if value & 1:
            out ^= op[j]
        value >>= 1
        j += 1
    return out


def _compose(a: List[int], b: List[int]) -> List[int]:
    """The operator ``a(b(x))``."""
    return [_apply(a, col) for col in b]


def _zeros_op(n: int) -> List[int]:
    """Operator that advances a raw CRC register over ``n`` zero bytes."""
    op = [1 << j for j in range(32)]
    k = 0
    while n:
        while len(_ZERO_POW) <= k:
            _ZERO_POW.append(_compose(_ZERO_POW[-1], _ZERO_POW[-1]))
        if n & 1:
            op = _compose(_ZERO_POW[k], op)
        n >>= 1
        k += 1
    return op


def _apply_vec(op: List[int], values: np.ndarray) -> np.ndarray:
    """``op`` applied to every element of a uint32 array, through four 256-entry tables."""
    byte = np.arange(256, dtype=np.uint32)
    out = np.zeros_like(values)
    for k in range(4):
        table = np.zeros(256, dtype=np.uint32)
        for j in range(8):
            table ^= np.where((byte >> j) & 1, np.uint32(op[8 * k + j]), np.uint32(0)).astype(np.uint32)
        out ^= table[(values >> np.uint32(8 * k)) & np.uint32(0xFF)]
    return out


def crc32c(data: bytes | np.ndarray) -> int:
    """CRC32C of ``data``, vectorised with numpy (a plain Python loop would take minutes on a
    multi-GB checkpoint).

    The bytes are zero-padded at the front (which leaves a zero-initialised register unchanged) to
    ``m`` equal chunks; the chunks' registers advance together, one byte column per step, and are
    then merged pairwise (``crc(A + B) = shift_{|B|}(crc(A)) ^ crc(B)`` for raw registers).
    """
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    n = buf.size
    chunks = 1
    while chunks < 65536 and chunks * 128 <= n:
        chunks *= 2
    length = -(-n // chunks) if n else 0
    padded = np.zeros(chunks * length, dtype=np.uint8)
    padded[chunks * length - n :] = buf
    columns = padded.reshape(chunks, length).T.copy()  # [length, chunks]: one contiguous row per step
    reg = np.zeros(chunks, dtype=np.uint32)
    mask = np.uint32(0xFF)
    for row in columns:
        reg = _TABLE[(reg ^ row) & mask] ^ (reg >> np.uint32(8))
    span = length
    while reg.size > 1:
        reg = _apply_vec(_zeros_op(span), reg[0::2]) ^ reg[1::2]
        span *= 2
    raw = int(reg[0])
    # Standard CRC32C: register initialised to all ones, result inverted.
    return raw ^ _apply(_zeros_op(n), 0xFFFFFFFF) ^ 0xFFFFFFFF


def masked_crc32c(data: bytes | np.ndarray) -> int:
    """The masked CRC32C that LevelDB tables and TF bundles store."""
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------- varints, protos
def _varint(buf: bytes, pos: int) -> Tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise BundleError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise BundleError("varint too long")


def _encode_varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 -> two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _parse_proto(buf: bytes) -> Dict[int, list]:
    """Field number -> values (ints for varint/fixed fields, bytes for length-delimited ones)."""
    fields: Dict[int, list] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:
            raise BundleError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise BundleError("truncated protobuf message")
        fields.setdefault(number, []).append(value)
    return fields


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _tag(number: int, wire: int) -> bytes:
    """The key of one protobuf field."""
    return _encode_varint(number << 3 | wire)


@dataclass(frozen=True)
class BundleEntry:
    """Where one tensor lives and what it is (a decoded ``BundleEntryProto``)."""

    name: str
    dtype: str  # numpy dtype name ('bfloat16' too), or 'string', 'dtype_N', ...
    shape: Tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: Optional[int]  # masked, as stored
    sliced: bool = False  # a partitioned variable (its slices are separate entries)


def _decode_entry(name: str, value: bytes) -> BundleEntry:
    f = _parse_proto(value)
    enum = f.get(1, [0])[-1]
    dtype = _DTYPES.get(enum) or _DTYPE_NAMES.get(enum, f"dtype_{enum}")
    shape: Tuple[int, ...] = ()
    if 2 in f:
        dims = _parse_proto(f[2][-1]).get(2, [])
        shape = tuple(_int64(_parse_proto(d).get(1, [0])[-1]) for d in dims)
    return BundleEntry(
        name=name,
        dtype=dtype,
        shape=shape,
        shard_id=f.get(3, [0])[-1],
        offset=_int64(f.get(4, [0])[-1]),
        size=_int64(f.get(5, [0])[-1]),
        crc32c=f[6][-1] if 6 in f else None,
        sliced=bool(f.get(7)),
    )


def _encode_entry(dtype: str, shape: Tuple[int, ...], offset: int, size: int, crc: int, shard: int = 0) -> bytes:
    dims = b"".join(_tag(2, 2) + _len_prefixed(_tag(1, 0) + _encode_varint(d)) for d in shape)
    out = _tag(1, 0) + _encode_varint(_DTYPE_ENUM[dtype])
    out += _tag(2, 2) + _len_prefixed(dims)
    if shard:
        out += _tag(3, 0) + _encode_varint(shard)
    if offset:
        out += _tag(4, 0) + _encode_varint(offset)
    if size:
        out += _tag(5, 0) + _encode_varint(size)
    return out + _tag(6, 5) + struct.pack("<I", crc)


def _len_prefixed(payload: bytes) -> bytes:
    return _encode_varint(len(payload)) + payload


# ------------------------------------------------------------------------------------- SSTable read
def _read_block(f: BinaryIO, path: str, offset: int, size: int, file_size: int, verify: bool) -> bytes:
    if offset + size + _TRAILER_SIZE > file_size:
        raise BundleError(f"{path}: truncated (a block at byte {offset} runs past the end of the file)")
    f.seek(offset)
    raw = f.read(size + _TRAILER_SIZE)
    kind = raw[size]
    if verify:
        stored = struct.unpack_from("<I", raw, size + 1)[0]
        if masked_crc32c(raw[: size + 1]) != stored:
            raise BundleError(f"{path}: checksum mismatch in the block at byte {offset} (corrupt file?)")
    if kind == _SNAPPY:
        raise BundleError(
            f"{path}: the block at byte {offset} is snappy-compressed; TensorFlow writes "
            f"checkpoint bundles uncompressed and this reader does not implement snappy"
        )
    if kind != _NO_COMPRESSION:
        raise BundleError(f"{path}: unknown block compression type {kind} at byte {offset}")
    return raw[:size]


def _block_entries(block: bytes, path: str) -> Iterator[Tuple[bytes, bytes]]:
    """(key, value) pairs of one block, prefix compression undone."""
    if len(block) < 4:
        raise BundleError(f"{path}: malformed block")
    num_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end = len(block) - 4 - 4 * num_restarts
    if end < 0:
        raise BundleError(f"{path}: malformed block (restart array)")
    pos, key = 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + value_len > end:
            raise BundleError(f"{path}: malformed block entry")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield key, block[pos : pos + value_len]
        pos += value_len


def _handle(value: bytes, pos: int = 0) -> Tuple[int, int, int]:
    offset, pos = _varint(value, pos)
    size, pos = _varint(value, pos)
    return offset, size, pos


def read_table(path: str, verify: bool = True) -> List[Tuple[bytes, bytes]]:
    """Every (key, value) of an SSTable file, in key order."""
    if not os.path.isfile(path):
        raise BundleError(f"checkpoint index not found: {path}")
    file_size = os.path.getsize(path)
    if file_size < _FOOTER_SIZE:
        raise BundleError(f"{path}: not a TensorFlow checkpoint index (only {file_size} bytes)")
    with open(path, "rb") as f:
        f.seek(file_size - _FOOTER_SIZE)
        footer = f.read(_FOOTER_SIZE)
        lo, hi = struct.unpack_from("<II", footer, _FOOTER_SIZE - 8)
        if (hi << 32 | lo) != _MAGIC:
            raise BundleError(f"{path}: not a TensorFlow checkpoint index (bad magic number; truncated?)")
        _, _, pos = _handle(footer)  # metaindex: no filters in TF bundles
        index_offset, index_size, _ = _handle(footer, pos)
        index = _read_block(f, path, index_offset, index_size, file_size, verify)
        out = []
        for _, handle in _block_entries(index, path):
            offset, size, _ = _handle(handle)
            out += _block_entries(_read_block(f, path, offset, size, file_size, verify), path)
    return out


# ------------------------------------------------------------------------------------ bundle reader
class BundleReader:
    """The entries of checkpoint ``prefix`` and their values (read on demand).

    ``reader.entries`` maps variable names to :class:`BundleEntry` (sorted); ``reader.read(name)``
    returns a numpy array (bfloat16 comes back as float32, exactly). Every problem is a
    :class:`BundleError` that names the file or the variable.
    """

    def __init__(self, prefix: str, verify_crc: bool = True) -> None:
        self.prefix = prefix
        self.verify_crc = verify_crc
        self.index_path = prefix + ".index"
        header: Optional[Dict[int, list]] = None
        self.entries: Dict[str, BundleEntry] = {}
        for key, value in read_table(self.index_path, verify_crc):
            if key == _HEADER_KEY:
                header = _parse_proto(value)
                continue
            try:
                name = key.decode("utf-8")
            except UnicodeDecodeError:
                raise BundleError(
                    f"{self.index_path}: a key is not UTF-8 ({key[:40]!r}); partitioned variables are not supported"
                ) from None
            self.entries[name] = _decode_entry(name, value)
        if header is None:
            raise BundleError(f"{self.index_path}: no bundle header (not a TF V2 checkpoint index?)")
        self.num_shards = header.get(1, [1])[-1]
        self.big_endian = header.get(2, [0])[-1] == 1
        self._files: Dict[int, BinaryIO] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def shard_path(self, shard_id: int) -> str:
        return f"{self.prefix}.data-{shard_id:05d}-of-{self.num_shards:05d}"

    def _shard(self, shard_id: int) -> BinaryIO:
        if shard_id not in self._files:
            path = self.shard_path(shard_id)
            if not os.path.isfile(path):
                raise BundleError(f"checkpoint data shard not found: {path}")
            self._files[shard_id] = open(path, "rb")
        return self._files[shard_id]

    def read(self, name: str) -> np.ndarray:
        """The tensor stored under ``name``."""
        entry = self.entries.get(name)
        if entry is None:
            raise BundleError(f"{self.prefix}: no variable {name!r} in the checkpoint")
        if entry.sliced:
            raise BundleError(f"{name}: a partitioned (sliced) variable; not supported")
        if entry.dtype not in _DTYPE_ENUM:
            raise BundleError(f"{name}: dtype {entry.dtype} is not supported")
        itemsize = _ITEMSIZE.get(entry.dtype) or np.dtype(entry.dtype).itemsize
        count = int(np.prod(entry.shape, dtype=np.int64))
        if entry.size != count * itemsize:
            raise BundleError(
                f"{name}: {entry.size} bytes stored for a {entry.dtype} tensor of shape {list(entry.shape)}"
            )
        f = self._shard(entry.shard_id)
        path = self.shard_path(entry.shard_id)
        file_size = os.fstat(f.fileno()).st_size
        if entry.offset + entry.size > file_size:
            raise BundleError(
                f"{path}: truncated: {name} needs bytes {entry.offset}..{entry.offset + entry.size} "
                f"but the file has {file_size}"
            )
        f.seek(entry.offset)
        data = f.read(entry.size)
        if self.verify_crc and entry.crc32c is not None and masked_crc32c(data) != entry.crc32c:
            raise BundleError(f"{path}: checksum mismatch for {name} (corrupt download?)")
        order = ">" if self.big_endian else "<"
        if entry.dtype == "bfloat16":
            bits = np.frombuffer(data, dtype=order + "u2").astype(np.uint32) << np.uint32(16)
            return bits.view(np.float32).reshape(entry.shape)
        return (
            np.frombuffer(data, dtype=np.dtype(entry.dtype).newbyteorder(order))
            .astype(entry.dtype)
            .reshape(entry.shape)
        )

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> "BundleReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------ writer
def _build_block(items: List[Tuple[bytes, bytes]], restart_interval: int = 16) -> bytes:
    out, restarts, prev = bytearray(), [], b""
    for i, (key, value) in enumerate(items):
        shared = 0
        if i % restart_interval == 0:
            restarts.append(len(out))
        else:
            while shared < min(len(prev), len(key)) and prev[shared] == key[shared]:
                shared += 1
        out += _encode_varint(shared) + _encode_varint(len(key) - shared) + _encode_varint(len(value))
        out += key[shared:] + value
        prev = key
    restarts = restarts or [0]
    out += struct.pack(f"<{len(restarts)}I", *restarts) + struct.pack("<I", len(restarts))
    return bytes(out)


def _write_block(f: BinaryIO, block: bytes) -> bytes:
    """Write ``block`` plus trailer; returns its encoded BlockHandle."""
    offset = f.tell()
    f.write(block + bytes([_NO_COMPRESSION]) + struct.pack("<I", masked_crc32c(block + bytes([_NO_COMPRESSION]))))
    return _encode_varint(offset) + _encode_varint(len(block))


def write_bundle(
    prefix: str,
    tensors: Mapping[str, Union[np.ndarray, Tuple[np.ndarray, str]]],
    block_size: int = 4096,
    num_shards: int = 1,
) -> None:
    """Write ``tensors`` as a TF V2 checkpoint at ``prefix`` (tensors dealt round-robin over
    ``num_shards`` data files), for tests and tools that need a checkpoint without TensorFlow.
    Values are numpy arrays, or ``(uint16 array, 'bfloat16')``."""
    entries = []
    shards = [open(f"{prefix}.data-{i:05d}-of-{num_shards:05d}", "wb") for i in range(num_shards)]
    try:
        for i, name in enumerate(sorted(tensors, key=lambda n: n.encode("utf-8"))):
            value = tensors[name]
            # (uint16 array, 'bfloat16'): numpy has no bfloat16, so its bit patterns come as uint16.
            array, dtype = (value[0], value[1]) if isinstance(value, tuple) else (value, None)
            array = np.asarray(array)  # (ascontiguousarray would turn a scalar into shape [1])
            dtype = dtype or array.dtype.name
            if dtype not in _DTYPE_ENUM:
                raise BundleError(f"{name}: dtype {dtype} cannot be written")
            raw = array.astype(array.dtype.newbyteorder("<")).tobytes()
            shard = i % num_shards
            entries.append(
                (
                    name.encode("utf-8"),
                    _encode_entry(dtype, array.shape, shards[shard].tell(), len(raw), masked_crc32c(raw), shard),
                )
            )
            shards[shard].write(raw)
    finally:
        for f in shards:
            f.close()
    header = _tag(1, 0) + _encode_varint(num_shards) + _tag(3, 2) + _len_prefixed(_tag(1, 0) + _encode_varint(1))
    items = [(_HEADER_KEY, header)] + entries
    with open(f"{prefix}.index", "wb") as f:
        index, block = [], []
        for key, value in items:
            block.append((key, value))
            if sum(len(k) + len(v) for k, v in block) >= block_size:
                index.append((block[-1][0], _write_block(f, _build_block(block))))
                block = []
        if block:
            index.append((block[-1][0], _write_block(f, _build_block(block))))
        meta_handle = _write_block(f, _build_block([]))
        index_handle = _write_block(f, _build_block(index, restart_interval=1))
        footer = (meta_handle + index_handle).ljust(_FOOTER_SIZE - 8, b"\0")
        f.write(footer + struct.pack("<II", _MAGIC & 0xFFFFFFFF, _MAGIC >> 32))
