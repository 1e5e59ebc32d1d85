"""The teacher of a fine-tune and the training loss: labels, distillation, or both.

The teacher is the dense model before conversion (or ``--teacher MODEL``). Its output is the one
``adapter.output`` defines: a classifier's logits, taken over the student's classes (the same head
when the head is kept, or, after a new head, the teacher's classes that the data set's classes map
onto), or an embedding model's embedding. A data set without labels trains on the distillation term
alone. The term is chosen by what the model outputs (``--distill-loss auto``): MSE on all the logits
of a classifier, and 1 - cosine plus the MSE relative to the teacher's mean square for an
embedding; KL at a temperature stays available for classifiers (``--distill-loss kl``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import adapters
from ..errors import EvitError
from ..model.classes import class_map


@dataclass
class Teacher:
    model: nn.Module  # dense, in eval mode
    mapping: list[int] | None  # teacher class of each student class; None: the same classes
    source: str  # what it is, for the record: "dense model before conversion" or a model name
    kind: str = "mse"  # the distillation term: distill_kind()
    features: float = 0.0  # weight of the pre-logits feature term (0: none)
    layers: float = 0.0  # weight of the layer term: the prefix tokens after every layer but the last (0: none)

    @torch.no_grad()
    def outputs(self, images: torch.Tensor) -> torch.Tensor:
        return self.from_output(adapters.get_adapter(self.model).run(self.model, images))

    def from_output(self, output) -> torch.Tensor:
        """The logits over the student's classes (or the embedding) from an output of the teacher's forward."""
        out = adapters.get_adapter(self.model).output(self.model, output).float()
        return out if self.mapping is None else out[:, self.mapping]


def teacher_mapping(teacher: nn.Module, head: str, student_classes: int, data_names: list[str]):
    """The teacher's classes for the student's, or a one-line reason why there are none."""
    count = adapters.get_adapter(teacher).num_classes(teacher)
    if head in ("keep", "none"):  # none: a headless model, its embedding
        if count != student_classes:
            return None, f"the teacher predicts {count} classes and the model {student_classes}"
        return None, None
    mapping = class_map(data_names, teacher)
    if mapping is None:
        return None, (f"the teacher's {count} classes do not map onto the data set's {len(data_names)} new "
                      "classes (ImageNet synsets or names in its id2label would)")
    return (None if mapping == list(range(count)) else mapping), None


def labels_in_loss(labelled: bool, head: str) -> bool:
    """Whether a data set's labels enter the loss: not for a model that stays headless (head "none")."""
    return labelled and head != "none"


def build_teacher(distill: bool | None, teacher_name: str | None, dense: nn.Module, head: str,
                  student_classes: int, data_names: list[str], labelled: bool,
                  loss: str = "auto", tau: float = 1.0, features: float = 0.0,
                  layers: float | None = None) -> tuple[Teacher | None, str]:
    """The teacher (or None) and a line saying what the loss is; ``loss`` is ``--distill-loss``
    (the term follows what the model outputs: a headless model, 0 classes, outputs an embedding),
    ``features`` and ``layers`` the weights of the inner terms (``layers`` None: :func:`layer_weight`).

    ``distill`` None (the default) distils whenever the teacher's classes fit, and must when there
    are no labels; True refuses when they do not fit; False trains on the labels alone.
    """
    headless = labelled and head == "none"  # labels there, but not in the loss
    labelled = labels_in_loss(labelled, head)
    if distill is False and teacher_name is None:
        if headless:
            raise EvitError("the model is headless (an embedding model) and --no-distill leaves nothing to train on: "
                            "drop --no-distill to distil its embedding, or give --head new to train a classifier on "
                            "the labels")
        if not labelled:
            raise EvitError("the data set has no labels and --no-distill leaves nothing to train on: drop --no-distill")
        return None, "labels only (--no-distill)"
    if teacher_name is not None:
        from ..io.loading import load_model
        from ..model.convert import dense_copy

        dense, source = dense_copy(load_model(teacher_name, pretrained=True)), teacher_name
    else:
        source = "the dense model before conversion"
    mapping, why_not = teacher_mapping(dense, head, student_classes, data_names)
    if why_not is not None:
        if distill or teacher_name is not None or not labelled:
            hint = "" if labelled else " (the data set has no labels, so distillation is the only loss)"
            raise EvitError(f"cannot distil: {why_not}{hint}: pass --teacher MODEL with this data set's classes, or "
                            f"--no-distill")
        return None, f"labels only: no distillation, {why_not}"
    kind = distill_kind(loss, embedding=student_classes == 0)
    teacher = Teacher(dense.eval(), mapping, source, kind)
    words = DISTILL_WORDS[kind].format(tau=tau)
    if features > 0 and kind != "cosine":
        if teacher_name is not None or adapters.get_adapter(dense).head(dense) is None:
            words += " (no feature term: --distill-features needs the dense model before conversion as the teacher)"
        else:
            teacher.features = features
            words += f" + {features:g} x MSE on the pre-logits features"
    words += _layer_term(teacher, dense, teacher_name, layer_weight(layers, kind))
    if labelled:
        return teacher, f"labels and distillation: {words}"
    why = "the labels are not in the loss: the model is headless" if headless else "no labels"
    return teacher, f"distillation only ({why}): {words}"


def layer_weight(layers: float | None, kind: str) -> float:
    """``--distill-layers``: as given, or by default 1 for an embedding model and 0 for a classifier
    (measured on embedding models only: benchmarks/research/recovery_variants.py)."""
    if layers is not None:
        return layers
    return 1.0 if kind == "cosine" else 0.0


def _layer_term(teacher: Teacher, dense: nn.Module, teacher_name: str | None, weight: float) -> str:
    """Give ``teacher`` the layer term of ``weight`` where it can have one; the words for the loss line."""
    if weight <= 0:
        return ""
    adapter = adapters.get_adapter(dense)
    if teacher_name is not None:
        return " (no layer term: --distill-layers needs the dense model before conversion as the teacher)"
    if adapter.num_prefix_tokens(dense) == 0:
        return " (no layer term: the model has no class token to compare)"
    teacher.layers = weight
    return f" + {weight:g} x relative MSE on the class token after every layer"


def distill_kind(name: str, embedding: bool) -> str:
    """The distillation term ``--distill-loss NAME`` gives a classifier or an embedding model."""
    if name == "auto":
        return "cosine" if embedding else "mse"
    if name == "kl" and embedding:
        raise EvitError("--distill-loss kl needs class logits, and the model outputs an embedding: use cosine or mse")
    return name


DISTILL_WORDS = {"mse": "MSE on the logits", "kl": "KL at temperature {tau:g}",
                 "cosine": "1 - cosine + relative MSE on the embedding"}


def _tokens(output) -> torch.Tensor:
    """The token sequence a layer returned (alone, or first in a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def inner_outputs(student: nn.Module, teacher: Teacher | None):
    """Collects, while open, what the teacher's inner terms compare, in the dict it yields: for
    "student" and "teacher", "head" the input of the classification head (the pre-logits
    features) and, for each layer i but the last, the prefix (class) tokens after it. Nothing is
    collected for a term the teacher does not have."""
    got: dict[str, dict] = {"student": {}, "teacher": {}}
    hooks = [] if teacher is None else _watch(student, teacher, got["student"]) + _watch(teacher.model, teacher,
                                                                                          got["teacher"])
    try:
        yield got
    finally:
        for h in hooks:
            h.remove()


def _watch(model: nn.Module, teacher: Teacher, into: dict) -> list:
    """Hooks that put into ``into`` what :func:`inner_outputs` collects from ``model``."""
    adapter, hooks = adapters.get_adapter(model), []
    if teacher.features:
        hooks.append(adapter.head(model).register_forward_pre_hook(lambda _m, args: into.__setitem__("head", args[0])))
    if teacher.layers:
        n = adapter.num_prefix_tokens(model)
        hooks += [layer.register_forward_hook(lambda _m, _args, out, i=i: into.__setitem__(i, _tokens(out)[:, :n]))
                  for i, layer in enumerate(adapter.layers(model)[:-1])]
    return hooks


def relative_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The MSE divided by the target's mean square: scale-free, comparable across layers."""
    return F.mse_loss(out, target) / target.pow(2).mean().clamp_min(1e-12)


def inner_term(got: dict, teacher: Teacher | None) -> torch.Tensor | None:
    """The teacher's inner terms on what :func:`inner_outputs` collected: ``teacher.features`` x the
    MSE on the pre-logits features, plus ``teacher.layers`` x the mean over layers of the relative
    MSE on the prefix tokens; None when it has neither."""
    if teacher is None:
        return None
    s, t = got["student"], got["teacher"]
    terms = []
    if teacher.features and "head" in s and "head" in t:
        terms.append(teacher.features * F.mse_loss(s["head"].float(), t["head"].float()))
    layers = [i for i in t if i != "head" and i in s]
    if teacher.layers and layers:
        terms.append(teacher.layers * sum(relative_mse(s[i].float(), t[i].float()) for i in layers) / len(layers))
    return sum(terms) if terms else None


def kl_to_teacher(logits: torch.Tensor, t_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) at temperature ``tau``, mean per image, times tau^2."""
    return F.kl_div(F.log_softmax(logits / tau, -1), F.log_softmax(t_logits / tau, -1),
                    reduction="batchmean", log_target=True) * tau * tau


def embedding_loss(out: torch.Tensor, t_out: torch.Tensor) -> torch.Tensor:
    """1 - cosine to the teacher's embedding (its direction), plus the MSE divided by the teacher's
    mean square (its length, scale-free), both mean per image."""
    cos = F.cosine_similarity(out.flatten(1), t_out.flatten(1), dim=-1).mean()
    return 1 - cos + relative_mse(out, t_out)


def distill_term(out: torch.Tensor, t_out: torch.Tensor, kind: str, tau: float = 1.0) -> torch.Tensor:
    """The distillation term ``kind`` (``distill_kind``) of the student's output against the teacher's."""
    if kind == "kl":
        return kl_to_teacher(out, t_out, tau)
    if kind == "cosine":
        return embedding_loss(out, t_out)
    return F.mse_loss(out, t_out)


def training_loss(out, target, t_out, *, labelled: bool, alpha: float, kind: str, tau: float, smoothing: float,
                  inner: torch.Tensor | None = None):
    """Cross-entropy with the labels (soft targets under mixup), the distillation term (plus the
    teacher's inner terms ``inner``, when given: :func:`inner_term`), or their mix."""
    d = distill_term(out, t_out, kind, tau) if t_out is not None else None
    if d is not None and inner is not None:
        d = d + inner
    if not labelled:
        return d
    if target.ndim == 2:  # mixup soft targets (smoothing already in them)
        ce = torch.sum(-target * F.log_softmax(out, dim=-1), dim=-1).mean()
    else:
        ce = F.cross_entropy(out, target, label_smoothing=smoothing)
    return ce if d is None else (1 - alpha) * ce + alpha * d
