"""Towers without a class token exported as folders that transformers loads with trust_remote_code, in a
process that cannot import evit_cli: the same outputs as evit_cli.load (within 1e-5)."""

from __future__ import annotations

import json

import torch
import transformers as tf
from conftest import randomize
from test_remote_code import _compare_in_child, run_without_evit

import evit_cli
from evit_cli import adapters
from evit_cli.io import folder as artifact

TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3)
SIZE = dict(image_size=32, patch_size=4, hidden_size=48, num_hidden_layers=4, num_attention_heads=3,
            intermediate_size=96)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=99,
            max_position_embeddings=16)


def test_timm_towers_in_the_timmwrapper_layout_load_without_evit(tmp_path):
    folders = {}
    for name, model, score in (
        ("avg", evit_cli.convert("vit_base_patch16_224", pretrained=False, global_pool="avg", class_token=False,
                                 num_classes=5, **TINY, keep_rate=0.5, layers=(2, 3)), None),
        ("map_probe", evit_cli.convert("vit_base_patch16_siglip_224", pretrained=False, num_classes=5, **TINY,
                                       keep_rate=0.5, layers=(2, 3), score="probe"), "probe"),
    ):
        randomize(model)
        folders[name] = artifact.save(model, tmp_path / name, layout="transformers")
        assert json.loads((tmp_path / name / artifact.META_FILE).read_text())["evit"].get("score") == \
            (score or "received")
    result = _compare_in_child(folders, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)),
                               tmp_path)
    for name, r in result.items():
        assert r["evit"] < 1e-5 and r["dense"] < 1e-5 and r["dense_vs_evit"] > 1e-4, (name, r)


def test_siglip_towers_load_without_evit(tmp_path):
    """SiglipVisionModel (pooling head), SiglipModel (image tower) and SiglipForImageClassification (mean of
    the tokens): transformers' remote code gives what evit_cli.load gives."""
    torch.manual_seed(0)
    models = {
        "vision": tf.SiglipVisionModel(tf.SiglipVisionConfig(**SIZE)),
        "model": tf.SiglipModel(tf.SiglipConfig(text_config=TEXT, vision_config=SIZE)),
        "classifier": tf.SiglipForImageClassification(tf.SiglipConfig(text_config=TEXT, vision_config=SIZE,
                                                                      num_labels=5)),
    }
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    refs = {}
    for name, model in models.items():
        evit_cli.convert(randomize(model), keep_rate=0.5, layers=(2, 3))
        folder = evit_cli.save(model, tmp_path / name)
        loaded = evit_cli.load(folder)
        with torch.no_grad():
            refs[name] = {"folder": str(folder), "auto": json.loads((folder / artifact.META_FILE).read_text())
                          ["auto_class"], "evit": adapters.get_adapter(loaded).outputs(loaded, x)}
    torch.save({"x": x, "refs": refs}, tmp_path / "refs.pt")
    out = run_without_evit('''
        import json
        import transformers
        data = torch.load("refs.pt")
        result = {}
        for name, r in data["refs"].items():
            model = getattr(transformers, r["auto"]).from_pretrained(r["folder"], trust_remote_code=True).eval()
            result[name] = {"module": type(model).__module__,
                            "diff": (output(model, data["x"]) - r["evit"]).abs().max().item()}
        print(json.dumps(result))
    ''', tmp_path)
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result) == set(models)
    for name, r in result.items():
        assert r["diff"] < 1e-5, (name, r)


def _tiny_tokenizer():
    """A word-level fast tokenizer made here (no files to download), enough for SigLIP's text tower."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<unk>", "this", "is", "a", "photo", "of", "cat", "dog", "car", "."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", model_max_length=64)


def test_zero_shot_pipeline_runs_the_converted_siglip_folder(tmp_path):
    """pipeline("zero-shot-image-classification") on the exported folder loads the EViT model (the folder's code)
    and scores as evit_cli.load's model does, not as the dense one."""
    from PIL import Image

    torch.manual_seed(0)
    text = dict(TEXT, hidden_size=48, num_attention_heads=3, vocab_size=16, max_position_embeddings=64)
    model = randomize(tf.SiglipModel(tf.SiglipConfig(text_config=text, vision_config=SIZE)))
    folder = evit_cli.save(evit_cli.convert(model, keep_rate=0.5, layers=(2, 3)), tmp_path / "siglip")
    tokenizer, processor = _tiny_tokenizer(), tf.SiglipImageProcessor(size={"height": 32, "width": 32})
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)
    image = Image.fromarray((torch.rand(40, 48, 3) * 255).to(torch.uint8).numpy())
    labels = ["cat", "dog", "car"]
    pipe = tf.pipeline("zero-shot-image-classification", model=str(folder), trust_remote_code=True)
    assert type(pipe.model).__name__.startswith(("Evit", "EViT"))
    got = {r["label"]: r["score"] for r in pipe(image, candidate_labels=labels)}
    scores = {}
    for name, m in (("evit", evit_cli.load(folder)), ("dense", evit_cli.dense_copy(evit_cli.load(folder)))):
        same = tf.pipeline("zero-shot-image-classification", model=m, tokenizer=tokenizer, image_processor=processor)
        scores[name] = {r["label"]: r["score"] for r in same(image, candidate_labels=labels)}
    for c in labels:
        assert abs(got[c] - scores["evit"][c]) < 1e-5, (c, got, scores)
    assert max(abs(scores["evit"][c] - scores["dense"][c]) for c in labels) > 1e-6
