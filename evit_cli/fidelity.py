"""How close an EViT model stays to its dense model, with or without labels.

Per image, against the dense model's outputs on the same image: agreement (the same top-1
class), KL(dense || EViT) of the class distributions, and for headless (embedding) models the
cosine similarity of the two embeddings. With labels: top-1, top-5 and the cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import adapters


def outputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The model's output as its adapter defines it: logits, or for a model without a classification
    head the embedding its users take (B, D)."""
    return adapters.get_adapter(model).outputs(model, images).float()


class Tally:
    """Running sums over batches; :meth:`result` turns them into per-image means and percentages."""

    KEYS = ("images", "agree", "kl", "cosine", "labelled", "top1", "top5", "ce")

    def __init__(self, embedding: bool = False):
        self.embedding = embedding
        self.sums = dict.fromkeys(self.KEYS, 0.0)
        self.has_ref = self.has_labels = False

    def add(self, out: torch.Tensor, ref: torch.Tensor | None = None, target: torch.Tensor | None = None) -> None:
        """One batch: ``out`` of the model, ``ref`` of the dense model, ``target`` labels (-1: none)."""
        s = self.sums
        s["images"] += out.shape[0]
        if ref is not None:
            self.has_ref = True
            if self.embedding:
                s["cosine"] += F.cosine_similarity(out.flatten(1), ref.flatten(1), dim=-1).sum().item()
            else:
                s["agree"] += (out.argmax(-1) == ref.argmax(-1)).sum().item()
                s["kl"] += F.kl_div(F.log_softmax(out, -1), F.log_softmax(ref, -1), reduction="sum", log_target=True).item()
        if target is not None and not self.embedding:
            keep = target >= 0
            if keep.any():
                self.has_labels = True
                o, t = out[keep], target[keep]
                top = o.topk(min(5, o.shape[-1]), dim=-1).indices
                s["labelled"] += t.numel()
                s["top1"] += (top[:, 0] == t).sum().item()
                s["top5"] += (top == t[:, None]).any(-1).sum().item()
                s["ce"] += F.cross_entropy(o, t, reduction="sum").item()

    def result(self) -> dict:
        s, r = self.sums, {"images": int(self.sums["images"])}
        n = max(s["images"], 1)
        if self.has_ref:
            if self.embedding:
                r["cosine"] = s["cosine"] / n
            else:
                r["agreement"] = 100 * s["agree"] / n
                r["kl"] = s["kl"] / n
        if self.has_labels:
            m = s["labelled"]
            r.update(top1=100 * s["top1"] / m, top5=100 * s["top5"] / m, val_loss=s["ce"] / m, labelled_images=int(m))
        return r
