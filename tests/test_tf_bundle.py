"""tools/tf_bundle.py: the TensorFlow checkpoint reader agrees with TensorFlow's own listing of the
fixture (``names.txt``), its writer round-trips, checksums are right, and damaged files are
named in the error."""

import os
import shutil
import struct

import numpy as np
import pytest

from conftest import REPO
from tools.tf_bundle import (  # block layout, for hand-made damage
    BundleError,
    BundleReader,
    _block_entries,
    _handle,
    crc32c,
    masked_crc32c,
    write_bundle,
)

FIXTURE = os.path.join(REPO, "tests", "data", "deeplab2_moat")
PREFIX = os.path.join(FIXTURE, "model.ckpt")


def names_txt():
    """(name, dtype, shape) of every entry, as TensorFlow listed them when the fixture was made."""
    rows = []
    with open(os.path.join(FIXTURE, "names.txt")) as f:
        for line in f:
            if not line.startswith("#"):
                name, dtype, shape = line.rstrip("\n").split("\t")
                rows.append((name, dtype, tuple(int(d) for d in shape.strip("[]").split(",") if d.strip())))
    return rows


def test_fixture_has_the_316_entries_tensorflow_listed_with_their_dtypes_and_shapes():
    with BundleReader(PREFIX) as reader:
        assert reader.num_shards == 1
        got = [(e.name, e.dtype, e.shape) for e in reader.entries.values()]
        assert got == names_txt() and len(got) == 316
        step = reader.read("global_step")
        assert step.shape == () and step.dtype == np.int64 and int(step) == 312500
        kernel = reader.read("moat/stem/conv_0/kernel")
        assert kernel.dtype == np.float32 and kernel.shape == (3, 3, 3, 16) and np.isfinite(kernel).all()


def test_crc32c_matches_the_standard_check_value_and_a_bytewise_loop():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(b"") == 0

    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        table.append(c)

    def loop(data: bytes) -> int:
        c = 0xFFFFFFFF
        for b in data:
            c = table[(c ^ b) & 0xFF] ^ (c >> 8)
        return c ^ 0xFFFFFFFF

    rng = np.random.default_rng(0)
    for n in (1, 5, 127, 128, 129, 1000, 4099, 33000):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert crc32c(data) == loop(data), n


def test_written_bundle_reads_back_every_dtype_and_the_fixture_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    bf16_bits = np.array([0x3F80, 0xC000, 0x0000, 0x7F80], dtype=np.uint16)  # 1, -2, 0, inf
    tensors = {
        "a/f32": rng.normal(size=(2, 3)).astype(np.float32),
        "a/f16": rng.normal(size=(4,)).astype(np.float16),
        "a/f64": rng.normal(size=(1, 1, 2)),
        "a/i32": np.arange(6, dtype=np.int32).reshape(3, 2),
        "b/i64": np.array(-7, dtype=np.int64),  # scalar
        "b/bf16": (bf16_bits, "bfloat16"),
    }
    prefix = str(tmp_path / "small.ckpt")
    write_bundle(prefix, tensors)
    with BundleReader(prefix) as reader:
        assert list(reader.entries) == sorted(tensors)
        for name, value in tensors.items():
            got = reader.read(name)
            if name == "b/bf16":
                assert reader.entries[name].dtype == "bfloat16"
                np.testing.assert_array_equal(got, np.array([1.0, -2.0, 0.0, np.inf], dtype=np.float32))
            else:
                assert got.dtype == value.dtype and got.shape == value.shape
                np.testing.assert_array_equal(got, value)

    with BundleReader(PREFIX) as reader:
        original = {n: reader.read(n) for n in reader.entries}
    copy = str(tmp_path / "copy.ckpt")
    # Many index blocks, and three data shards as sharded (e.g. multi-host) saves write them.
    write_bundle(copy, original, block_size=512, num_shards=3)
    assert os.path.isfile(copy + ".data-00002-of-00003")
    with BundleReader(copy) as reader:
        assert reader.num_shards == 3 and {e.shard_id for e in reader.entries.values()} == {0, 1, 2}
        assert list(reader.entries) == list(original)
        assert all(np.array_equal(reader.read(n), v) for n, v in original.items())


def _copy(tmp_path) -> str:
    for name in ("model.ckpt.index", "model.ckpt.data-00000-of-00001"):
        shutil.copy(os.path.join(FIXTURE, name), tmp_path / name)
    return str(tmp_path / "model.ckpt")


def test_damaged_files_are_errors_that_name_the_file_or_variable(tmp_path):
    prefix = _copy(tmp_path)
    data = prefix + ".data-00000-of-00001"

    with pytest.raises(BundleError, match=r"checkpoint index not found: .*nothing\.ckpt\.index"):
        BundleReader(str(tmp_path / "nothing.ckpt"))

    # A flipped byte inside a tensor: the entry's checksum names it.
    with BundleReader(prefix) as reader:
        entry = reader.entries["moat/stem/conv_0/kernel"]
    raw = bytearray(open(data, "rb").read())
    raw[entry.offset + 5] ^= 0xFF
    open(data, "wb").write(bytes(raw))
    with BundleReader(prefix) as reader:
        with pytest.raises(BundleError, match=r"checksum mismatch for moat/stem/conv_0/kernel"):
            reader.read("moat/stem/conv_0/kernel")
        reader.read("moat/stem/conv_0/bias")  # the others are intact
        last = max(reader.entries.values(), key=lambda e: e.offset)

    # A truncated shard: the entries past the end name the shard.
    open(data, "r+b").truncate(last.offset + 1)
    with BundleReader(prefix) as reader:
        with pytest.raises(BundleError, match=r"data-00000-of-00001: truncated: " + last.name):
            reader.read(last.name)
    os.remove(data)
    with BundleReader(prefix) as reader:
        with pytest.raises(BundleError, match=r"checkpoint data shard not found: .*data-00000-of-00001"):
            reader.read("global_step")

    index = prefix + ".index"
    raw = open(index, "rb").read()
    open(index, "wb").write(raw[:-3])
    with pytest.raises(BundleError, match=r"not a TensorFlow checkpoint index \(bad magic"):
        BundleReader(prefix)
    raw = bytearray(raw)
    raw[40] ^= 0xFF  # inside the first data block of the index
    open(index, "wb").write(bytes(raw))
    with pytest.raises(BundleError, match=r"model\.ckpt\.index: checksum mismatch in the block at byte 0"):
        BundleReader(prefix)


def test_snappy_compressed_blocks_are_refused_with_a_clear_message(tmp_path):
    prefix = str(tmp_path / "s.ckpt")
    write_bundle(prefix, {"x": np.zeros(3, np.float32)})
    raw = bytearray(open(prefix + ".index", "rb").read())
    # Footer -> index block -> the handle of the first data block.
    _, _, pos = _handle(bytes(raw[-48:]))
    index_offset, index_size, _ = _handle(bytes(raw[-48:]), pos)
    _, handle = next(_block_entries(bytes(raw[index_offset : index_offset + index_size]), "index"))
    offset, size, _ = _handle(handle)
    assert offset == 0
    raw[size] = 1  # compression type: snappy
    raw[size + 1 : size + 5] = struct.pack("<I", masked_crc32c(bytes(raw[: size + 1])))
    open(prefix + ".index", "wb").write(bytes(raw))
    with pytest.raises(BundleError, match=r"snappy-compressed.*does not implement snappy"):
        BundleReader(prefix)
