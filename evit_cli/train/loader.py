"""The training batches: the data sets through the model's transforms, a sampler whose order is a
function of (seed, epoch) and that can start part-way through an epoch, and the mixing of a batch.

Each image's augmentation is a function of (seed, epoch, index) (:func:`evit_cli.io.images.item_rng`),
so a resumed run reads the same batches as an uninterrupted one, with any number of loader workers.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch.utils.data import Sampler

from ..errors import EvitError
from ..io.images import make_loader, transforms, with_transform
from .config import TrainConfig
from .setup import Dist, Setup


def training_sets(cfg: TrainConfig, s: Setup, d: Dist, bad_images=None) -> tuple:
    """Transformed train/val data sets and samplers (a seeded augmentation per image); the samplers
    are None when streaming."""
    data_config = s.adapter.data_config(s.model)
    train_tf = transforms(data_config, train=True, randaugment=cfg.randaugment, color_jitter=cfg.color_jitter)
    cols = (s.data.image_column, s.data.label_column)
    train_ds = with_transform(s.data.train, *cols, train_tf, seed=cfg.seed + 1000003 * d.rank, label_map=s.label_map,
                              bad=bad_images)
    val_ds = with_transform(s.data.val, *cols, transforms(data_config, train=False), label_map=s.label_map,
                            bad=bad_images)
    if not cfg.streaming:
        return (train_ds, val_ds,
                ResumableSampler(len(train_ds), seed=cfg.seed, shuffle=True, rank=d.rank, world=d.world),
                ResumableSampler(len(val_ds), seed=0, shuffle=False, rank=d.rank, world=d.world))
    from datasets.distributed import split_dataset_by_node

    if not cfg.steps_per_epoch:
        raise EvitError("--streaming needs --steps-per-epoch: a stream has no length")
    train_ds = split_dataset_by_node(train_ds.shuffle(seed=cfg.seed, buffer_size=1000), rank=d.rank, world_size=d.world)
    return train_ds, split_dataset_by_node(val_ds, rank=d.rank, world_size=d.world), None, None


def epoch_loader(cfg: TrainConfig, loaders: tuple, epoch: int, first: int):
    """The training batches of ``epoch``, from its step ``first`` on."""
    train_ds, _, sampler, _ = loaders
    train_ds.set_epoch(epoch)
    if sampler is not None:
        sampler.set_epoch(epoch, first * cfg.batch_size * cfg.accum_steps)
    loader = make_loader(train_ds, batch_size=cfg.batch_size, workers=cfg.workers, sampler=sampler,
                         drop_last=True, seed=cfg.seed + epoch)
    if sampler is None and first:  # a stream cannot seek: read past the batches already done
        loader = itertools.islice(loader, first * cfg.accum_steps, None)
    return loader


class ResumableSampler(Sampler[int]):
    """A seeded per-epoch permutation, sharded over ranks, that can start part-way through.

    Resuming mid-epoch skips the batches already done without reading them.
    """

    def __init__(self, n: int, *, seed: int, shuffle: bool, rank: int = 0, world: int = 1):
        self.n, self.seed, self.shuffle, self.rank, self.world = n, seed, shuffle, rank, world
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(n / world)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.n))
        order += order[: self.per_rank * self.world - self.n]  # pad so every rank has as many
        return iter(order[self.rank:: self.world][self.start:])

    def __len__(self) -> int:
        return self.per_rank - self.start



# --------------------------------------------------------------------------- mixing a batch


def mix_batch(images: torch.Tensor, mixup: float, cutmix: float):
    """One batch mixed with itself in reversed order: with probability 0.5 (or always, when only one
    is on) mixup, ``lam x + (1 - lam) x[perm]``, else CutMix, a box of ``x[perm]`` pasted over a
    share ``1 - lam`` of each image; ``lam ~ Beta(alpha, alpha)`` (torch's seeded generator, saved
    in checkpoints). Returns the mixed images, the share ``lam`` of each image's own pixels (after
    clipping the box) and ``perm``.

    The same mixed tensor goes to the student and the teacher (function matching: Beyer et al.,
    "Knowledge distillation: a good teacher is patient and consistent", CVPR 2022).
    """
    perm = torch.arange(images.shape[0] - 1, -1, -1, device=images.device)
    use_cutmix = cutmix > 0 and (mixup <= 0 or float(torch.rand(())) < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    if not use_cutmix:
        return lam * images + (1 - lam) * images[perm], lam, perm
    h, w = images.shape[-2:]
    cut = math.sqrt(1 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
    y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
    mixed = images.clone()
    mixed[..., y0:y1, x0:x1] = images[perm][..., y0:y1, x0:x1]
    return mixed, 1 - (y1 - y0) * (x1 - x0) / (h * w), perm


def mixed_target(target: torch.Tensor, num_classes: int, lam: float, perm: torch.Tensor,
                 smoothing: float) -> torch.Tensor:
    """Soft targets of a mixed batch: each image's label smoothed, mixed in the share of its pixels."""
    off = smoothing / num_classes
    one_hot = torch.full((target.shape[0], num_classes), off, device=target.device)
    one_hot.scatter_(1, target[:, None], 1 - smoothing + off)
    return lam * one_hot + (1 - lam) * one_hot[perm]


def mixed(cfg: TrainConfig, s: Setup, images: torch.Tensor, target: torch.Tensor):
    """The batch mixed as --mixup/--cutmix say (the same images for the student and the teacher),
    and, with labels, its soft targets; unchanged when both are off."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return images, target
    images, lam, perm = mix_batch(images, cfg.mixup, cfg.cutmix)
    if s.trains_on_labels:
        target = mixed_target(target, s.adapter.num_classes(s.model), lam, perm, cfg.smoothing)
    return images, target
