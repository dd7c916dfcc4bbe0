"""Data pipeline: class-folder datasets, timm transforms, resumable samplers, loaders, Mixup."""

from .build import build_dataset, build_loader, build_mixup
from .datasets import ClassFolderDataset, DataError, check_same_classes, load_rgb
from .samplers import ResumableSampler, ShardedEvalSampler, sample_seeds
from .transforms import build_transform

__all__ = [
    "ClassFolderDataset",
    "DataError",
    "ResumableSampler",
    "ShardedEvalSampler",
    "build_dataset",
    "build_loader",
    "build_mixup",
    "build_transform",
    "check_same_classes",
    "load_rgb",
    "sample_seeds",
]
