"""Oracle selection (issue 13): a dense teacher's class attention chooses the student's tokens."""

from __future__ import annotations

import copy
import math

import torch
from conftest import tiny_timm
from reference import _attention

import evit_cli
from evit_cli import adapters
from evit_cli.model.oracle import Oracle


def _kept(model):
    return [b.evit.kept for b in adapters.evit_blocks(model)]


def test_oracle_identical_to_the_student_selects_what_the_student_selects(images):
    # one reorganizing layer (keep 1.0 elsewhere): the student's tokens there are the oracle's
    student = evit_cli.convert(tiny_timm(seed=3), keep_rate=(1.0, 0.5), layers=(2, 4))
    teacher = evit_cli.dense_copy(student)
    adapters.record_kept(student)
    with torch.no_grad():
        own = student(images)
        own_kept = _kept(student)[1].sort(dim=1).values
    oracle = Oracle(student, teacher)
    with torch.no_grad(), oracle.guiding(images) as teacher_out:
        guided = student(images)
    assert torch.allclose(teacher_out, evit_cli.dense_copy(student).eval()(images), atol=1e-5)
    assert torch.equal(_kept(student)[1].sort(dim=1).values, own_kept)
    assert torch.allclose(guided, own, atol=1e-6)


def _naive_teacher_rows(teacher, img, layers):
    """Class-attention rows over the patches at each of ``layers``, dense, one image."""
    x = teacher._pos_embed(teacher.patch_embed(img[None]))[0]
    p = teacher.num_prefix_tokens
    rows = {}
    for i, blk in enumerate(teacher.blocks, start=1):
        a_out, a = _attention(blk, blk.norm1(x))
        if i in layers:
            rows[i] = a[:, 0, :].mean(0)[p:]
        x = x + a_out
        x = x + blk.mlp(blk.norm2(x))
    return rows


def _naive_guided_student(student, teacher, img, layers, rate):
    """The student's forward for one image with the oracle's choice, from the module docstring:
    a token scores the summed oracle attention of the patches it holds; fusion uses the
    student's own class attention."""
    rows = _naive_teacher_rows(teacher, img, layers)
    p = student.num_prefix_tokens
    x = student._pos_embed(student.patch_embed(img[None]))[0]
    holds = [{j} for j in range(x.shape[0] - p)]
    for i, blk in enumerate(student.blocks, start=1):
        a_out, a = _attention(blk, blk.norm1(x))
        x = x + a_out
        if i in layers:
            m = x.shape[0] - p
            k = math.ceil(round(rate * m, 6))
            score = [sum(float(rows[i][j]) for j in h) for h in holds]
            order = sorted(range(m), key=lambda t: -score[t])
            keep, drop = order[:k], order[k:]
            own = a[:, 0, :].mean(0)[p:]
            toks = x[p:]
            fused = sum(own[t] * toks[t] for t in drop)
            x = torch.cat([x[:p], toks[keep], fused[None]], 0)
            holds = [holds[t] for t in keep] + [set().union(*(holds[t] for t in drop))]
        x = x + blk.mlp(blk.norm2(x))
    return student.forward_head(student.norm(x)[None])[0]


def test_guided_forward_equals_a_naive_per_image_computation(images):
    layers = (2, 4, 5)
    student = evit_cli.convert(tiny_timm(seed=1), keep_rate=0.5, layers=layers)
    teacher = tiny_timm(seed=2)  # another model: its choices differ from the student's own
    naive_teacher = copy.deepcopy(teacher)
    oracle = Oracle(student, teacher)
    with torch.no_grad(), oracle.guiding(images):
        guided = student(images)
    with torch.no_grad():
        expected = torch.stack([_naive_guided_student(student, naive_teacher, img, layers, 0.5) for img in images])
        self_selected = student(images)
    assert torch.allclose(guided, expected, atol=1e-4)
    assert not torch.allclose(guided, self_selected, atol=1e-4)  # the oracle did choose


def test_training_step_with_the_oracle_and_the_hooks_removed_after(images):
    student = evit_cli.convert(tiny_timm(seed=1), keep_rate=0.5, layers=(2, 4))
    teacher = tiny_timm(seed=2)
    oracle = Oracle(student, teacher)
    student.train()
    with oracle.guiding(images) as t:
        loss = torch.nn.functional.kl_div(student(images).log_softmax(-1), t.softmax(-1), reduction="batchmean")
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.blocks[0].parameters())
    oracle.detach()
    student.eval()
    copied = copy.deepcopy(student)  # no hook left that would drag the teacher along
    assert not any(b.evit.rank is not None for b in adapters.evit_blocks(copied))
    with torch.no_grad():
        assert torch.equal(copied(images), student(images))


def test_oracle_refuses_a_teacher_with_another_patch_grid():
    import pytest

    student = evit_cli.convert(tiny_timm(), keep_rate=0.5, layers=(2,))
    with pytest.raises(evit_cli.EvitError, match="patches"):
        Oracle(student, tiny_timm(img_size=48))


def test_finetune_with_the_oracle_trains_and_the_folder_says_so(tmp_path):
    """--oracle without labels (distillation; one teacher forward serves both) and with labels
    and --no-distill (the dense model is the oracle only)."""
    import json

    from test_fidelity import write_flat_folder
    from test_train import write_colour_folder

    from evit_cli.train import TrainConfig, finetune

    start = evit_cli.save(evit_cli.convert(tiny_timm("vit", num_classes=3), keep_rate=0.5, layers=(2, 4)),
                          tmp_path / "m")
    flat = write_flat_folder(tmp_path / "flat", 24)
    final = finetune(TrainConfig(model=str(start), dataset=str(flat), output=str(tmp_path / "a"), epochs=1,
                                 batch_size=8, workers=0, bench=False, oracle=True))
    t = json.loads((tmp_path / "a" / "evit.json").read_text())["training"]
    assert (t["token_selection"] == "oracle: the dense model before conversion"
            and final["loss"].startswith("distillation"))
    assert "oracle" in (tmp_path / "a" / "README.md").read_text()
    saved = evit_cli.load(tmp_path / "a")  # chooses by its own attention: no hook travels with it
    assert not any(b.evit.rank is not None for b in adapters.evit_blocks(saved))
    colours = write_colour_folder(tmp_path / "colours", 6)
    finetune(TrainConfig(model=str(start), dataset=str(colours), output=str(tmp_path / "b"), epochs=1, batch_size=6,
                         workers=0, bench=False, oracle=True, distill=False, head="new"))
    t = json.loads((tmp_path / "b" / "evit.json").read_text())["training"]
    assert t["token_selection"] == "oracle: the dense model before conversion" and t["distillation"] is None
