"""Checkpoint files as files: atomic saves, safe loads, retention, RNG state. What a file holds
(the format) is ``checkpoints.py``'s business; this module only moves bytes and tensors.

Every load goes through ``load_file`` with ``torch.load(weights_only=True)`` (or safetensors), so
a file carrying pickled code is refused instead of executed. Every failure a user can cause
(missing file, not a checkpoint, truncated file, another variant's weights) becomes a
``UserError`` with one line that names the path.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from .errors import CheckpointWriteError, UserError

LAST = "last.pth"
BEST = "best.pth"
_EPOCH_RE = re.compile(r"^epoch_(\d+)\.pth$")


# ----------------------------------------------------------------------------------------- saving
def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temp file in the same directory, fsync, then rename over ``path``.

    A crash at any point leaves either the old file or the new one, never a torn file. A write
    that fails (disk full, quota, file size limit, a read-only file system, ``path`` taken by a
    folder) removes the temp file and raises ``CheckpointWriteError`` naming the path and the
    cause (for lack of space: how many bytes were needed and how many are free), instead of
    torch's ``inline_container.cc`` traceback.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        os_error = _os_error_in(e)
        if os_error is None:
            raise
        cause = os.strerror(os_error.errno)
        if os_error.errno in _SPACE_ERRNOS:
            cause += (
                f"; it needs about {_megabytes(tensor_bytes(obj))}, "
                f"{_megabytes(shutil.disk_usage(directory).free)} free in {directory}"
            )
        raise CheckpointWriteError(f"could not write {path}: {cause}") from e
    _fsync_dir(directory)


_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _os_error_in(e: BaseException) -> Optional[OSError]:
    """The OSError of a failed write, also when torch re-raised it as a RuntimeError (its file
    writer keeps the Python ``OSError`` only as the exception's context)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        e = e.__cause__ or e.__context__
    return None


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensor storages inside ``obj`` (nested dicts/lists), each storage once:
    about the size ``torch.save`` writes."""
    storages = {}

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    visit(obj)
    return sum(storages.values())


def _megabytes(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def atomic_link(src: str, dst: str) -> None:
    """Make ``dst`` a hard link to ``src`` (a copy where links are unsupported), atomically; a
    failure is a ``CheckpointWriteError`` naming ``dst`` (``src`` is intact)."""
    directory = os.path.dirname(os.path.abspath(dst))
    tmp = os.path.join(directory, f".{os.path.basename(dst)}.{os.getpid()}.tmp")
    try:
        if os.path.exists(tmp):
            os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dst)
    except OSError as e:
        if os.path.isfile(tmp):
            os.unlink(tmp)
        raise CheckpointWriteError(f"could not write {dst}: {e.strerror}") from e
    _fsync_dir(directory)


class CheckpointSaver:
    """Owns the files of one run: ``last.pth``, ``best.pth`` and the newest ``keep`` of
    ``epoch_{N}.pth`` (every ``save_freq`` epochs). ``best``/``epoch`` are hard links to the
    ``last`` file they were taken from, so a save writes the weights once."""

    def __init__(self, output_dir: str, save_freq: int, keep: int) -> None:
        self.output_dir = output_dir
        self.save_freq = save_freq
        self.keep = keep

    def save(self, state: Dict[str, Any], epoch: int, epoch_done: bool, is_best: bool) -> List[str]:
        """Write ``state``; returns the paths written. A failed write names the newest intact
        checkpoint in the error (the files already there are untouched)."""
        try:
            return self._save(state, epoch, epoch_done, is_best)
        except CheckpointWriteError as e:
            last = os.path.join(self.output_dir, LAST)
            intact = f"the newest intact checkpoint is {last}" if os.path.isfile(last) else "none was written yet"
            raise CheckpointWriteError(f"{e}; {intact}") from e.__cause__

    def _save(self, state: Dict[str, Any], epoch: int, epoch_done: bool, is_best: bool) -> List[str]:
        last = os.path.join(self.output_dir, LAST)
        atomic_save(state, last)
        written = [last]
        if epoch_done and is_best:
            atomic_link(last, os.path.join(self.output_dir, BEST))
            written.append(os.path.join(self.output_dir, BEST))
        if epoch_done and self.keep > 0 and (epoch + 1) % self.save_freq == 0:
            path = os.path.join(self.output_dir, f"epoch_{epoch}.pth")
            atomic_link(last, path)
            written.append(path)
            for old in self.epoch_checkpoints()[self.keep :]:
                os.unlink(old)
        return written

    def epoch_checkpoints(self) -> List[str]:
        """``epoch_{N}.pth`` files, newest epoch first."""
        found = []
        for name in os.listdir(self.output_dir):
            m = _EPOCH_RE.match(name)
            if m:
                found.append((int(m.group(1)), os.path.join(self.output_dir, name)))
        return [p for _, p in sorted(found, reverse=True)]


# ---------------------------------------------------------------------------------------- loading
def load_file(path: str, mmap: bool = False) -> Dict[str, Any]:
    """Load a checkpoint or weights file safely (``weights_only=True`` / safetensors) to CPU;
    ``mmap`` maps the tensors of a zip-format file instead of reading them."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise UserError(f"checkpoint path is a directory, not a file: {path}")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    head = _file_head(path)
    if not head.startswith((b"PK", b"\x80")):  # torch.save writes a zip archive (older: a pickle)
        looks = "an empty file" if not head else f"a file beginning {head[:16]!r}"
        raise UserError(f"{path}: not a PyTorch checkpoint ({looks}; a checkpoint is a zip archive)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and head.startswith(b"PK"))
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Unsupported global" in text or "Unsupported class" in text:
            raise PickledObjectsError(path, *_pickled_objects(path, text)) from None
        detail = text.split("WeightsUnpickler error:")[-1].strip() if "WeightsUnpickler" in text else text
        raise UserError(f"{path}: not a PyTorch checkpoint ({_first_line(detail)})") from None
    except Exception as e:  # noqa: BLE001 - parsing an arbitrary user file fails in arbitrary ways
        # (zip reader RuntimeError, EOFError, IndexError/TypeError from the unpickler on garbage):
        # each means "this file is not a checkpoint we can read".
        raise UserError(
            f"{path}: not a readable PyTorch checkpoint, truncated or corrupt? ({_first_line(e)})"
        ) from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a checkpoint (holds a {type(obj).__name__}, expected a dict)")
    return obj


class PickledObjectsError(UserError):
    """A file refused because it pickles Python objects (``weights_only=True``): which classes
    under which top-level keys (``culprits``: ``[(class, key)]``), and the weight names of its
    ``model`` entry, so that the format's owner can recognise whose checkpoint it is."""

    def __init__(self, path: str, culprits: List[Tuple[str, Optional[str]]], model_keys: List[str]) -> None:
        self.path, self.culprits, self.model_keys = path, culprits, model_keys
        super().__init__(
            f"{path}: refused to load: it holds {self.describe()}, Python objects beyond tensors and plain "
            "containers, which could run code (checkpoints are loaded with weights_only=True); if you trust the "
            "file, load it with weights_only=False yourself and save it again without them"
        )

    def describe(self) -> str:
        """``a pickled yacs.config.CfgNode under 'config'``."""
        found = [f"{name} under {key!r}" if key is not None else name for name, key in self.culprits]
        return "a pickled " + ", a pickled ".join(found) if found else "pickled Python objects"


_UNSUPPORTED_RE = re.compile(r"Unsupported (?:global|class):? (?:GLOBAL )?([\w.]+)")


def _pickled_objects(path: str, error: str) -> Tuple[List[Tuple[str, Optional[str]]], List[str]]:
    """Which refused classes a checkpoint pickles, under which of its top-level keys, and the weight
    names of its ``model`` entry: its pickle is replayed with every class replaced by an inert
    stand-in (nothing is imported or run, no tensor is read). Best effort: a file this cannot
    replay gives the class torch named in ``error``."""
    try:
        refused = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - an older torch, or a legacy (non-zip) file
        refused = set()
    named = _UNSUPPORTED_RE.search(error)
    if named:
        refused.add(named.group(1))
    try:
        obj = _replay_pickle(path)
    except Exception:  # noqa: BLE001 - a damaged or legacy file: name what torch named
        return [(name, None) for name in sorted(refused)], []
    culprits: List[Tuple[str, Optional[str]]] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            for name in sorted(_stand_in_names(value) & refused):
                culprits.append((name, str(key)))
    model = obj.get("model") if isinstance(obj, dict) else None
    model_keys = [k for k in model if isinstance(k, str)] if isinstance(model, dict) else []
    return culprits or [(name, None) for name in sorted(refused)], model_keys


class _StandIn(dict):
    """What every pickled class becomes during a replay: records its name, accepts any arguments,
    items and state, and does nothing."""

    qualname = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_StandIn":
        self = dict.__new__(cls)
        self.state = list(args)  # NEWOBJ calls __new__ alone
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state.append(state)

    def append(self, item: Any) -> None:
        self.state.append(item)

    def extend(self, items: Any) -> None:
        self.state.extend(items)


class _ReplayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> type:
        return type("StandIn", (_StandIn,), {"qualname": f"{module}.{name}"})

    def persistent_load(self, pid: Any) -> None:  # tensor storages: not read
        return None


def _replay_pickle(path: str) -> Any:
    import io
    import zipfile

    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
        data = archive.read(name)
    return _ReplayUnpickler(io.BytesIO(data)).load()


def _stand_in_names(value: Any, depth: int = 0) -> set:
    """The class names of the stand-ins inside ``value`` (nested containers and their state)."""
    if depth > 50:
        return set()
    names = set()
    if isinstance(value, _StandIn):
        names.add(value.qualname)
        for item in value.state:
            names |= _stand_in_names(item, depth + 1)
    if isinstance(value, dict):
        for item in value.values():
            names |= _stand_in_names(item, depth + 1)
    elif isinstance(value, (list, tuple, set)):
        for item in value:
            names |= _stand_in_names(item, depth + 1)
    return names


def _file_head(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(16)
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None


def _first_line(e: BaseException) -> str:
    """The first line of ``e``'s message, with its type when the message alone says little
    (``KeyError(101)`` from the unpickler reads "101")."""
    text = (str(e).strip() or type(e).__name__).splitlines()[0][:200]
    return text if len(text) > 24 else f"{type(e).__name__}: {text}"


def _classifier_keys(model: nn.Module) -> List[str]:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    for name, module in model.named_modules():
        if module is head:
            return [f"{name}.{p}" for p, _ in module.named_parameters()]
    return []


def load_model_weights(
    model: nn.Module, state_dict: Dict[str, torch.Tensor], source: str, drop_mismatched_head: bool = False
) -> List[str]:
    """Load ``state_dict`` into ``model``; returns the head keys dropped (fine-tuning on new classes).

    Any other difference (shape, missing or unexpected keys: usually a checkpoint of another
    variant) is a ``UserError`` that lists the keys.
    """
    own = model.state_dict()
    state_dict = dict(state_dict)
    dropped = []
    if drop_mismatched_head:
        for key in _classifier_keys(model):
            if key in state_dict and state_dict[key].shape != own[key].shape:
                dropped.append(key)
                del state_dict[key]
    mismatched = [
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    missing = [k for k in own if k not in state_dict and k not in dropped]
    unexpected = [k for k in state_dict if k not in own]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): " + "; ".join(mismatched[:6]))
    if missing:
        problems.append(f"{len(missing)} missing key(s): " + ", ".join(missing[:6]))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): " + ", ".join(unexpected[:6]))
    if problems:
        more = " ..." if max(len(mismatched), len(missing), len(unexpected)) > 6 else ""
        raise UserError(
            f"{source}: weights do not fit the model (another variant or class count?): " + " | ".join(problems) + more
        )
    model.load_state_dict(state_dict, strict=not dropped)
    return dropped


# ----------------------------------------------------------------------------------------- RNG
def capture_rng_state(device: torch.device) -> Dict[str, Any]:
    """Python, NumPy, torch CPU and (current) CUDA generator states, as plain containers and
    tensors so the checkpoint still loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def restore_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    """Inverse of ``capture_rng_state``."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
