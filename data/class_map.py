"""``DATA.CLASS_MAP``: a label space given as a text file of class names, one per line.

With a map, label ``k`` means the map's line ``k`` whatever the data calls it, for every format:
class folders, zip map classes and shard classes that the map does not name are skipped (a
100-class subset of an ImageNet tree trains without copying it), and the train and val splits
may each hold only part of the map. ``check_class_coverage`` says which gaps are allowed.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np

from utils.errors import DataError

logger = logging.getLogger(__name__)


def read_class_map(path: str) -> list[str]:
    """Class names in label order; blank lines are ignored, a repeated name is an error."""
    if not os.path.isfile(path):
        raise DataError(f"class map not found: {path} (DATA.CLASS_MAP)")
    names: list[str] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            name = line.strip()
            if not name:
                continue
            if name in seen:
                raise DataError(f"{path}:{lineno}: class '{name}' repeats line {seen[name]} (DATA.CLASS_MAP)")
            seen[name] = lineno
            names.append(name)
    if not names:
        raise DataError(f"class map {path} names no class (DATA.CLASS_MAP: one class name per line)")
    return names


def relabel(native_names: Sequence[str], class_map: Sequence[str] | None, source: str) -> np.ndarray:
    """``new_label[native_label]``: the map's index of each native class name, -1 where the map
    does not name it (those samples are skipped, and logged here). Without a map: the identity."""
    if class_map is None:
        return np.arange(len(native_names), dtype=np.int64)
    index = {name: i for i, name in enumerate(class_map)}
    table = np.array([index.get(name, -1) for name in native_names], dtype=np.int64)
    log_skipped_classes(source, [name for name, new in zip(native_names, table) if new < 0])
    return table


def log_skipped_classes(source: str, names: Sequence[str]) -> None:
    """One log line for the classes of ``source`` that DATA.CLASS_MAP leaves out (if any)."""
    if names:
        more = ", ..." if len(names) > 5 else ""
        logger.info(
            "%s: %d class(es) not in DATA.CLASS_MAP are skipped (%s%s)", source, len(names), ", ".join(names[:5]), more
        )


def check_class_coverage(train, val, class_map_path: str) -> None:
    """Which classes of the map may have no images: any in val (ImageNet-V2/-A/-R-style val sets
    hold only some classes); in train only those absent from the data entirely (warned), since a
    val class that training never saw is a mistake (a typo in the map or a missing folder)."""
    num_classes = len(train.classes)
    in_train = np.bincount(np.asarray(train.targets, dtype=np.int64), minlength=num_classes) > 0
    in_val = np.bincount(np.asarray(val.targets, dtype=np.int64), minlength=num_classes) > 0
    val_only = np.flatnonzero(in_val & ~in_train)
    if len(val_only):
        name = train.classes[int(val_only[0])]
        raise DataError(
            f"class '{name}' of DATA.CLASS_MAP {class_map_path} has images in {val.root} but none in "
            f"{train.root} ({len(val_only)} such class(es)); fix the map or the train data"
        )
    unused = np.flatnonzero(~in_train & ~in_val)
    if len(unused):
        logger.warning(
            "%d class(es) of DATA.CLASS_MAP %s have no images in train or val (%s%s): their logits never train",
            len(unused),
            class_map_path,
            ", ".join(train.classes[int(i)] for i in unused[:5]),
            ", ..." if len(unused) > 5 else "",
        )
