"""SigLIP 2 towers (transformers' Siglip2VisionModel, Siglip2Model's image tower, Siglip2ForImageClassification) on
tiny random models of transformers' own classes, fed a batch whose images have different spatial shapes, so that
two of its three rows are padded under ``pixel_attention_mask``: keep 1.0 is the original model exactly; below it
each image of the padded batch gets what a hand-written EViT forward gives it alone, unpadded; padding never counts;
shapes, token counts and MACs follow; a saved folder loads back with evit and, without evit, through transformers'
remote code; the zero-shot pipeline runs the converted folder."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as tf
from conftest import randomize
from test_no_class_token_export import _tiny_tokenizer
from test_remote_code import run_without_evit
from test_transformers_no_class_token import naive_layers

import evit_cli
from evit_cli.adapters import evit_blocks, get_adapter
from evit_cli.algorithm.reorg import token_counts
from evit_cli.io import folder as artifact
from evit_cli.model.macs import count_macs

VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=3, patch_size=4,
              num_patches=16)
TEXT = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=3, vocab_size=16,
            max_position_embeddings=64)
LAYERS, RATES = (2, 3), (0.5, 0.6)
SHAPES = ((4, 4), (3, 3), (2, 5))  # 16, 9 and 10 valid patches of 16
BUILDERS = {
    "vision": lambda: tf.Siglip2VisionModel(tf.Siglip2VisionConfig(**VISION)),
    "vision_no_head": lambda: tf.Siglip2VisionModel(tf.Siglip2VisionConfig(**VISION, vision_use_head=False)),
    "model": lambda: tf.Siglip2Model(tf.Siglip2Config(text_config=TEXT, vision_config=VISION)),
    "classifier": lambda: tf.Siglip2ForImageClassification(tf.Siglip2Config(text_config=TEXT, vision_config=VISION,
                                                                            num_labels=5)),
}


def build(name: str):
    torch.manual_seed(0)
    return randomize(BUILDERS[name]())


def padded_batch(seed: int = 1, padding: float | None = None) -> dict:
    """Three images of SHAPES, flattened and padded to 16 patches as the processor does (``padding``: what the
    padded rows hold; random by default, the processor's zeros are one case of it)."""
    g = torch.Generator().manual_seed(seed)
    n = max(h * w for h, w in SHAPES)
    pixels = torch.randn(len(SHAPES), n, 3 * 4 * 4, generator=g)
    mask = torch.zeros(len(SHAPES), n, dtype=torch.int32)
    for b, (h, w) in enumerate(SHAPES):
        mask[b, :h * w] = 1
    if padding is not None:
        pixels = torch.where(mask[..., None].bool(), pixels, torch.full_like(pixels, padding))
    return {"pixel_values": pixels, "pixel_attention_mask": mask, "spatial_shapes": torch.tensor(SHAPES)}


def output(model, inputs: dict) -> torch.Tensor:
    """What users take: the pooled embedding (Siglip2Model through get_image_features), the logits, or (no head)
    the last hidden state."""
    if hasattr(model, "text_model"):
        return model.get_image_features(**inputs).pooler_output
    out = model(**inputs)
    if getattr(out, "logits", None) is not None:
        return out.logits
    return out.pooler_output if out.pooler_output is not None else out.last_hidden_state


def reference(model, inputs: dict, score: str) -> tuple[torch.Tensor, list[list[int]]]:
    """Each image alone, its valid patches only (no padding, no mask), through a hand-written EViT forward over the
    original model's own modules: the score's row by hand (tests/adapters/test_transformers_no_class_token.py), the
    ``ceil(rate * M)`` best of its ``M`` tokens kept, the rest fused into their score-weighted mean, then transformers'
    own head (or the classifier's mean) on the sequence where each token is repeated by the patches it holds.
    Independent of evit's padded path, which is what it checks (the converted model run on the unpadded image would
    share most of its code with what is tested). Returns the outputs and each image's sequence lengths."""
    vm = getattr(model, "vision_model", model)
    outs, lengths = [], []
    for b in range(len(SHAPES)):
        m = int(inputs["pixel_attention_mask"][b].sum())
        x = vm.embeddings(inputs["pixel_values"][b:b + 1, :m], inputs["spatial_shapes"][b:b + 1])[0]
        x, sizes, after = naive_layers(vm, x, score, dict(zip(LAYERS, RATES)))
        seen = [len(after[i]) for i in LAYERS]
        tokens = vm.post_layernorm(x).repeat_interleave(sizes.long(), 0)
        if hasattr(model, "classifier"):
            outs.append(model.classifier(tokens.mean(0)))
        else:
            outs.append(vm.head(tokens[None])[0])
        lengths.append(seen)
    return torch.stack(outs), lengths


def _lengths(model, inputs: dict) -> tuple[torch.Tensor, list[int]]:
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o.shape[1])) for b in evit_blocks(model)]
    try:
        return output(model, inputs), seen
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_keep_1_is_the_original_on_a_padded_batch(name):
    model, inputs = build(name), padded_batch()
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense, dense_images = output(model, inputs), get_adapter(model).outputs(model, images)
        for score in get_adapter(model).scores(model):
            evit = evit_cli.convert(copy.deepcopy(model), keep_rate=1.0, layers=LAYERS, score=score)
            assert torch.equal(output(evit, inputs), dense), score
            assert torch.equal(get_adapter(evit).outputs(evit, images), dense_images), score
    assert get_adapter(model).scores(model)[0] == "received"
    assert ("probe" in get_adapter(model).scores(model)) == (name != "vision_no_head")


@pytest.mark.parametrize("name,score", [("vision", "received"), ("vision", "mean_query"), ("vision", "probe"),
                                        ("classifier", "received")])
def test_a_padded_batch_equals_each_image_alone_by_the_equations(name, score):
    model, inputs = build(name), padded_batch()
    evit = evit_cli.convert(copy.deepcopy(model), keep_rate=RATES, layers=LAYERS, score=score)
    with torch.no_grad():
        got, seen = _lengths(evit, inputs)
        want, lengths = reference(model, inputs, score)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert lengths == [[9, 7], [6, 5], [6, 5]]  # ceil(0.5 * M) + 1, then ceil(0.6 * that) + 1, per image
    assert seen == [max(c) for c in zip(*lengths)]  # the batch: its longest image's, the others padded


def test_padding_is_never_ranked_fused_or_read():
    """Whatever the padded rows hold, the outputs stay; every image's tokens hold exactly its valid patches, and
    every token that is not masked comes from a valid patch (or is the fused token)."""
    model = build("vision")
    evit = evit_cli.convert(copy.deepcopy(model), keep_rate=RATES, layers=LAYERS)
    with torch.no_grad():
        base = evit(**padded_batch())
        noisy = evit(**padded_batch(padding=1e4))
        positions = evit_blocks(evit)[0].evit.positions
        sizes, pos = positions.sizes, positions.pos
    torch.testing.assert_close(noisy.pooler_output, base.pooler_output, atol=1e-6, rtol=1e-6)
    valid = torch.tensor([h * w for h, w in SHAPES])
    assert sizes.sum(1).tolist() == valid.float().tolist()
    live = sizes > 0
    assert ((pos < valid[:, None]) | ~live).all() and ((pos >= 0) | (pos == -1)).all()
    assert live.sum(1).tolist() == [7, 5, 5]


def test_shapes_token_counts_and_macs_follow_the_prediction():
    """On images (every patch valid, adapter.run patchifies them as the processor does) the lengths are
    tokens_after_layers'; MACs fall below the dense model's and equal them at keep 1.0."""
    for name in ("vision", "model", "classifier"):
        model = build(name)
        images = torch.randn(2, 3, 16, 16)
        evit = evit_cli.convert(copy.deepcopy(model), keep_rate=RATES, layers=LAYERS)
        with torch.no_grad():
            dense = get_adapter(model).outputs(model, images)
            seen = []
            hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o.shape[1])) for b in evit_blocks(evit)]
            out = get_adapter(evit).outputs(evit, images)
            for h in hooks:
                h.remove()
        assert out.shape == dense.shape and seen == evit_cli.tokens_after_layers(evit) == [9, 7], name
        assert evit_cli.tokens_after_layers(evit) == token_counts(16, 0, list(LAYERS), list(RATES))
        if name == "vision":  # the other two run the same tower
            same = evit_cli.convert(copy.deepcopy(model), keep_rate=1.0, layers=LAYERS)
            assert count_macs(same, 16) == count_macs(model, 16) > count_macs(evit, 16)


def test_saved_folders_load_with_evit_and_with_remote_code_without_it(tmp_path):
    """evit_cli.save -> evit_cli.load gives the same outputs on the padded batch; the folder loads through
    transformers with trust_remote_code in a process that cannot import evit_cli, within 1e-5."""
    inputs, refs = padded_batch(), {}
    for name in ("vision", "model", "classifier"):
        model = build(name)
        evit = evit_cli.convert(model, keep_rate=RATES, layers=LAYERS)
        folder = evit_cli.save(evit, tmp_path / name)
        loaded = evit_cli.load(folder)
        with torch.no_grad():
            want, dense = output(evit, inputs), output(evit_cli.dense_copy(evit), inputs)
            got = output(loaded, inputs)
        assert evit_cli.model_state(loaded).config.score == "received"
        assert got.shape == dense.shape and torch.equal(got, want), name
        assert (want - dense).abs().max() > 1e-4, name
        refs[name] = {"folder": str(folder), "evit": want,
                      "auto": json.loads((folder / artifact.META_FILE).read_text())["auto_class"]}
    torch.save({"inputs": inputs, "refs": refs}, tmp_path / "refs.pt")
    out = run_without_evit('''
        import json
        import transformers
        data = torch.load("refs.pt")
        result = {}
        for name, r in data["refs"].items():
            model = getattr(transformers, r["auto"]).from_pretrained(r["folder"], trust_remote_code=True).eval()
            with torch.no_grad():
                if hasattr(model, "text_model"):
                    got = model.get_image_features(**data["inputs"]).pooler_output
                else:
                    got = model(**data["inputs"])
                    got = got.logits if getattr(got, "logits", None) is not None else got.pooler_output
            result[name] = {"module": type(model).__module__, "diff": (got - r["evit"]).abs().max().item()}
        print(json.dumps(result))
    ''', tmp_path)
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result) == set(refs)
    for name, r in result.items():
        assert r["diff"] < 1e-5 and not r["module"].startswith("transformers."), (name, r)


def test_zero_shot_pipeline_runs_the_converted_siglip2_folder(tmp_path):
    """pipeline("zero-shot-image-classification") on the exported Siglip2Model folder (its own image processor pads
    the image's patches) loads the EViT model and scores as evit_cli.load's model does, not as the dense one."""
    from PIL import Image

    folder = evit_cli.save(evit_cli.convert(build("model"), keep_rate=RATES, layers=LAYERS), tmp_path / "siglip2")
    tokenizer, processor = _tiny_tokenizer(), tf.Siglip2ImageProcessor(patch_size=4, max_num_patches=16)
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)
    image = Image.fromarray((torch.rand(20, 12, 3) * 255).to(torch.uint8).numpy())  # fewer than 16 patches
    labels = ["cat", "dog", "car"]
    # the tokenizer given: transformers reads a siglip2 folder's tokenizer as Gemma's, which the tiny one is not
    pipe = tf.pipeline("zero-shot-image-classification", model=str(folder), tokenizer=tokenizer, trust_remote_code=True)
    assert type(pipe.model).__name__.startswith(("Evit", "EViT"))
    assert type(pipe.image_processor).__name__.startswith("Siglip2ImageProcessor")
    got = {r["label"]: r["score"] for r in pipe(image, candidate_labels=labels)}
    scores = {}
    for name, m in (("evit", evit_cli.load(folder)), ("dense", evit_cli.dense_copy(evit_cli.load(folder)))):
        same = tf.pipeline("zero-shot-image-classification", model=m, tokenizer=tokenizer, image_processor=processor)
        scores[name] = {r["label"]: r["score"] for r in same(image, candidate_labels=labels)}
    for c in labels:
        assert abs(got[c] - scores["evit"][c]) < 1e-5, (c, got, scores)
    assert max(abs(scores["evit"][c] - scores["dense"][c]) for c in labels) > 1e-6


def test_methods_that_do_not_follow_the_padding_are_refused_in_one_line():
    for kwargs in ({"method": "squeeze"}, {"proportional_attention": True}):
        with pytest.raises(evit_cli.EvitError, match="pads its patch sequences") as err:
            evit_cli.convert(build("vision"), keep_rate=0.5, layers=LAYERS, **kwargs)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["vision", "classifier"])
def test_onnx_export_of_the_converted_tower_matches_pytorch(name, tmp_path):
    """The dynamo ONNX exporter meets transformers' torch._check_tensor_all on the spatial shapes (aten._is_all_true,
    which it cannot translate by itself): the converted tower and classifier export, and the file gives PyTorch's
    outputs on images (adapter.run patchifies them, every patch valid), at the predicted token counts."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from evit_cli.io.export import export

    evit = evit_cli.convert(build(name), keep_rate=RATES, layers=LAYERS)
    report = export(evit, "onnx", tmp_path / "m.onnx", check_batches=(1,))  # itself checked against PyTorch
    assert report["tokens_after_layers"] == [9, 7]
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])
    with torch.no_grad():
        want = get_adapter(evit).outputs(evit, images)
    assert got.shape == want.shape and (got - want).abs().max() < 1e-4
