"""How close an EViT model stays to its dense model, with or without labels.

Per image, against the dense model's outputs on the same image: agreement (the same top-1
class), KL(dense || EViT) of the class distributions, and for headless (embedding) models the
cosine similarity of the two embeddings (of a backbone's feature maps: the mean per-patch cosine).
With labels: top-1, top-5 and the cross-entropy.

Over the whole evaluated set, for embedding models (as their users measure them): the overlap of
each image's :data:`NEIGHBOURS` nearest neighbours among the evaluated images under the EViT
embedding with those under the dense embedding, and, with labels, the leave-one-out kNN top-1
(:data:`KNN_K` neighbours, votes weighted by cosine similarity) of each embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import adapters

NEIGHBOURS = 10  # k of the neighbour overlap
KNN_K = 20  # k of the kNN classifier
_CHUNK = 1024  # rows of the similarity matrix computed at once


def outputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The model's output as its adapter defines it: logits, or for a model without a classification
    head the embedding its users take (B, D)."""
    return adapters.get_adapter(model).outputs(model, images).float()


def nearest(emb: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and indices (N, k) of each row's ``k`` most similar other rows (itself
    left out), most similar first; computed a block of rows at a time."""
    e = F.normalize(emb.flatten(1).double(), dim=-1)
    sims, idx = [], []
    for i in range(0, len(e), _CHUNK):
        s = e[i:i + _CHUNK] @ e.T
        rows = torch.arange(len(s))
        s[rows, rows + i] = -torch.inf
        top = s.topk(k, dim=-1)
        sims.append(top.values)
        idx.append(top.indices)
    return torch.cat(sims), torch.cat(idx)


def neighbour_overlap(emb: torch.Tensor, ref: torch.Tensor, k: int = NEIGHBOURS) -> float | None:
    """Mean share (%) of each image's ``k`` nearest neighbours under ``ref`` that are also among its
    ``k`` nearest under ``emb`` (cosine similarity, among the given images); None for under 2 images."""
    k = min(k, len(emb) - 1)
    if k < 1:
        return None
    a, b = nearest(emb, k)[1], nearest(ref, k)[1]
    shared = (a[:, :, None] == b[:, None, :]).any(-1).sum(-1)
    return 100 * shared.double().mean().item() / k


def knn_top1(emb: torch.Tensor, labels: torch.Tensor, k: int = KNN_K) -> float | None:
    """Leave-one-out kNN top-1 (%) over the labelled images (label >= 0): each image takes the class
    with the largest sum of cosine similarities among its ``k`` nearest other images; None for under 2."""
    keep = labels >= 0
    emb, labels = emb[keep], labels[keep].long()
    k = min(k, len(emb) - 1)
    if k < 1:
        return None
    sims, idx = nearest(emb, k)
    votes = torch.zeros(len(emb), int(labels.max()) + 1, dtype=sims.dtype).scatter_add_(1, labels[idx], sims)
    return 100 * (votes.argmax(-1) == labels).double().mean().item()


def cosine(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per image: the cosine of two embeddings; of a feature map (B, C, H, W), a backbone's, the mean over
    its patches of each patch's cosine (map fidelity: a restored patch is compared where it sits)."""
    if out.dim() == 4:
        return F.cosine_similarity(out, ref, dim=1).flatten(1).mean(1)
    return F.cosine_similarity(out.flatten(1), ref.flatten(1), dim=-1)


class Tally:
    """Running sums over batches (and, for an embedding model, the embeddings themselves, which the
    set-level measures need); :meth:`result` turns them into per-image means and percentages."""

    KEYS = ("images", "agree", "kl", "cosine", "labelled", "top1", "top5", "ce")

    def __init__(self, embedding: bool = False):
        self.embedding = embedding
        self.sums = dict.fromkeys(self.KEYS, 0.0)
        self.kept: dict[str, list[torch.Tensor]] = {"out": [], "ref": [], "target": []}
        self.has_ref = self.has_labels = False

    def add(self, out: torch.Tensor, ref: torch.Tensor | None = None, target: torch.Tensor | None = None) -> None:
        """One batch: ``out`` of the model, ``ref`` of the dense model, ``target`` labels (-1: none)."""
        s = self.sums
        s["images"] += out.shape[0]
        if ref is not None:
            self.has_ref = True
            if self.embedding:
                s["cosine"] += cosine(out, ref).sum().item()
            else:
                s["agree"] += (out.argmax(-1) == ref.argmax(-1)).sum().item()
                s["kl"] += F.kl_div(F.log_softmax(out, -1), F.log_softmax(ref, -1), reduction="sum",
                                    log_target=True).item()
        if self.embedding:
            self._keep(out, ref, target)
        elif target is not None and (target >= 0).any():
            self.has_labels = True
            keep = target >= 0
            o, t = out[keep], target[keep]
            top = o.topk(min(5, o.shape[-1]), dim=-1).indices
            s["labelled"] += t.numel()
            s["top1"] += (top[:, 0] == t).sum().item()
            s["top5"] += (top == t[:, None]).any(-1).sum().item()
            s["ce"] += F.cross_entropy(o, t, reduction="sum").item()

    def _keep(self, out, ref, target) -> None:
        k = self.kept
        k["out"].append(out.detach().flatten(1).float().cpu())
        if ref is not None:
            k["ref"].append(ref.detach().flatten(1).float().cpu())
        k["target"].append(target.detach().cpu() if target is not None else torch.full((len(out),), -1))

    def merge_kept(self, parts: list[dict]) -> None:
        """Take the embeddings kept by every process (``parts``, this one's among them) as this tally's."""
        self.kept = {name: [t for p in parts for t in p[name]] for name in self.kept}

    def all_reduce(self, device) -> None:
        """In a torch.distributed run, the sums of every process (and, for an embedding model, their
        embeddings, which the set-level measures need); nothing in a single process."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        keys = list(self.sums)
        t = torch.tensor([self.sums[k] for k in keys] + [float(self.has_ref), float(self.has_labels)],
                         dtype=torch.float64, device=device)
        dist.all_reduce(t)
        *sums, has_ref, has_labels = t.tolist()
        self.sums, self.has_ref, self.has_labels = dict(zip(keys, sums)), has_ref > 0, has_labels > 0
        if self.embedding:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, self.kept)
            self.merge_kept(parts)

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
        if self.embedding and self.kept["out"]:
            r.update(self._set_measures())
        return r

    def _set_measures(self) -> dict:
        """Neighbour overlap with the dense embedding and kNN top-1, over every image kept."""
        out, target = torch.cat(self.kept["out"]), torch.cat(self.kept["target"])
        r = {}
        if self.kept["ref"]:
            r["neighbour_overlap"] = neighbour_overlap(out, torch.cat(self.kept["ref"]))
        if (target >= 0).sum() > 1:
            r.update(knn_top1=knn_top1(out, target), labelled_images=int((target >= 0).sum()))
        return {key: v for key, v in r.items() if v is not None}
