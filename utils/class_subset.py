"""Evaluate a checkpoint on a val set that holds only some of its classes (ImageNet-A/-R style).

The val set's classes are matched to the checkpoint's saved ``class_names`` by name, and the
logits are restricted to the matched classes, so a 1000-class model is scored as a 200-way
classifier on a 200-class folder (the usual protocol for ImageNet-A and -R). Works from the
dataset's ``classes`` list (names in label order) and, when the dataset has them, its
``targets``: a dataset whose ``classes`` is a full class map but whose images cover only some of
its classes is restricted to the classes that occur.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from .errors import UserError


@dataclass
class ClassSubset:
    """The evaluated classes: ``names[j]`` is the checkpoint's output ``logit_index[j]``;
    ``label_map[t]`` is the column of dataset label ``t`` (-1 for labels that never occur)."""

    names: List[str]
    logit_index: List[int]
    label_map: List[int]
    num_outputs: int
    _tensors: Dict[torch.device, tuple] = field(default_factory=dict, repr=False)

    def apply(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits`` [B, num_outputs] -> [B, len(names)]; dataset labels -> column indices."""
        device = logits.device
        if device not in self._tensors:
            self._tensors[device] = (
                torch.tensor(self.logit_index, dtype=torch.long, device=device),
                torch.tensor(self.label_map, dtype=torch.long, device=device),
            )
        columns, label_map = self._tensors[device]
        return logits.index_select(1, columns), label_map[target]

    def describe(self) -> Dict[str, Any]:
        """JSON-able summary for the eval report."""
        return {
            "subset": len(self.names) < self.num_outputs,
            "count": len(self.names),
            "of": self.num_outputs,
            "names": list(self.names),
            "checkpoint_indices": list(self.logit_index),
        }


def present_labels(dataset: Any) -> List[int]:
    """Labels that occur in ``dataset`` (from its ``targets`` when it has them, else every
    index of its ``classes``)."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return list(range(len(dataset.classes)))
    return sorted({int(t) for t in targets})


def match_classes(
    val_classes: Sequence[str],
    labels: Sequence[int],
    checkpoint_classes: Optional[Sequence[str]],
    num_outputs: int,
    source: str,
) -> Optional[ClassSubset]:
    """How to score the val classes ``val_classes[t] for t in labels`` with a model of
    ``num_outputs`` outputs named ``checkpoint_classes``; None when no restriction is needed (the
    val set uses every output, in the checkpoint's order).

    Raises ``UserError`` naming the first val class the checkpoint does not know, or when the
    checkpoint stores no class names and the val set does not cover its outputs one to one.
    """
    val_classes = [str(c) for c in val_classes]
    labels = list(labels)
    everything = labels == list(range(num_outputs)) and len(val_classes) == num_outputs
    saved = [str(c) for c in checkpoint_classes or []]
    if not saved or len(saved) != num_outputs:
        if everything:
            return None  # nothing to match by: outputs and labels are taken to correspond, as in training
        raise UserError(
            f"{source} stores no class names for its {num_outputs} outputs, so the val set's "
            f"{len(labels)} classes cannot be matched to them; evaluate a checkpoint written by the "
            "trainer, or a val set with one class per output"
        )
    if everything and saved == val_classes:
        return None
    position = {name: i for i, name in enumerate(saved)}
    missing = [val_classes[t] for t in labels if val_classes[t] not in position]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"val class '{missing[0]}'{more} is not one of the {num_outputs} classes of {source}")
    label_map = [-1] * len(val_classes)
    for column, t in enumerate(labels):
        label_map[t] = column
    return ClassSubset(
        names=[val_classes[t] for t in labels],
        logit_index=[position[val_classes[t]] for t in labels],
        label_map=label_map,
        num_outputs=num_outputs,
    )
