"""The teacher of a fine-tune and the training loss: labels, distillation, or both.

The teacher is the dense model before conversion (or ``--teacher MODEL``). Its logits are taken
over the student's classes: the same head when the head is kept, or, after a new head, the
teacher's classes that the data set's classes map onto. A data set without labels trains on the
distillation term alone: KL(teacher || student), the teacher's distribution as the target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import adapters
from .classes import class_map
from .errors import EvitError


@dataclass
class Teacher:
    model: nn.Module  # dense, in eval mode
    mapping: list[int] | None  # teacher class of each student class; None: the same classes
    source: str  # what it is, for the record: "dense model before conversion" or a model name

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.from_output(adapters.get_adapter(self.model).run(self.model, images))

    def from_output(self, output) -> torch.Tensor:
        """The logits over the student's classes from an output of the teacher's forward."""
        out = adapters.get_adapter(self.model).output(self.model, output).float()
        return out if self.mapping is None else out[:, self.mapping]


def teacher_mapping(teacher: nn.Module, head: str, student_classes: int, data_names: list[str]):
    """The teacher's classes for the student's, or a one-line reason why there are none."""
    count = adapters.get_adapter(teacher).num_classes(teacher)
    if head == "keep":
        if count != student_classes:
            return None, f"the teacher predicts {count} classes and the model {student_classes}"
        return None, None
    mapping = class_map(data_names, teacher)
    if mapping is None:
        return None, (f"the teacher's {count} classes do not map onto the data set's {len(data_names)} new "
                      "classes (ImageNet synsets or names in its id2label would)")
    return (None if mapping == list(range(count)) else mapping), None


def build_teacher(distill: bool | None, teacher_name: str | None, dense: nn.Module, head: str,
                  student_classes: int, data_names: list[str], labelled: bool) -> tuple[Teacher | None, str]:
    """The teacher (or None) and a line saying what the loss is.

    ``distill`` None (the default) distils whenever the teacher's classes fit, and must when there
    are no labels; True refuses when they do not fit; False trains on the labels alone.
    """
    if distill is False and teacher_name is None:
        if not labelled:
            raise EvitError("the data set has no labels and --no-distill leaves nothing to train on: drop --no-distill")
        return None, "labels only (--no-distill)"
    if teacher_name is not None:
        from .core import dense_copy
        from .loading import load_model

        dense, source = dense_copy(load_model(teacher_name, pretrained=True)), teacher_name
    else:
        source = "the dense model before conversion"
    mapping, why_not = teacher_mapping(dense, head, student_classes, data_names)
    if why_not is not None:
        if distill or teacher_name is not None or not labelled:
            hint = "" if labelled else " (the data set has no labels, so distillation is the only loss)"
            raise EvitError(f"cannot distil: {why_not}{hint}: pass --teacher MODEL with this data set's classes, or --no-distill")
        return None, f"labels only: no distillation, {why_not}"
    teacher = Teacher(dense.eval(), mapping, source)
    return teacher, ("distillation only (no labels)" if not labelled else "labels and distillation")


def kl_to_teacher(logits: torch.Tensor, t_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) at temperature ``tau``, mean per image, times tau^2."""
    return F.kl_div(F.log_softmax(logits / tau, -1), F.log_softmax(t_logits / tau, -1),
                    reduction="batchmean", log_target=True) * tau * tau


def training_loss(logits, target, t_logits, *, labelled: bool, alpha: float, tau: float, smoothing: float):
    """Cross-entropy with the labels (soft targets under mixup), KL to the teacher, or their mix."""
    kl = kl_to_teacher(logits, t_logits, tau) if t_logits is not None else None
    if not labelled:
        return kl
    if target.ndim == 2:  # mixup soft targets (smoothing already in them)
        ce = torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
    else:
        ce = F.cross_entropy(logits, target, label_smoothing=smoothing)
    return ce if kl is None else (1 - alpha) * ce + alpha * kl
