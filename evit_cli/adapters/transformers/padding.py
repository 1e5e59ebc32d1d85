"""SigLIP 2's padded patch sequences under EViT (docs/algorithm.md, "Padded patch sequences").

SigLIP 2 takes each image as its flattened patches (``pixel_values`` (B, L, 3 * p * p)), padded to the
processor's ``max_num_patches`` ``L``, with ``pixel_attention_mask`` (B, L) marking the valid ones and
``spatial_shapes`` (B, 2) their grid; the encoder's attention and the pooling head mask the padding out.

A hook on the vision tower records, per forward, which tokens are valid (``PositionState.padding``; ``None``
when the mask is all ones: the unpadded path runs). From then on every EViT block works per image
(``reorg.reorganize_padded``): the score is computed with the padded keys masked (and, for ``"received"``,
averaged over the valid queries only), each image keeps ``ceil(keep_rate * M_b)`` of its own ``M_b`` valid
candidates and fuses the rest, and a padded token, or a slot an image does not use, holds 0 patches: every
later attention masks it as a key, the pool adds ``log 0`` to its logit, the classifier's mean weighs it 0.
Before the first reorganization the blocks get transformers' own mask, so keep 1.0 is the original model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..block import BlockState, PositionState


class CapturePadding:
    """Forward pre-hook of the vision tower: the valid tokens of this forward's batch, from its patch mask."""

    def __init__(self, positions: PositionState):
        self.positions = positions

    def __call__(self, module: nn.Module, args, kwargs):
        mask = kwargs.get("pixel_attention_mask", args[1] if len(args) > 1 else None)
        # traced or exported (from images: adapter.run's mask is all ones) and on the meta device: the unpadded path
        static = mask is None or mask.is_meta or torch.jit.is_tracing() or torch.compiler.is_compiling()
        self.positions.padding = None if static or bool(mask.all()) else mask.bool()
        return None


def padding_bias(state: BlockState, x: Tensor) -> Tensor | None:
    """The additive attention mask (B, 1, 1, N) of ``x``'s padded tokens (the dtype's minimum; valid ones 0), in a
    padded batch; ``None`` in others."""
    valid = state.valid_tokens(x)
    if valid is None:
        return None
    return ((~valid).to(x.dtype) * torch.finfo(x.dtype).min)[:, None, None, :]


def patchify(images: Tensor, patch: int) -> dict[str, Tensor]:
    """The inputs SigLIP 2's processor makes of ``images`` (B, 3, H, W) already at their size: every patch valid,
    in its patch layout (rows of patches, each patch's pixels row by row, channels last)."""
    b, c, h, w = images.shape
    rows, cols = h // patch, w // patch
    x = images[:, :, :rows * patch, :cols * patch].reshape(b, c, rows, patch, cols, patch)
    x = x.permute(0, 2, 4, 3, 5, 1).reshape(b, rows * cols, patch * patch * c)
    shapes = torch.tensor([[rows, cols]], device=images.device).expand(b, 2)  # b traced: a dynamic batch
    return {"pixel_values": x, "pixel_attention_mask": torch.ones_like(x[..., 0], dtype=torch.int32),
            "spatial_shapes": shapes}


def install(root: nn.Module, positions: PositionState) -> None:
    root.register_forward_pre_hook(CapturePadding(positions), with_kwargs=True)


def uninstall(root: nn.Module) -> None:
    hooks = root._forward_pre_hooks
    for key in [k for k, fn in hooks.items() if isinstance(fn, CapturePadding)]:
        hooks.pop(key)
        root._forward_pre_hooks_with_kwargs.pop(key, None)
