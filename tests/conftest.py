"""Shared fixtures for the trainer tests: a tiny PNG class-folder tree, a tiny-config writer,
a ``main.py`` subprocess runner, one reference 2-epoch run reused by several test files, and the
readers of what a run writes (summary.csv, logs, checkpoints)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

# oneDNN's AVX-512 kernels are JIT-compiled per new tensor shape, which costs seconds per shape on
# some CPUs (seen on AMD EPYC CI-class VMs); AVX2 kernels compile in milliseconds. Set before torch
# is imported so in-process runs and the subprocesses (they inherit the environment) both use it.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
# One thread per process: the tiny test model gains nothing from more, and OpenMP threads that
# spin-wait on a busy 2-core runner make steps 10-50x slower. The subprocesses inherit it, and
# equal thread counts keep the bit-exact resume comparisons meaningful.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
import torch.distributed as dist

# Without a GPU, Triton kernels (models/fused_depthwise.py) run on CPU tensors through Triton's
# interpreter; triton reads this when it is first imported (timm imports it), so it is set here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import yaml
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import main as trainer_cli  # noqa: E402
from config import get_config, with_values  # noqa: E402
from data import build_loader  # noqa: E402
from engine import Feed  # noqa: E402
from logger import close_logger, create_logger  # noqa: E402
from models import build_model  # noqa: E402
from tools.make_shards import make_shards  # noqa: E402 (the repository is on sys.path from here)
from tools.make_zip_dataset import make_zip_dataset  # noqa: E402
from utils.amp import autocast_factory  # noqa: E402
from utils.distributed import init_distributed  # noqa: E402

CLASSES = ["red", "green", "blue"]
COLORS = [(220, 40, 40), (40, 220, 40), (40, 40, 220)]

# Tiny but complete: RandAugment, Mixup and EMA stay on (the defaults), and random erasing and
# CutMix, which the ImageNet recipe leaves off, are switched on, so the bit-exact resume tests
# exercise every random stream; loader workers are on (persistent, as by default), so signals and
# kills meet the processes a real run has. 8 train images per class at batch 4 give 6 steps per
# epoch; 3 val images per class (9, odd) give unequal shards on 2 ranks.
TINY_CONFIG = {
    "BASE": [os.path.join(REPO, "configs", "tiny_moat_0.yaml")],
    # CROP_PCT: the 0.875 the tests count with (tiny_moat_0.yaml's 0.8888 is its crop at 256 px).
    "DATA": {
        "IMG_SIZE": 32,
        "CROP_PCT": 0.875,
        "NUM_WORKERS": 2,
        "DATASET": "imagefolder",
        "BATCH_SIZE": 4,
        "PIN_MEMORY": False,
    },
    "MODEL": {"NUM_CLASSES": 3},
    "AUG": {"REPROB": 0.25, "CUTMIX": 1.0},
    # BASE_LR is per 512 images: 0.1 x 4 / 512 = 7.8e-4 at batch 4.
    "TRAIN": {"EPOCHS": 2, "WARMUP_EPOCHS": 1, "BASE_LR": 0.1, "MIN_LR": 1e-3, "WARMUP_LR": 1e-4},
    "AMP": "off",
    "PRINT_FREQ": 1,
    "SEED": 0,
}


def make_image_tree(
    root: str, train_per_class: int = 8, val_per_class: int = 3, classes=CLASSES, size: int = 40
) -> str:
    """Noisy solid-colour PNGs, one colour per class (learnable in a few steps)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name, color in zip(classes, COLORS):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                pixels = np.asarray(color)[None, None, :] + rng.normal(0, 30, (size, size, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i}.png"))
    return root


def write_every_image_mode(folder, seed: int = 0) -> dict[str, str]:
    """One image file per mode a user's folder may hold (L, LA, P with transparency, RGBA, CMYK
    JPEG, 16-bit PNG, 1x1, very wide and tall, EXIF-rotated JPEG); returns {label: path}."""
    rng = np.random.default_rng(seed)
    gray = rng.integers(0, 256, (30, 40), dtype=np.uint8)
    paths = {}

    def save(label: str, image: Image.Image, name: str, **kwargs) -> None:
        paths[label] = os.path.join(folder, name)
        image.save(paths[label], **kwargs)

    save("L", Image.fromarray(gray), "l.png")
    save("LA", Image.fromarray(rng.integers(0, 256, (30, 40, 2), dtype=np.uint8), "LA"), "la.png")
    save("P+transparency", Image.fromarray(gray).convert("P"), "p.png", transparency=3)
    save("RGBA", Image.fromarray(rng.integers(0, 256, (30, 40, 4), dtype=np.uint8), "RGBA"), "rgba.png")
    save("CMYK", Image.fromarray(rng.integers(0, 256, (30, 40, 4), dtype=np.uint8), "CMYK"), "cmyk.jpg")
    save("I;16", Image.fromarray((gray.astype(np.uint16) * 257)), "i16.png")
    save("1x1", Image.fromarray(np.full((1, 1, 3), 77, np.uint8)), "tiny.png")
    save("wide", Image.fromarray(rng.integers(0, 256, (6, 2500, 3), dtype=np.uint8)), "wide.jpg")
    save("tall", Image.fromarray(rng.integers(0, 256, (1500, 3), dtype=np.uint8)), "tall.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees clockwise to display
    save("EXIF-rotated", Image.fromarray(rng.integers(0, 256, (20, 50, 3), dtype=np.uint8)), "exif.jpg", exif=exif)
    return paths


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory) -> str:
    """A shared, read-only tiny dataset (tests that damage data make their own copy)."""
    return make_image_tree(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="session")
def zip_data(image_tree, tmp_path_factory) -> str:
    """Swin's zip layout of ``image_tree`` (tools/make_zip_dataset.py)."""
    out = str(tmp_path_factory.mktemp("zip"))
    assert make_zip_dataset(image_tree, out) == {"train": 24, "val": 9}
    return out


@pytest.fixture(scope="session")
def shard_data(image_tree, tmp_path_factory) -> str:
    """Shards of 5 samples: 24 train samples in 5 shards (the last holds 4), 9 val in 2."""
    out = str(tmp_path_factory.mktemp("shards"))
    assert make_shards(image_tree, out, shard_size=5) == {"train": (5, 24), "val": (2, 9)}
    return out


@pytest.fixture(scope="session")
def tiny_cfg(tmp_path_factory):
    """``tiny_cfg(**overrides)`` -> path of a YAML with TINY_CONFIG plus nested overrides; a
    section given as None is left out (its keys come from BASE)."""
    folder = tmp_path_factory.mktemp("cfg")
    counter = [0]

    def write(**sections) -> str:
        cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY_CONFIG.items()}
        for key, value in sections.items():
            if value is None:
                cfg.pop(key, None)
            elif isinstance(value, dict):
                cfg.setdefault(key, {}).update(value)
            else:
                cfg[key] = value
        counter[0] += 1
        path = os.path.join(folder, f"tiny_{counter[0]}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f)
        return path

    return write


@pytest.fixture
def trainer_parts(tiny_cfg, image_tree, tmp_path):
    """``build(**config updates) -> (trainer, loaders, config)``: a single-process CPU trainer
    assembled as ``main.py`` assembles it (TINY_CONFIG, one epoch, output in ``tmp_path``)."""
    info = init_distributed("cpu")
    built = []

    def build(**updates):
        args = trainer_cli.get_args_parser().parse_args(
            ["--cfg", tiny_cfg(TRAIN={"EPOCHS": 1}), "--data-path", image_tree, "--output", str(tmp_path)]
        )
        config = with_values(get_config(args), updates)
        logger = create_logger(str(tmp_path / "logs"), 0, name="trainer_parts")
        feed = Feed.of(config, info.device, autocast_factory(info.device, None))
        loaders = build_loader(config, info)
        model = build_model(config)
        trainer = trainer_cli.build_trainer(config, info, logger, str(tmp_path), model, loaders, None, feed)
        built.append(trainer)
        return trainer, loaders, config

    yield build
    for trainer in built:
        trainer.records.close()
    close_logger("trainer_parts")


def read_summary(run_dir) -> list[dict]:
    """The rows of a run's summary.csv (one per finished epoch), values as strings."""
    with open(os.path.join(run_dir, "summary.csv"), newline="") as f:
        return list(csv.DictReader(f))


def read_log(run_dir, rank: int = 0) -> str:
    with open(os.path.join(run_dir, f"log_rank{rank}.txt")) as f:
        return f.read()


def load_checkpoint(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


class Exploit:
    """Unpickling this runs ``open(marker, 'w')``: what ``weights_only=True`` must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def cli_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def run_cli():
    """``run_cli(args, launcher=None, timeout=..)``: ``python main.py ARGS`` (or through
    ``python -m torch.distributed.run`` with ``launcher=['--nproc_per_node=2']``) in the repo."""

    def run(args, launcher=None, timeout: int = 300, env=None) -> subprocess.CompletedProcess:
        prefix = [sys.executable]
        if launcher is not None:
            prefix += ["-m", "torch.distributed.run", "--standalone", *launcher]
        return subprocess.run(
            [*prefix, "main.py", *map(str, args)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env or cli_env(),
        )

    return run


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, image_tree, tiny_cfg, run_cli) -> str:
    """Output folder of one uninterrupted 2-epoch CPU run of ``main.py`` (TINY_CONFIG)."""
    out = str(tmp_path_factory.mktemp("reference"))
    proc = run_cli(["--cfg", tiny_cfg(), "--data-path", image_tree, "--output", out, "--tag", "ref"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return os.path.join(out, "tiny_moat_0", "ref")


@pytest.fixture(scope="session")
def ddp_reference(tmp_path_factory, image_tree, tiny_cfg, run_cli):
    """``(cfg, args, run_dir)`` of one uninterrupted 2-process ``torchrun`` CPU run: 2 epochs,
    gradient accumulation 2 over 3 micro-batches per rank (a no_sync micro-step, 2 updates each)."""
    out = str(tmp_path_factory.mktemp("ddp_reference"))
    cfg = tiny_cfg(TRAIN={"EPOCHS": 2, "EMA": {"ENABLE": False}})
    args = ["--cfg", cfg, "--data-path", image_tree, "--accumulation-steps", "2"]
    proc = run_cli(args + ["--output", out], launcher=["--nproc_per_node=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cfg, args, os.path.join(out, "tiny_moat_0", "default")


# ------------------------------------------------------------------------------- launching ranks
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(args, world_size: int = 2, **popen) -> list:
    """``world_size`` ``main.py`` processes set up as ``torchrun`` sets up its workers (rank
    variables in the environment, each in a session and process group of its own, the
    rendezvous store served by the launching process as torchrun's agent serves it), without
    the agent in between, so a test can signal each process and read each exit status."""
    # torchrun's agent hosts the rendezvous store and its workers are only clients of it.
    store = dist.TCPStore("127.0.0.1", 0, world_size=None, is_master=True, wait_for_workers=False)
    procs = []
    for rank in range(world_size):
        env = cli_env(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(store.port),
            TORCHELASTIC_USE_AGENT_STORE="True",
            TORCHELASTIC_RESTART_COUNT="0",  # older torch reads it in this mode, as torchrun sets it
        )
        proc = subprocess.Popen(
            [sys.executable, "main.py", *map(str, args)],
            cwd=REPO,
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            **popen,
        )
        proc.agent_store = store  # served as long as the processes are referenced
        procs.append(proc)
    return procs


def process_group_members(pgid: int) -> list[int]:
    """Pids of the live processes in process group ``pgid`` (a trainer and its loader workers)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry))
    return members
