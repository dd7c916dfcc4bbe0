"""Image datasets with one-line errors for bad data, and per-sample seeded augmentation.

``KeyedImageDataset`` is what every format shares (class folders here, Swin-style zips in
``data.zip_dataset``, tar shards in ``data.shards``); ``ClassFolderDataset`` is torchvision's
``ImageFolder`` on top of it. All of them give the trainer three things:

* every data problem (missing path or split, no class folders, an empty class folder, an
  unreadable or truncated image) is a ``DataError`` whose message is one line naming the path;
* with ``skip_bad_images`` an unreadable file is replaced by the next readable index
  (deterministic), and each bad file is logged once and counted across loader workers;
* a key ``(index, seed)`` (what ``ResumableSampler`` yields) runs the random transform under
  RNGs seeded from ``seed`` alone, so a sample's augmentation does not depend on the worker, the
  number of workers or how many samples came before it: a run resumed mid-epoch draws exactly
  the augmentations the uninterrupted run would have drawn.
"""

from __future__ import annotations

import io
import logging
import os
import random
from typing import Any, BinaryIO, Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, get_worker_info
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from utils.errors import DataError

from .class_map import log_skipped_classes

logger = logging.getLogger(__name__)

# The key the training sampler yields: (dataset index, per-sample augmentation seed).
SampleKey = tuple[int, int]


class _SeededRNG:
    """Seed python/numpy/torch-CPU global RNGs for one sample; in the main process, restore them.

    timm's transforms draw from the global RNGs (``random``, ``np.random``, ``torch``), so
    seeding them is the only way to make them reproducible. Restoring afterwards keeps a
    ``NUM_WORKERS=0`` loader from disturbing the main process's RNG streams (dropout, Mixup);
    worker processes skip it (their RNGs serve nothing else, and saving costs ~0.2 ms/sample).
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._states = None

    def __enter__(self) -> None:
        if get_worker_info() is None:
            self._states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(self.seed)
        np.random.seed(self.seed % (1 << 32))
        # Only the CPU generator: torch.manual_seed also seeds every accelerator (~0.5 ms).
        torch.default_generator.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        if self._states is not None:
            py_state, np_state, torch_state = self._states
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.set_rng_state(torch_state)


_EXIF_ORIENTATION = 0x0112


def load_rgb(path: str) -> Image.Image:
    """Decode an image file to an RGB ``PIL.Image`` (see :func:`decode_rgb`)."""
    with open(path, "rb") as f:
        return decode_rgb(f)


def decode_rgb(data: bytes | BinaryIO) -> Image.Image:
    """Decode encoded image bytes (or an open binary file) to an RGB ``PIL.Image``, whatever
    mode the image holds.

    torchvision's ``default_loader`` is ``Image.open(path).convert("RGB")``, which is right for
    8-bit modes (L, LA, P with transparency, RGBA, CMYK) but clips 16-bit and 32-bit images
    (16-bit PNG opens as I;16 or I) to white, and ignores the camera's EXIF orientation. Here
    such images are scaled to 8 bits first, and EXIF-rotated photos are turned upright, as
    image viewers show them.
    """
    img = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data)
    if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _to_8bit(img)
    return img.convert("RGB")


def _to_8bit(img: Image.Image) -> Image.Image:
    """A high-bit-depth grayscale image (I;16*, I, F) as 8-bit L, scaled from the 16-bit range.

    Integer images are taken as 16-bit (0..65535, what PNG and most TIFFs store); float images
    in [0, 1] are scaled by 255, other float ranges are clipped.
    """
    pixels = np.asarray(img)
    if img.mode == "F":
        scale = 255.0 if float(pixels.max(initial=0.0)) <= 1.0 else 1.0
        pixels = pixels.astype(np.float64) * scale
    else:
        pixels = pixels.astype(np.float64) / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="L")


def _check_split_dir(root: str) -> None:
    """Raise a DataError naming ``root`` when it is missing or holds no class folders."""
    if not os.path.isdir(root):
        raise DataError(f"split folder not found: {root} (DATA.TRAIN_SPLIT / DATA.VAL_SPLIT)")
    if not any(e.is_dir() for e in os.scandir(root)):
        raise DataError(f"no class folders in {root} (expected {root}/<class name>/<images>)")


def first_line(error: BaseException) -> str:
    """``Type: first line of the message``: what a one-line data error quotes of its cause."""
    text = str(error)
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


class KeyedImageDataset(Dataset):
    """What every training format shares: ``(index, seed)`` keys, bad-image skipping, errors.

    A subclass fills ``self.targets`` (one label per image, its length is the dataset's),
    ``self.classes`` (names in label order) and ``self.root`` (what the data is, for
    messages), calls :meth:`_init_bad_image_flags`, and implements :meth:`_read` (decode one
    sample) and :meth:`sample_name` (``file`` or ``file:member``, for messages).

    Indexing takes an int (transform uses the current global RNGs) or a ``(index, seed)`` key
    (transform runs under RNGs seeded from ``seed``; see the module docstring). Returns
    ``(image, target)`` with ``image`` whatever ``transform`` makes ([3, H, W] tensors with ours).
    """

    transform: Callable | None = None
    target_transform: Callable | None = None
    skip_bad_images: bool = False

    def _init_bad_image_flags(self, skip_bad_images: bool) -> None:
        self.skip_bad_images = skip_bad_images
        # One flag per sample in shared memory: DataLoader workers (forked or spawned) see and
        # set the same flags, so a bad file is logged once per process group and counted here.
        self._bad = torch.zeros(len(self), dtype=torch.uint8).share_memory_()

    def __len__(self) -> int:
        return len(self.targets)

    def _read(self, index: int) -> tuple[Image.Image, int]:
        """The decoded RGB image and target of ``index``; raises whatever reading or decoding raises."""
        raise NotImplementedError

    def sample_name(self, index: int) -> str:
        """Where sample ``index`` lives: a path, or ``archive:member``."""
        raise NotImplementedError

    @property
    def num_skipped(self) -> int:
        """How many distinct files were found unreadable and skipped so far."""
        return int(self._bad.sum())

    @property
    def skipped_files(self) -> list[str]:
        """Names (see :meth:`sample_name`) of the files skipped so far."""
        return [self.sample_name(i) for i in torch.nonzero(self._bad).flatten().tolist()]

    def _load(self, index: int) -> tuple[Any, int]:
        """The decoded image and target of ``index``, or of the next readable sample when skipping."""
        n = len(self)
        for offset in range(n):
            i = (index + offset) % n
            if self._bad[i]:
                continue
            try:
                return self._read(i)
            except Exception as e:  # decoders raise OSError, ValueError, SyntaxError, zipfile.BadZipFile, ...
                name = self.sample_name(i)
                if not self.skip_bad_images:
                    raise DataError(
                        f"unreadable image {name} ({first_line(e)}); set DATA.SKIP_BAD_IMAGES True to skip such files"
                    ) from e
                self._bad[i] = 1
                logger.warning(
                    "skipping unreadable image %s (%s); %d skipped so far", name, first_line(e), self.num_skipped
                )
        raise DataError(f"no readable image left in {self.root}")

    def __getitem__(self, key: int | SampleKey) -> tuple[Any, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        sample, target = self._load(index)
        if self.transform is not None:
            if seed is None:
                sample = self.transform(sample)
            else:
                with _SeededRNG(seed):
                    sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target


class ClassFolderDataset(KeyedImageDataset, ImageFolder):
    """``ImageFolder`` whose data problems are one-line ``DataError``s naming the path.

    With ``class_map`` (class names in label order, ``DATA.CLASS_MAP``) the labels follow the map:
    folders whose name is not in it are skipped (logged), and map classes without a folder have
    no images here (``data.class_map.check_class_coverage`` decides whether that is allowed).
    """

    def __init__(
        self,
        root: str,
        transform: Callable | None = None,
        skip_bad_images: bool = False,
        class_map: list[str] | None = None,
    ) -> None:
        _check_split_dir(root)
        self.class_map = class_map
        super().__init__(root, transform=transform, loader=load_rgb, allow_empty=True)
        counts = np.bincount([t for _, t in self.samples], minlength=len(self.classes))
        present = {e.name for e in os.scandir(root) if e.is_dir()}
        empty = [c for c, n in zip(self.classes, counts) if n == 0 and c in present]
        if empty:
            raise DataError(f"empty class folder (no {'/'.join(IMG_EXTENSIONS)} files): {os.path.join(root, empty[0])}")
        self._init_bad_image_flags(skip_bad_images)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        """ImageFolder's sorted class folders, or the class map (folders not in it are skipped)."""
        if self.class_map is None:
            return super().find_classes(directory)
        log_skipped_classes(
            directory, sorted(e.name for e in os.scandir(directory) if e.is_dir() and e.name not in self.class_map)
        )
        return list(self.class_map), {name: i for i, name in enumerate(self.class_map)}

    def _read(self, index: int) -> tuple[Image.Image, int]:
        path, target = self.samples[index]
        return self.loader(path), target

    def sample_name(self, index: int) -> str:
        return self.samples[index][0]


def check_same_classes(train: KeyedImageDataset, val: KeyedImageDataset) -> None:
    """Raise a DataError naming both splits and the first class that differs."""
    if train.classes == val.classes:
        return
    only_train = sorted(set(train.classes) - set(val.classes))
    only_val = sorted(set(val.classes) - set(train.classes))
    if not (only_train or only_val):
        raise DataError(f"{train.root} and {val.root} name the same classes in another order")
    first = min(only_train[:1] + only_val[:1])
    side, other = (train.root, val.root) if first in only_train else (val.root, train.root)
    raise DataError(
        f"class folders differ between {train.root} ({len(train.classes)} classes) "
        f"and {val.root} ({len(val.classes)} classes): first difference "
        f"'{first}' is in {side} but not in {other}"
    )
