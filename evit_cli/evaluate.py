"""Evaluating models side by side on the same images: fidelity to the dense model, and accuracy with labels."""

from __future__ import annotations

import torch
from torch import nn

from . import adapters
from .classes import eval_class_map
from .data import make_loader, transforms, with_transform
from .errors import EvitError
from .fidelity import Tally, outputs


@torch.no_grad()
def evaluate_models(models: dict[str, nn.Module], data, *, reference: str = "dense", batch_size: int = 64,
                    workers: int = 2, limit: int | None = None, device="cpu", progress=None) -> dict[str, dict]:
    """Each model on the same images, against ``models[reference]`` (the dense model): agreement (%)
    and KL(dense || model) per image, top-1/top-5 (%) when the data set has labels; for a headless
    (embedding) model, the embeddings' cosine similarity and neighbour overlap, and kNN top-1 (%)
    with labels (see :mod:`.fidelity`). A flat folder of images has no labels."""

    ref_model = models[reference]
    adapter = adapters.get_adapter(ref_model)
    embedding = adapter.num_classes(ref_model) == 0
    mapping = eval_class_map(data.class_names, ref_model) if data.labelled and not embedding else None
    ds = data.val
    if limit:
        ds = ds.shuffle(seed=0).select(range(min(limit, len(ds))))  # a seeded sample across classes
    ds = with_transform(ds, data.image_column, data.label_column, transforms(adapter.data_config(ref_model), train=False),
                        label_map=mapping)
    tallies = {name: Tally(embedding) for name in models}
    for images, target in make_loader(ds, batch_size=batch_size, workers=workers):
        images, target = images.to(device), target.to(device)
        ref = outputs(ref_model, images)
        for name, m in models.items():
            out = ref if name == reference else outputs(m, images)
            tallies[name].add(out, None if name == reference else ref, target)
        if progress:
            progress(target.numel())
    if tallies[reference].sums["images"] == 0:
        raise EvitError("the evaluation split is empty")
    return {name: t.result() for name, t in tallies.items()}
