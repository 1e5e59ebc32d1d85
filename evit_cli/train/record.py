"""What a fine-tune leaves: the training record (written into evit.json, the model card, ``evit
info`` and ``evit eval``) and the output folder as an exported model with its metrics.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..io import folder as artifact
from ..utils.files import write_json
from .config import TrainConfig
from .setup import Setup, head_note, recovery_epochs


def training_record(cfg: TrainConfig, s: Setup, final: dict, *, total_steps: int, global_batch: int, lr: float,
                    train_images: int | None) -> dict:
    """What the fine-tuned folder says about how it was made (evit.json, model card, info, eval)."""
    t = s.teacher
    return {
        # the dense model it started from (evaluate.origin_of), a folder by its absolute path;
        # pretrained None: a folder's own weights
        "from": {"model": str(Path(cfg.model).resolve()) if Path(cfg.model).is_dir() else cfg.model,
                 "checkpoint": cfg.checkpoint,
                 "pretrained": None if Path(cfg.model).is_dir() and not cfg.checkpoint else cfg.pretrained},
        "dataset": cfg.dataset, "train_split": cfg.train_split, "train_images": train_images,
        "labels": s.data.labelled, "loss": s.loss, "head": head_note(s),
        "token_selection": f"oracle: {s.oracle_source}" if s.oracle_source else "own class attention",
        "distillation": None if t is None else {
            "teacher": t.source, "loss": t.kind, "alpha": cfg.distill_alpha if s.trains_on_labels else 1.0,
            "tau": cfg.distill_tau, "features": t.features, "layers": t.layers, "mixup": cfg.mixup,
            "cutmix": cfg.cutmix},
        "steps": total_steps, "epochs": recovery_epochs(cfg, s), "global_batch": global_batch, "lr": lr,
        "weight_decay": cfg.weight_decay, "img_size": s.adapter.img_size(s.model),
        "metrics_split": f"{final['split']}, {final['images']} images", "previous": s.previous,
    }


def export(model, out: Path, final: dict, record: dict) -> None:
    """The output folder becomes an exported model, with metrics.json."""
    model.eval()
    tmp = Path(tempfile.mkdtemp(prefix=".export.", dir=out))
    try:
        artifact.save(model, tmp / "m", extra={"metrics": final, "training": record})
        for f in (tmp / "m").iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(out / "metrics.json", final)
