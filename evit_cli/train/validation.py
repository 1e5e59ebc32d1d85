"""Validation after every epoch: the one evaluator (:func:`evit_cli.measure.evaluate.validate`) on the
validation split, against the teacher, summed over ranks; here only what an empty split means."""

from __future__ import annotations

from ..errors import EvitError
from ..measure.evaluate import validate
from .config import TrainConfig


def evaluate(net, model, val_ds, val_sampler, cfg: TrainConfig, device, teacher=None, bad_images=None) -> dict:
    """The measures of ``model`` (run through ``net``, its DistributedDataParallel wrapper or itself)
    against ``teacher`` on the validation split: agreement and KL with the teacher when there is one,
    val loss, top-1 and top-5 (%) when there are labels; for an embedding model, cosine and neighbour
    overlap with the teacher's embedding and kNN top-1 (see :mod:`evit_cli.measure.metrics`)."""
    row = validate(model, teacher, val_ds, device, batch_size=cfg.batch_size, workers=cfg.workers,
                   sampler=val_sampler, amp=cfg.amp, forward=net)
    if not row.images:
        _no_validation_image(bad_images)
    return row.to_dict()


def _no_validation_image(bad_images=None):
    if bad_images is not None and bad_images.count:
        raise EvitError("no image of the validation split could be decoded (all were skipped): check the data set, "
                        "or give another with --val-split")
    raise EvitError("the validation split is empty: give --val-split or a larger --val-fraction")
