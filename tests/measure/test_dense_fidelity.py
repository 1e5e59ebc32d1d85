"""Map fidelity of a dense-prediction model (issue 32): its feature maps are compared patch by patch."""

from __future__ import annotations

import torch
from test_dense import dinov2_backbone
from test_fidelity import write_flat_folder

import evit_cli
from evit_cli.measure.fidelity import Tally


def test_a_feature_map_is_scored_by_its_mean_per_patch_cosine():
    g = torch.Generator().manual_seed(0)
    out, ref = torch.randn(3, 5, 4, 4, generator=g), torch.randn(3, 5, 4, 4, generator=g)
    tally = Tally(embedding=True)
    tally.add(out, ref)
    naive = 0.0
    for b in range(3):
        cos = [float(out[b, :, i, j] @ ref[b, :, i, j] / (out[b, :, i, j].norm() * ref[b, :, i, j].norm()))
               for i in range(4) for j in range(4)]
        naive += sum(cos) / len(cos)
    assert abs(tally.sums["cosine"] - naive) < 1e-5


def test_eval_of_a_dinov2_backbone_reports_map_fidelity(tmp_path):
    folder = write_flat_folder(tmp_path / "images", 6)
    model = evit_cli.convert(dinov2_backbone(), keep_rate=1.0, layers=(2, 3))
    same = evit_cli.evaluate(model, folder, bench=False, workers=0)
    assert abs(same.evit_model.cosine - 1.0) < 1e-6
    evit_cli.convert(model, keep_rate=0.5, layers=(2, 3))
    reduced = evit_cli.evaluate(model, folder, bench=False, workers=0)
    assert 0.3 < reduced.evit_model.cosine < 0.9999


def test_search_finds_a_dinov2_backbone_setting_within_a_map_fidelity_constraint(tmp_path, capsys):
    import json

    import transformers as tf
    from conftest import randomize
    from test_cli import run

    folder = write_flat_folder(tmp_path / "images", 6)
    torch.manual_seed(0)  # wide enough that removing tokens saves more MACs than the restore costs
    cfg = tf.Dinov2Config(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
                          image_size=32, patch_size=4, out_features=["stage4"], reshape_hidden_states=True)
    model = evit_cli.convert(randomize(tf.Dinov2Backbone(cfg)), keep_rate=1.0, layers=(3,))
    evit_cli.save(model, tmp_path / "bb")
    code, stdout, err = run(["search", tmp_path / "bb", "--dataset", folder, "--min-cosine", 0.5, "--workers", 0,
                             "--method", "evit", "--reps", 1, "--json"], capsys)
    assert code == 0, err
    r = json.loads(stdout)
    assert r["constraint"] == "cosine >= 0.5" and r["gmacs"] < r["gmacs_dense"] and r["cosine"] >= 0.5


def test_visualize_shows_what_a_segmentation_model_kept(tmp_path):
    import transformers as tf
    from conftest import randomize
    from test_dense import SIZE

    from evit_cli.measure.visualize import visualize

    images = sorted(write_flat_folder(tmp_path / "images", 2).iterdir())
    cfg = tf.BeitConfig(**SIZE, out_indices=[1, 2, 3, 4], use_relative_position_bias=True, use_auxiliary_head=False,
                        num_labels=3, pool_scales=[1, 2], channels=8)
    model = evit_cli.convert(randomize(tf.BeitForSemanticSegmentation(cfg)), keep_rate=0.5, layers=(2, 3))
    r = visualize(model, images, tmp_path / "kept.png")
    assert (tmp_path / "kept.png").is_file() and r["patch_grid"] == 8
    for first, second in r["blanked_patches"]:  # 64 patches -> 32 kept (+ fused) -> 17 of those 33 kept
        assert first == 32 and second in (47, 48)  # 48 when the fused token was among the 17
