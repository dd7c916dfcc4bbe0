"""Data pipeline: class folders, Swin-style zips and WebDataset shards, timm transforms, resumable
samplers, loaders, Mixup."""

from .build import Loaders, build_dataset, build_loader, build_mixup, part_cache_resume_note
from .class_map import read_class_map
from .datasets import ClassFolderDataset, DataError, KeyedImageDataset, check_same_classes, decode_rgb, load_rgb
from .samplers import RankSubsetSampler, ResumableSampler, ShardedEvalSampler, rank_subset, sample_seeds
from .shards import ShardDataset
from .transforms import build_transform
from .zip_dataset import ZipImageDataset

__all__ = [
    "ClassFolderDataset",
    "DataError",
    "KeyedImageDataset",
    "Loaders",
    "RankSubsetSampler",
    "ResumableSampler",
    "ShardDataset",
    "ShardedEvalSampler",
    "ZipImageDataset",
    "build_dataset",
    "build_loader",
    "build_mixup",
    "build_transform",
    "check_same_classes",
    "decode_rgb",
    "load_rgb",
    "part_cache_resume_note",
    "rank_subset",
    "read_class_map",
    "sample_seeds",
]
