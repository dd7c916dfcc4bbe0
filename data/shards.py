"""WebDataset tar shards with random access through a shard index (``DATA.FORMAT shards``).

    DATA_PATH/train-000000.tar ...  WebDataset shards: '<key>.jpg' (or .jpeg/.png/.webp) and
                                    '<key>.cls' (the class index as text) per sample
    DATA_PATH/train.json            the shard index (``tools/make_shards.py`` writes both)

The index is a wids dataset descriptor (``{"wids_version": 1, "shardlist": [{"url",
"nsamples"}, ...]}``, so ``wids.ShardListDataset`` reads these shards too) extended with what
random access needs: per shard the byte offset, size and label of every sample's image, and the
class names (``"classes"``). A sample is then one ``pread`` from its shard, so the shards serve
the same ``(index, seed)`` keys as class folders and ``ResumableSampler`` gives them exact
mid-epoch resume, any world size, every rank reading its own samples.

Hand-written rather than read through ``webdataset``/``wids``: webdataset streams shards in
order (resume could only restart a shard), and ``wids.ShardListDataset`` re-indexes each shard it
opens by scanning its tar headers, keeps ten open, writes lock files beside the shards and prints
to stderr; under a global random order that is a header scan of a whole shard per sample. Shards
that come without offsets (a pattern, or a wids index without them) are scanned once at start-up
with the standard library's ``tarfile`` instead (logged; ``tools/make_shards.py --index-only``
writes the index once).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import posixpath
import tarfile
import time
from collections import OrderedDict
from typing import Any, Callable

import numpy as np
from PIL import Image

from utils.errors import DataError

from .class_map import relabel
from .datasets import KeyedImageDataset, decode_rgb, first_line

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
INDEX_VERSION = 1  # wids_version of the index JSON
_MAX_OPEN_SHARDS = 64  # per process: ImageNet in 1,000-image shards would pass a 1024-fd ulimit


def split_key(name: str) -> tuple[str, str]:
    """``(key, extension)`` of a member as WebDataset groups them: the key runs to the first dot of
    the file name (``a/b.c.jpg`` -> ``('a/b', 'c.jpg')``)."""
    folder, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return posixpath.join(folder, stem), ext if dot else ""


def scan_shard(path: str) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Index one tar shard by reading its headers and labels: ``(entry, problems)``.

    ``entry`` is the shard's index entry (url, nsamples, filesize, offsets, sizes, labels, keys) for
    its usable samples; ``problems`` lists ``(member, reason)`` for the others (no image, no or a
    bad ``.cls``, data cut off by a truncated file).
    """
    filesize = os.path.getsize(path)
    samples: dict[str, dict[str, Any]] = {}
    problems: list[tuple[str, str]] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for member in _members_until_cut(tar, path, problems):
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                sample = samples.setdefault(key, {})
                if member.offset_data + member.size > filesize:
                    problems.append((member.name, f"cut off at byte {filesize} (truncated shard)"))
                    sample["cut"] = True
                elif ext.lower() == "cls":
                    sample["cls"] = (member.name, tar.extractfile(member).read())
                elif ext.lower() in IMAGE_EXTENSIONS and "image" not in sample:
                    sample["image"] = (member.name, member.offset_data, member.size)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{path}: not a readable tar file ({first_line(e)}); truncated or damaged?") from None
    entry: dict[str, Any] = {
        "url": os.path.basename(path),
        "nsamples": 0,
        "filesize": filesize,
        "offsets": [],
        "sizes": [],
        "labels": [],
        "keys": [],
    }
    for key, sample in samples.items():
        if sample.get("cut"):
            continue
        if "image" not in sample:
            problems.append((key, f"no image member (.{'/.'.join(IMAGE_EXTENSIONS)})"))
            continue
        if "cls" not in sample:
            problems.append((sample["image"][0], "no label (.cls member)"))
            continue
        raw = sample["cls"][1].strip()
        if not raw.lstrip(b"-").isdigit():
            problems.append((sample["cls"][0], f"label {raw[:20]!r} is not a class index"))
            continue
        _, offset, size = sample["image"]
        entry["offsets"].append(offset)
        entry["sizes"].append(size)
        entry["labels"].append(int(raw))
        entry["keys"].append(sample["image"][0])
    entry["nsamples"] = len(entry["offsets"])
    return entry, problems


def _members_until_cut(tar: tarfile.TarFile, path: str, problems: list[tuple[str, str]]):
    """The tar's members, stopping (with a problem noted) where a truncated file ends."""
    last = "the first member"
    while True:
        try:
            member = tar.next()
        except tarfile.ReadError as e:
            if "unexpected end of data" not in str(e) and "truncated" not in str(e):
                raise
            if not (problems and problems[-1][0] == last):  # unless that member was already found cut off
                problems.append((last, f"the shard ends after it ({first_line(e)}): truncated, later samples lost"))
            return
        if member is None:
            return
        last = member.name
        yield member


def write_index(path: str, entries: list[dict[str, Any]], classes: list[str] | None, name: str) -> None:
    """Write the shard index JSON atomically (urls relative to its folder; no per-sample keys)."""
    index: dict[str, Any] = {"wids_version": INDEX_VERSION, "name": name, "shardlist": []}
    if classes is not None:
        index["classes"] = list(classes)
    for entry in entries:
        index["shardlist"].append({k: v for k, v in entry.items() if k != "keys"})
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(index, f, separators=(",", ":"))
    os.replace(tmp, path)


def resolve_shards(spec: str, data_path: str, split: str) -> tuple[str | None, list[str], str]:
    """``(index JSON or None, shard paths, what was asked for)`` from ``DATA.TRAIN_SHARDS`` /
    ``VAL_SHARDS``: an index JSON, a folder of ``.tar`` files, or a brace/glob pattern
    (``train-{000000..000146}.tar``, ``train-*.tar``), relative to ``DATA_PATH`` unless absolute.
    Empty: ``DATA_PATH/<split>.json`` when it exists, else ``DATA_PATH/<split>-*.tar``."""
    if not spec:
        default = os.path.join(data_path, f"{split}.json")
        spec = default if os.path.isfile(default) else os.path.join(data_path, f"{split}-*.tar")
    path = spec if os.path.isabs(spec) else os.path.join(data_path, spec)
    if path.endswith(".json"):
        if not os.path.isfile(path):
            raise DataError(f"shard index not found: {path}")
        return path, [], path
    if os.path.isdir(path):
        path = os.path.join(path, "*.tar")
    from braceexpand import braceexpand  # here: folder and zip training do not need it

    shards = sorted({p for pattern in braceexpand(path) for p in (glob.glob(pattern) or [pattern])})
    missing = [p for p in shards if not os.path.isfile(p)]
    if missing or not shards:
        raise DataError(f"no shard matches {path}" + (f" ({missing[0]} does not exist)" if missing else ""))
    return None, shards, path


def _read_index(path: str) -> tuple[list[str], list[dict[str, Any]], list[str] | None]:
    """``(shard paths, shardlist entries, class names)`` of an index JSON, checked."""
    try:
        with open(path) as f:
            index = json.load(f)
        shardlist = index["shardlist"]
        assert isinstance(shardlist, list)
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise DataError(f"{path}: not a shard index ({first_line(e)}); expected a wids JSON with a shardlist") from None
    if not shardlist:
        raise DataError(f"{path}: empty shardlist (no shard)")
    folder = os.path.dirname(path)
    shards = []
    for n, entry in enumerate(shardlist):
        url = entry.get("url") if isinstance(entry, dict) else None
        if not isinstance(url, str) or "://" in url or url.startswith("pipe:"):
            raise DataError(f"{path}: shard {n} has no local 'url' (only files on a mounted filesystem are read)")
        shards.append(url if os.path.isabs(url) else os.path.join(folder, url))
    classes = index.get("classes")
    return shards, shardlist, [str(c) for c in classes] if isinstance(classes, list) else None


class ShardDataset(KeyedImageDataset):
    """One split of WebDataset shards, indexed for random access; see the module docstring.

    ``source``: an index JSON or the list of shard paths (``resolve_shards``). ``native_classes``:
    names of the ``.cls`` values when the index has none (the val split passes the train split's);
    without names anywhere they are ``'0'``, ``'1'``, ... up to ``num_classes`` (``MODEL.NUM_CLASSES``;
    a larger label is an error naming its member), or else up to the largest label.
    """

    def __init__(
        self,
        source: str | list[str],
        transform: Callable | None = None,
        *,
        native_classes: list[str] | None = None,
        num_classes: int | None = None,
        class_map: list[str] | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self.num_dropped = 0  # samples left out at start-up (no label, bad label, truncated) when skipping
        if isinstance(source, str):
            self.root = source
            self.shards, entries, index_classes = _read_index(source)
        else:
            self.root = source[0] if len(source) == 1 else f"{os.path.dirname(source[0])} ({len(source)} shards)"
            self.shards, entries, index_classes = list(source), [None] * len(source), None
        entries = [self._checked_entry(path, entry) for path, entry in zip(self.shards, entries)]
        labels = np.concatenate([np.asarray(e["labels"], dtype=np.int64) for e in entries])
        if index_classes is not None:
            self.native_classes = index_classes
        elif native_classes is not None:
            self.native_classes = list(native_classes)
        elif num_classes is not None:
            self.native_classes = [str(k) for k in range(num_classes)]
        else:
            self.native_classes = [str(k) for k in range(int(labels.max(initial=-1)) + 1)]
        self.classes = list(class_map) if class_map is not None else list(self.native_classes)
        shard_of = np.concatenate([np.full(len(e["labels"]), n, dtype=np.int32) for n, e in enumerate(entries)])
        offsets = np.concatenate([np.asarray(e["offsets"], dtype=np.int64) for e in entries])
        sizes = np.concatenate([np.asarray(e["sizes"], dtype=np.int64) for e in entries])

        in_range = (labels >= 0) & (labels < len(self.native_classes))
        if not in_range.all():
            first = int(np.flatnonzero(~in_range)[0])
            problem = (
                f"label {labels[first]} outside 0..{len(self.native_classes) - 1} ({len(self.native_classes)} classes)"
            )
            self._problem(self.shards[shard_of[first]], offsets[first], problem, count=int((~in_range).sum()))
        to_label = relabel(self.native_classes, class_map, self.root)
        new_labels = np.where(in_range, to_label[np.clip(labels, 0, len(to_label) - 1)], -1)
        keep = new_labels >= 0
        if not keep.any():
            raise DataError(f"{self.root}: no sample left to use (all skipped or outside DATA.CLASS_MAP)")
        self._shard, self._offset, self._size = shard_of[keep], offsets[keep], sizes[keep]
        self.targets = new_labels[keep]
        if self.num_dropped:
            logger.warning("%s: %d sample(s) left out (see the warnings above)", self.root, self.num_dropped)
        self._init_bad_image_flags(skip_bad_images)
        self._files: OrderedDict[int, int] = OrderedDict()
        self._files_pid = -1

    def _problem(self, shard: str, offset: int | None, reason: str, member: str | None = None, count: int = 1) -> None:
        """A sample that cannot be used: a one-line error, or counted and logged when skipping."""
        name = member or (self._member_name(shard, offset) if offset is not None else "?")
        if not self.skip_bad_images:
            raise DataError(f"{shard}:{name}: {reason}; set DATA.SKIP_BAD_IMAGES True to skip such samples")
        self.num_dropped += count
        logger.warning("skipping %d sample(s) of %s (first: %s: %s)", count, shard, name, reason)

    def _checked_entry(self, path: str, entry: dict[str, Any] | None) -> dict[str, Any]:
        """The shard's offsets/sizes/labels, from the index or a scan, checked against the file."""
        if not os.path.isfile(path):
            raise DataError(f"shard not found: {path}" + (f" (listed in {self.root})" if entry else ""))
        if entry is None or "offsets" not in entry:
            start = time.time()
            scanned, problems = scan_shard(path)
            logger.info(
                "%s: indexed %d samples by reading its tar headers in %.1f s (no offsets in an index; "
                "tools/make_shards.py --index-only writes them once)",
                path,
                scanned["nsamples"],
                time.time() - start,
            )
            for member, reason in problems:
                self._problem(path, None, reason, member=member)
            return scanned
        try:
            n = int(entry["nsamples"])
            columns = {k: entry[k] for k in ("offsets", "sizes", "labels")}
            assert all(len(v) == n for v in columns.values())
        except (KeyError, TypeError, ValueError, AssertionError):
            raise DataError(
                f"{self.root}: the entry of {path} needs offsets, sizes and labels of nsamples each"
            ) from None
        actual, indexed = os.path.getsize(path), int(entry.get("filesize", -1))
        if indexed >= 0 and actual > indexed:
            raise DataError(
                f"{path}: {actual} bytes but {self.root} says {indexed}: the shard changed after it was "
                "indexed; rebuild the index (tools/make_shards.py --index-only)"
            )
        ends = np.asarray(columns["offsets"], dtype=np.int64) + np.asarray(columns["sizes"], dtype=np.int64)
        cut = np.flatnonzero(ends > actual)
        if len(cut):
            reason = f"cut off: the shard has {actual} of {indexed} bytes (truncated)"
            self._problem(path, int(columns["offsets"][cut[0]]), reason, count=len(cut))
            keep = ends <= actual
            columns = {k: [v for v, ok in zip(values, keep) if ok] for k, values in columns.items()}
        return columns

    @staticmethod
    def _member_name(shard: str, offset: int) -> str:
        """The tar member whose data starts at ``offset`` (its header is the 512 bytes before)."""
        try:
            with open(shard, "rb") as f:
                f.seek(offset - tarfile.BLOCKSIZE)
                header = f.read(tarfile.BLOCKSIZE)
            return tarfile.TarInfo.frombuf(header, tarfile.ENCODING, "surrogateescape").name
        except (OSError, tarfile.TarError, ValueError):
            return f"<member at byte {offset}>"

    def _fd(self, shard: int) -> int:
        """A read-only descriptor of shard ``shard``, from this process's small LRU of open files."""
        if self._files_pid != os.getpid():  # a forked worker: the parent's descriptors stay the parent's
            self._files, self._files_pid = OrderedDict(), os.getpid()
        fd = self._files.pop(shard, None)
        if fd is None:
            fd = os.open(self.shards[shard], os.O_RDONLY)
            if len(self._files) >= _MAX_OPEN_SHARDS:
                os.close(self._files.popitem(last=False)[1])
        self._files[shard] = fd
        return fd

    def encoded_bytes(self, index: int) -> bytes:
        """The image file's bytes of sample ``index`` (one ``pread``)."""
        size = int(self._size[index])
        data = os.pread(self._fd(int(self._shard[index])), size, int(self._offset[index]))
        if len(data) != size:
            raise OSError(f"short read: {len(data)} of {size} bytes (the shard was truncated or changed)")
        return data

    def _read(self, index: int) -> tuple[Image.Image, int]:
        return decode_rgb(self.encoded_bytes(index)), int(self.targets[index])

    def sample_name(self, index: int) -> str:
        shard = self.shards[int(self._shard[index])]
        return f"{shard}:{self._member_name(shard, int(self._offset[index]))}"

    def __getstate__(self) -> dict[str, Any]:
        # Spawned workers get the dataset pickled: without this process's descriptors.
        state = dict(self.__dict__)
        state["_files"], state["_files_pid"] = OrderedDict(), -1
        return state
