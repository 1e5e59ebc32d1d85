"""The step arithmetic of a fine-tune and of its resume, against values worked out by hand."""

from __future__ import annotations

import json
import math

import pytest

from evit_cli import EvitError
from evit_cli.algorithm.schedule import Schedule, lr_at, steps_per_epoch
from evit_cli.train.checkpoint import Position, kept_rows, save_due
from evit_cli.train.resume import changed_setting


def test_steps_per_epoch_drops_the_last_partial_step():
    # 81 images, batch 8: 10 full batches (80 images), the 81st dropped
    assert steps_per_epoch(81, batch_size=8, accum_steps=1, given=None) == 10
    # batch 4 x 3 micro-batches = 12 images a step: 81 // 12 = 6 (72 images)
    assert steps_per_epoch(81, batch_size=4, accum_steps=3, given=None) == 6
    assert steps_per_epoch(8, batch_size=8, accum_steps=1, given=None) == 1
    assert steps_per_epoch(None, batch_size=8, accum_steps=2, given=5) == 5  # a stream: as given
    assert steps_per_epoch(100, batch_size=8, accum_steps=1, given=3) == 3


def test_fewer_images_than_one_step_is_refused_with_the_numbers():
    with pytest.raises(EvitError,
                       match=r"has 7 images, fewer than one step takes \(--batch-size 8 x --accum-steps 1\)"):
        steps_per_epoch(7, batch_size=8, accum_steps=1, given=None)
    with pytest.raises(EvitError, match=r"has 5 images per process \(2 processes\).*--batch-size 2 x --accum-steps 3"):
        steps_per_epoch(5, batch_size=2, accum_steps=3, given=None, world=2)
    with pytest.raises(EvitError, match="has no images"):
        steps_per_epoch(0, batch_size=1, accum_steps=1, given=4)


def test_plan_fractional_epochs_and_the_last_partial_epoch():
    s = Schedule.plan(2.5, 0.5, 10, base_lr=1.0, min_lr=0.0)
    assert (s.total_steps, s.warmup_steps, s.num_epochs) == (25, 5, 3)
    assert [s.steps_in_epoch(e) for e in range(3)] == [10, 10, 5]
    tiny = Schedule.plan(0.01, 0, 10, base_lr=1.0, min_lr=0.0)  # round(0.1) = 0: still one step
    assert (tiny.total_steps, tiny.num_epochs, tiny.steps_in_epoch(0)) == (1, 1, 1)
    exact = Schedule.plan(3, 0, 7, base_lr=1.0, min_lr=0.0)
    assert (exact.total_steps, exact.num_epochs, exact.steps_in_epoch(2)) == (21, 3, 7)


def test_learning_rate_by_hand():
    # warm-up over 4 steps to 0.8: 0.2, 0.4, 0.6, 0.8; then a cosine over the 8 steps left down to 0.1
    assert [lr_at(i, 12, 4, 0.8, 0.1) for i in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lr_at(4, 12, 4, 0.8, 0.1) == pytest.approx(0.8)  # t = 0: the peak
    assert lr_at(8, 12, 4, 0.8, 0.1) == pytest.approx(0.45)  # t = 1/2: halfway, 0.1 + 0.7 / 2
    assert lr_at(6, 12, 4, 0.8, 0.1) == pytest.approx(0.1 + 0.7 * (1 + math.sqrt(0.5)) / 2)  # t = 1/4
    assert lr_at(12, 12, 4, 0.8, 0.1) == pytest.approx(0.1) and lr_at(50, 12, 4, 0.8, 0.1) == pytest.approx(0.1)
    assert lr_at(0, 1, 0, 0.5, 0.0) == pytest.approx(0.5)  # one step, no warm-up


def test_keep_rates_and_lr_at_a_global_step():
    # 10 steps an epoch; 1.0 for 1 epoch, then a cosine over 2 epochs to each layer's target
    s = Schedule.plan(4, 0, 10, base_lr=1.0, min_lr=0.0, keep_targets=(0.5, 0.7), shrink_start=1, shrink_epochs=2)
    assert s.at(0)[0] == [1.0, 1.0] and s.at(9)[0] == [1.0, 1.0]
    assert s.at(10)[0] == pytest.approx([1.0, 1.0])  # t = 0
    assert s.at(20)[0] == pytest.approx([0.75, 0.85])  # t = 1/2: the middle of 1.0 and the target
    assert s.at(30)[0] == [0.5, 0.7] and s.at(39)[0] == [0.5, 0.7]
    assert s.at(20)[1] == pytest.approx(0.5)  # total 40, no warm-up: step 20 is halfway down
    # an epoch's metrics row reports the last step it took; before any step, step 0
    assert s.after(20) == s.at(19) and s.after(0) == s.at(0)


def test_where_a_resumed_run_starts():
    mid = Position(epoch=1, step=13, in_epoch=3)  # killed 3 steps into the 2nd epoch of 10-step epochs
    assert [mid.first_step(e) for e in (1, 2, 3)] == [3, 0, 0]
    end = Position(epoch=2, step=20, in_epoch=0)  # the end-of-epoch checkpoint of epoch 2
    assert end.first_step(2) == 0
    assert Position.of({"epoch": 1, "step": 13, "step_in_epoch": 3}) == mid


def test_mid_epoch_checkpoints_every_n_steps_but_not_at_the_epoch_end():
    # 5 steps an epoch, --save-every 2: after steps 2, 4, (6 is the 1st step of epoch 2), 8; step 10 ends epoch 2
    due = [step for step in range(1, 11) if save_due(step, (step - 1) % 5 + 1, 5, 2)]
    assert due == [2, 4, 6, 8]
    assert not any(save_due(step, 1, 5, 0) for step in range(1, 11))  # 0: end of epoch only


def test_logs_are_cut_back_to_what_the_checkpoint_holds():
    rows = [json.dumps({"step": i, "loss": 0.1 * i}) for i in range(6)]
    assert kept_rows(rows, 4, "step") == rows[:4]
    assert kept_rows(rows + ['{"step": 6, "lo'], 4, "step") == rows[:4]  # a line cut by a kill
    assert kept_rows(rows + [""], 6, "step") == rows
    with pytest.raises(EvitError, match="line 2 of the log is not a row"):
        kept_rows([rows[0], "garbage", rows[1]], 4, "step")
    with pytest.raises(EvitError, match="line 1 of train_log.jsonl"):
        kept_rows(['{"epoch": 1}', rows[1]], 4, "step", "train_log.jsonl")  # a row without the key


def test_a_resume_may_not_change_what_the_run_computes():
    started = {"model": "runs/deit_tiny", "dataset": "/data/flowers/", "keep_rate": 0.7, "batch_size": 32,
               "workers": 8, "device": "cuda", "seed": 0}
    assert changed_setting(started, {**started, "workers": 2, "device": "cpu"}) is None  # how, not what
    assert changed_setting(started, {**started, "dataset": "flowers", "model": "/tmp/x/deit_tiny"}) is None
    assert changed_setting(started, {**started, "keep_rate": 0.5}) == "--keep-rate 0.7, these settings give 0.5"
    assert changed_setting(started,
                           {**started, "model": "deit_small"}) == "MODEL runs/deit_tiny, these settings give deit_small"
    assert changed_setting(started, {**started, "seed": None}) == "--seed 0, these settings give (not given)"
    assert changed_setting(started, {**started, "new_option": 1}) is None  # a run from an older version
