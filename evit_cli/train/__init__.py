"""Fine-tuning an EViT model: the settings (:mod:`.config`), the set-up (:mod:`.setup`), the
training batches (:mod:`.loader`), the loop (:mod:`.loop`), validation (:mod:`.validation`),
checkpoints and resuming (:mod:`.checkpoint`, :mod:`.resume`), distillation (:mod:`.distill`) and
the training record (:mod:`.record`).

    from evit_cli.train import TrainConfig, finetune
    metrics = finetune(TrainConfig(model="deit_t_evit", dataset="./photos", output="deit_t_recovered"))
"""

from .config import TrainConfig, load_recipe
from .loop import finetune

__all__ = ["TrainConfig", "finetune", "load_recipe"]
