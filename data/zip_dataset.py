"""Zipped ImageNet in the Swin-Transformer layout, optionally held in RAM (``DATA.FORMAT zip``).

    DATA_PATH/train.zip      the images (members STORED: JPEG bytes as they were)
    DATA_PATH/train_map.txt  one '<path inside the zip>\\t<class index>' line per image
    DATA_PATH/val.zip, DATA_PATH/val_map.txt

The unofficial MOAT port's maps name the zip too ('train.zip@/n01440764/x.JPEG\\t0'): the part up to
'.zip@' is dropped, as that port did (the split's own zip is read). An existing Swin or MOAT zip
dataset works unchanged; ``tools/make_zip_dataset.py`` builds one from a class-folder tree.
Reading one zip instead of 1.28M small files is what makes this fast on NFS/Lustre. Class names
come from the train map's directory components (``n01440764/x.JPEG``); val maps (flat in Swin's
layout) use the train map's names for their class indices.

``DATA.CACHE_MODE``: ``no`` reads members on demand through one ``zipfile.ZipFile`` per process,
opened lazily (a handle is never shared across fork); ``full`` keeps every image's encoded bytes in
RAM on every rank; ``part`` keeps only this rank's fixed subset (``samplers.rank_subset``) and
the train sampler then draws only from it (``samplers.RankSubsetSampler``), as Swin's
``CachedImageFolder`` + ``SubsetRandomSampler`` do. The cache is one numpy buffer, shared with
forked loader workers page by page without copies.
"""

from __future__ import annotations

import logging
import os
import posixpath
import time
import zipfile
from typing import Any, Callable

import numpy as np
from PIL import Image

from utils.errors import DataError

from .class_map import relabel
from .datasets import KeyedImageDataset, decode_rgb, first_line
from .samplers import rank_subset

logger = logging.getLogger(__name__)

CACHE_MODES = ("no", "part", "full")


def read_zip_map(path: str) -> list[tuple[str, int, int]]:
    """``(member, class index, line number)`` per line of a Swin map file (or of the MOAT port's,
    whose paths start with '<name>.zip@')."""
    if not os.path.isfile(path):
        raise DataError(f"zip map not found: {path} (expected '<path inside the zip>\\t<class index>' lines)")
    entries = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not parts[1].strip().lstrip("-").isdigit():
                raise DataError(f"{path}:{lineno}: expected '<path inside the zip>\\t<class index>', got {line!r}")
            member = parts[0].split(".zip@", 1)[-1]  # the port's 'train.zip@/class/x.png'
            entries.append((member.lstrip("/"), int(parts[1]), lineno))
    if not entries:
        raise DataError(f"zip map {path} lists no image")
    return entries


def class_names_from_map(entries: list[tuple[str, int, int]], path: str) -> list[str]:
    """Name of each class index: the last directory component of its members' paths
    (``str(index)`` for classes whose paths have none). Indices run 0..max."""
    names: dict[int, tuple[str, int]] = {}
    for member, label, lineno in entries:
        folder = posixpath.basename(posixpath.dirname(member))
        if not folder or label < 0:
            continue
        known = names.setdefault(label, (folder, lineno))
        if known[0] != folder:
            raise DataError(
                f"{path}:{lineno}: class {label} is in folder '{folder}' here but in '{known[0]}' at line "
                f"{known[1]}: class names are read from the folders, so a class needs one folder"
            )
    num_classes = max(label for _, label, _ in entries) + 1
    return [names.get(k, (str(k), 0))[0] for k in range(num_classes)]


class ZipImageDataset(KeyedImageDataset):
    """One split of a Swin-layout zip dataset; see the module docstring.

    ``native_classes``: names of the map's class indices (the val split passes the train split's
    ``native_classes``); default: read from the map's directories. ``class_map``: the label space
    (``DATA.CLASS_MAP``); classes outside it are skipped. ``rank``/``world_size`` choose the part
    cached under ``cache_mode='part'``.
    """

    def __init__(
        self,
        zip_path: str,
        map_path: str,
        transform: Callable | None = None,
        *,
        native_classes: list[str] | None = None,
        class_map: list[str] | None = None,
        cache_mode: str = "no",
        rank: int = 0,
        world_size: int = 1,
        skip_bad_images: bool = False,
    ) -> None:
        if cache_mode not in CACHE_MODES:
            raise ValueError(f"cache_mode {cache_mode!r} not in {CACHE_MODES}")
        if not os.path.isfile(zip_path):
            raise DataError(f"zip file not found: {zip_path} (DATA.FORMAT zip reads DATA_PATH/<split>.zip)")
        self.root = self.zip_path = zip_path
        self.map_path = map_path
        self.transform = transform
        self.cache_mode = cache_mode
        entries = read_zip_map(map_path)
        self.native_classes = native_classes or class_names_from_map(entries, map_path)
        self.classes = list(class_map) if class_map is not None else list(self.native_classes)
        self.num_dropped = 0  # map lines dropped (missing member, label out of range) under skip_bad_images

        members = self._zip_members()
        mapped = {member for member, _, _ in entries}
        unmapped = [m for m in members if m not in mapped]
        if unmapped:
            logger.warning(
                "%s: %d member(s) have no line in %s and are not used (first: %s)",
                zip_path,
                len(unmapped),
                map_path,
                unmapped[0],
            )
        to_label = relabel(self.native_classes, class_map, map_path)
        self.samples: list[tuple[str, int]] = []
        self._sizes = []
        for member, label, lineno in entries:
            problem = None
            if not 0 <= label < len(self.native_classes):
                problem = f"class index {label} outside 0..{len(self.native_classes) - 1}"
            elif to_label[label] < 0:
                continue  # a class outside DATA.CLASS_MAP (logged once by relabel)
            elif member not in members:
                problem = f"'{member}' is not in {zip_path}"
            if problem:
                if not skip_bad_images:
                    raise DataError(f"{map_path}:{lineno}: {problem}; set DATA.SKIP_BAD_IMAGES True to skip such lines")
                self.num_dropped += 1
                continue
            self.samples.append((member, int(to_label[label])))
            self._sizes.append(members[member])
        if self.num_dropped:
            logger.warning(
                "%s: skipped %d line(s) naming a missing member or an unknown class", map_path, self.num_dropped
            )
        if not self.samples:
            raise DataError(f"{map_path}: no image left to use (all lines skipped or outside DATA.CLASS_MAP)")
        self.targets = [t for _, t in self.samples]
        self._init_bad_image_flags(skip_bad_images)
        self._handle: zipfile.ZipFile | None = None
        self._handle_pid = -1
        cached = {
            "no": np.empty(0, dtype=np.int64),
            "part": rank_subset(len(self.samples), world_size, rank),
            "full": np.arange(len(self.samples)),
        }[cache_mode]
        self._fill_cache(cached)

    def _zip_members(self) -> dict[str, int]:
        """``{member: uncompressed size}`` of the files in the zip (one-line error when unreadable)."""
        try:
            with zipfile.ZipFile(self.zip_path) as zf:
                return {info.filename: info.file_size for info in zf.infolist() if not info.is_dir()}
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise DataError(
                f"{self.zip_path}: not a readable zip file ({first_line(e)}); truncated or damaged? "
                "rebuild it (tools/make_zip_dataset.py)"
            ) from None

    def _fill_cache(self, indices: np.ndarray) -> None:
        """Read the encoded bytes of ``indices`` into one buffer; ``_slot[i]`` is -1 when not cached."""
        self._slot = np.full(len(self.samples), -1, dtype=np.int64)
        sizes = np.asarray(self._sizes, dtype=np.int64)[indices]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._buffer = np.empty(int(self._offsets[-1]), dtype=np.uint8)
        if not len(indices):
            return
        start = time.time()
        logger.info(
            "%s: caching %d of %d images (%.2f GB) in RAM (DATA.CACHE_MODE %s)",
            self.zip_path,
            len(indices),
            len(self.samples),
            self._buffer.nbytes / 1e9,
            self.cache_mode,
        )
        step = max(10_000, len(indices) // 10)  # progress lines for big caches only
        with zipfile.ZipFile(self.zip_path) as zf:
            for slot, i in enumerate(indices.tolist()):
                try:
                    data = zf.read(self.samples[i][0])
                except Exception as e:  # BadZipFile (CRC), zlib.error, EOFError of a damaged member
                    if not self.skip_bad_images:
                        raise DataError(
                            f"unreadable image {self.sample_name(i)} ({first_line(e)}); "
                            "set DATA.SKIP_BAD_IMAGES True to skip such files"
                        ) from None
                    self._bad[i] = 1
                    logger.warning("skipping unreadable image %s (%s)", self.sample_name(i), first_line(e))
                    continue
                self._buffer[self._offsets[slot] : self._offsets[slot + 1]] = np.frombuffer(data, dtype=np.uint8)
                self._slot[i] = slot
                if (slot + 1) % step == 0 and slot + 1 < len(indices):
                    logger.info("%s: cached %d / %d images", self.zip_path, slot + 1, len(indices))
        logger.info("%s: cache filled in %.1f s", self.zip_path, time.time() - start)

    @property
    def cached_indices(self) -> np.ndarray:
        """Dataset indices held in RAM by this process."""
        return np.flatnonzero(self._slot >= 0)

    def _zip(self) -> zipfile.ZipFile:
        """This process's own handle: opened on first use, again in each forked worker."""
        if self._handle is None or self._handle_pid != os.getpid():
            self._handle = zipfile.ZipFile(self.zip_path)
            self._handle_pid = os.getpid()
        return self._handle

    def encoded_bytes(self, index: int) -> bytes | memoryview:
        """The image file's bytes of sample ``index``, from the cache or the zip."""
        slot = self._slot[index]
        if slot >= 0:
            return memoryview(self._buffer[self._offsets[slot] : self._offsets[slot + 1]])
        return self._zip().read(self.samples[index][0])

    def _read(self, index: int) -> tuple[Image.Image, int]:
        return decode_rgb(self.encoded_bytes(index)), self.samples[index][1]

    def sample_name(self, index: int) -> str:
        return f"{self.zip_path}:{self.samples[index][0]}"

    def __getstate__(self) -> dict[str, Any]:
        # Spawned workers get the dataset pickled: without the open handle (they open their own).
        state = dict(self.__dict__)
        state["_handle"], state["_handle_pid"] = None, -1
        return state
