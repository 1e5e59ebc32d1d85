"""Validation after every epoch, on the validation split and summed over ranks: agreement and KL
with the teacher, val loss, top-1 and top-5 with labels; cosine, neighbour overlap and kNN top-1
for an embedding model (the measures of :mod:`evit_cli.measure.fidelity`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import EvitError
from ..io.images import make_loader
from ..measure.fidelity import NEIGHBOURS, Tally
from ..utils.device import autocast
from .config import TrainConfig
from .setup import Dist, all_sum


def describe_metrics(m: dict) -> str:
    parts = []
    if "agreement" in m:
        parts.append(f"agreement with the teacher {m['agreement']:.2f}%, KL {m['kl']:.4f}")
    if "cosine" in m:
        parts.append(f"cosine to the teacher's embedding {m['cosine']:.4f}")
    if "neighbour_overlap" in m:
        parts.append(f"{NEIGHBOURS}-NN overlap {m['neighbour_overlap']:.2f}%")
    if "knn_top1" in m:
        parts.append(f"kNN top-1 {m['knn_top1']:.2f}%")
    if "top1" in m:
        parts.append(f"val loss {m['val_loss']:.4f}, top-1 {m['top1']:.2f}%, top-5 {m['top5']:.2f}%")
    parts.append(f"keep {','.join(f'{r:.3f}' for r in m['keep_rate'])} ({m['images']} images: {m['split']})")
    return "; ".join(parts)


@torch.no_grad()
def evaluate(net, model, adapter, val_ds, val_sampler, cfg: TrainConfig, device, d: Dist, teacher=None,
             bad_images=None) -> dict:
    """On the validation split, summed over ranks: agreement and KL with the teacher when there is
    one, val loss, top-1 and top-5 (%) when there are labels; for an embedding model, cosine and
    neighbour overlap with the teacher's embedding and kNN top-1 (see :mod:`.fidelity`)."""
    net.eval()
    loader = make_loader(val_ds, batch_size=cfg.batch_size, workers=cfg.workers, sampler=val_sampler)
    tally = Tally(embedding=adapter.num_classes(model) == 0)
    for images, target in loader:
        images, target = images.to(device), target.to(device)
        with autocast(device, cfg.amp):
            logits = adapter.output(model, net(images)).float()
            ref = teacher.outputs(images) if teacher is not None else None
        tally.add(logits, ref, target)
    keys = list(tally.sums)
    tally.sums = dict(zip(keys, all_sum([tally.sums[k] for k in keys], d, device)))
    if tally.embedding and d.world > 1:  # the set-level measures need every rank's embeddings
        parts = [None] * d.world
        dist.all_gather_object(parts, tally.kept)
        tally.merge_kept(parts)
    if tally.sums["images"] == 0:
        _no_validation_image(bad_images)
    return tally.result()


def _no_validation_image(bad_images=None):
    if bad_images is not None and bad_images.count:
        raise EvitError("no image of the validation split could be decoded (all were skipped): check the data set, "
                        "or give another with --val-split")
    raise EvitError("the validation split is empty: give --val-split or a larger --val-fraction")
