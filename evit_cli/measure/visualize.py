"""The inattentive-token visualization: which patches each EViT layer kept, as images."""

from __future__ import annotations

import os

import torch
from torch import nn

from .. import adapters
from ..errors import EvitError
from ..io.images import open_image, transforms
from ..model.convert import get_config
from ..utils.files import write_bytes

BLANK = (255, 0, 255)  # the colour of fused patches: magenta, rare in photos


def patch_fates(model: nn.Module, x: torch.Tensor) -> list[list[set[int]]]:
    """For each image, for each EViT layer: the patches that still have a token of their own after it."""
    adapter = adapters.get_adapter(model)
    num_patches = adapter.num_tokens(model) - adapter.num_prefix_tokens(model)
    adapters.record_kept(model, True)
    try:
        with torch.no_grad():
            adapter.run(model, x)
        kept = [b.evit.kept for b in adapters.evit_blocks(model)]
    finally:
        adapters.record_kept(model, False)
    fuse = get_config(model).adds_token  # the paper's fused token; the squeeze adds none
    fates = []
    for i in range(x.shape[0]):
        tokens: list[int | None] = list(range(num_patches))  # None stands for a fused token
        per_layer = []
        for idx in kept:
            if idx is not None:
                tokens = [tokens[j] for j in idx[i].tolist()] + ([None] if fuse else [])
            per_layer.append({t for t in tokens if t is not None})
        fates.append(per_layer)
    return fates


def visualize(model: nn.Module, images: list[str | os.PathLike], out: str | os.PathLike,
              scale: int | None = None) -> dict:
    """One row per image: the image as the model sees it, then one panel per EViT layer with the
    patches that no longer have a token of their own (fused or dropped) blanked out."""
    from PIL import Image, ImageDraw


    if get_config(model) is None:
        raise EvitError("this model has no EViT layers: convert it first")
    adapter = adapters.get_adapter(model)
    dc = adapter.data_config(model)
    tf = transforms(dc, train=False)
    pics, tensors = [], []
    for path in images:
        pic = open_image(str(path), hint="give a JPEG or PNG file")
        t = tf(pic)
        tensors.append(t)
        mean, std = torch.tensor(dc["mean"])[:, None, None], torch.tensor(dc["std"])[:, None, None]
        arr = ((t * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        pics.append(Image.fromarray(arr))
    fates = patch_fates(model, torch.stack(tensors).to(next(model.parameters()).device))
    img = adapter.img_size(model)
    num_patches = adapter.num_tokens(model) - adapter.num_prefix_tokens(model)
    grid = int(round(num_patches ** 0.5))
    patch = img // grid
    scale = scale or max(1, 224 // img)
    size, gap = img * scale, 4
    cfg = get_config(model)
    cols = 1 + len(cfg.layers)
    canvas = Image.new("RGB", (cols * size + (cols - 1) * gap, len(pics) * size + (len(pics) - 1) * gap), "white")
    counts = []
    for r, (pic, per_layer) in enumerate(zip(pics, fates)):
        y = r * (size + gap)
        canvas.paste(pic.resize((size, size), Image.NEAREST), (0, y))
        row = []
        for c, visible in enumerate(per_layer, start=1):
            panel = pic.copy()
            draw = ImageDraw.Draw(panel)
            for p in range(num_patches):
                if p not in visible:
                    py, px = divmod(p, grid)
                    draw.rectangle([px * patch, py * patch, (px + 1) * patch - 1, (py + 1) * patch - 1], fill=BLANK)
            canvas.paste(panel.resize((size, size), Image.NEAREST), (c * (size + gap), y))
            row.append(num_patches - len(visible))
        counts.append(row)
    import io

    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    write_bytes(out, buf.getvalue())
    return {"output": str(out), "layers": list(cfg.layers), "keep_rates": list(cfg.keep_rates),
            "patch_grid": grid, "panel_px": size, "blanked_patches": counts, "images": [str(p) for p in images]}
