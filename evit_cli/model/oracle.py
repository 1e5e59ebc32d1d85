"""Oracle token selection while training (the EViT paper's oracle experiment).

A dense, well-trained ViT (the oracle) chooses which tokens the student keeps.
At each EViT layer of the student, the oracle's class attention at the same
layer, averaged over heads and taken over the original patches, ranks the
student's candidate tokens:

- a token that is still one original patch scores that patch's attention;
- the fused token stays the fused token: it scores the summed oracle attention
  of the original patches it holds (it is one candidate, as in self-selection).

The fusion weights stay the student's own class attention, the numbers it uses
at inference, so only the choice of the kept set changes. The oracle runs dense
(keep rate 1.0), once per batch, and its output can serve as the distillation
teacher too. Outside :meth:`Oracle.guiding` (evaluation, inference, export) the
student chooses by its own attention, as always.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .. import adapters
from ..errors import EvitError
from .convert import convert_module, get_config


class Oracle:
    """Ranks ``student``'s tokens by ``teacher``'s class attention while :meth:`guiding`.

    ``teacher`` is converted in place to keep rate 1.0 at the student's EViT
    layers (its outputs are the dense model's) so that it reports its class
    attention there. Call :meth:`detach` before copying or saving the student.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module):
        cfg = get_config(student)
        if cfg is None:
            raise EvitError("oracle selection needs an EViT student: convert the model first")
        if cfg.method != "evit":
            raise EvitError(f"oracle selection follows the paper's fused token: convert with --method evit, not "
                            f"{cfg.method}")
        if adapters.num_sequences(student) > 1 or adapters.num_sequences(teacher) > 1:
            raise EvitError("oracle selection needs single-sequence ViTs: a CrossViT's two branches are not supported")
        self._check_compatible(student, teacher, max(cfg.layers))
        convert_module(teacher, keep_rate=1.0, layers=cfg.layers)
        self.teacher = teacher.eval()
        self.teacher_prefix = adapters.get_adapter(teacher).num_prefix_tokens(teacher)
        self.student_blocks = adapters.evit_blocks(student)
        self._index = {id(b): j for j, b in enumerate(self.student_blocks)}
        self._attn: list[Tensor] | None = None  # per EViT layer: (B, patches), while guiding
        self._assign: Tensor | None = None  # (B, M, patches): which original patches each token holds
        for blk in adapters.evit_blocks(teacher):
            blk.evit.rank = self._capture
        for blk in self.student_blocks:
            blk.evit.rank, blk.evit.record = self._rank, True

    @staticmethod
    def _check_compatible(student: nn.Module, teacher: nn.Module, last_layer: int) -> None:
        sa, ta = adapters.get_adapter(student), adapters.get_adapter(teacher)
        ps = sa.num_tokens(student) - sa.num_prefix_tokens(student)
        pt = ta.num_tokens(teacher) - ta.num_prefix_tokens(teacher)
        if ps != pt:
            raise EvitError(f"the oracle sees {pt} patches and the student {ps}: give an oracle with the student's "
                            f"patch grid")
        if ta.depth(teacher) < last_layer:
            raise EvitError(f"the oracle has {ta.depth(teacher)} blocks, the student reorganizes at block "
                            f"{last_layer}: give a deeper oracle")

    def observe(self, images: Tensor):
        """Run the oracle dense on ``images``; keep its class attention; return its output."""
        self._attn = []
        with torch.no_grad():
            return adapters.get_adapter(self.teacher).run(self.teacher, images)

    @contextmanager
    def guiding(self, images: Tensor):
        """Inside, the student's forward on ``images`` keeps the tokens the oracle ranks highest.

        Yields the oracle's output (logits for distillation)."""
        try:
            yield self.observe(images)
        finally:
            self._attn, self._assign = None, None

    def detach(self) -> None:
        """Remove the hooks from the student: it chooses by its own attention again."""
        for blk in self.student_blocks:
            blk.evit.rank, blk.evit.record, blk.evit.kept = None, False, None
        self._attn, self._assign = None, None

    # ------------------------------------------------------------------ hooks

    def _capture(self, blk: nn.Module, x: Tensor, cls_attn: Tensor) -> None:
        if self._attn is not None:
            self._attn.append(cls_attn[:, self.teacher_prefix:].detach().float())
        return None

    def _rank(self, blk: nn.Module, x: Tensor, cls_attn: Tensor) -> Tensor | None:
        if self._attn is None:
            return None
        j = self._index[id(blk)]
        prefix = blk.evit.num_prefix
        if j == 0:
            b, m = x.shape[0], x.shape[1] - prefix
            self._assign = torch.eye(m, device=x.device).expand(b, m, m)
        else:
            prev = self.student_blocks[j - 1]
            self._assign = follow(self._assign, prev.evit.kept, prev.evit.fuse)
        if self._assign.shape[:2] != (x.shape[0], x.shape[1] - prefix):
            raise RuntimeError("oracle: the student's tokens do not match the images the oracle saw")
        scores = self._assign @ self._attn[j].unsqueeze(-1)  # (B, M, 1)
        return torch.cat([scores.new_zeros(x.shape[0], prefix), scores.squeeze(-1)], dim=1)


def follow(assign: Tensor, kept: Tensor | None, fuse: bool) -> Tensor:
    """Which original patches each token holds after a reorganization.

    ``assign``: (B, M, P) 0/1 rows; ``kept``: (B, k) indices among the M
    candidates (``None``: nothing removed). The fused token, when there is one,
    holds every patch the kept tokens do not.
    """
    if kept is None:
        return assign
    rows = assign.gather(1, kept.unsqueeze(-1).expand(-1, -1, assign.shape[-1]))
    if not fuse:
        return rows
    fused = assign.sum(1, keepdim=True) - rows.sum(1, keepdim=True)
    return torch.cat([rows, fused], dim=1)
