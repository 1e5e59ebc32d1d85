"""The real DeiT-Tiny in other libraries' layouts, converted by evit, against evit's timm path.

Shown in docs/models.md, "Real hub files": the table after "On all the photos, keep 0.7 at layers
4,7,10, against the timm path on the same pixels", from benchmarks/results/layouts_real.{json,md}.
All 3925 photos take about 20 minutes on the project's 2-core CPU machine (as the page says).

The ../shared/real weights are mapped (by mappers written here, independently of evit_cli) into:
- the hub layout of facebook/deit-tiny-patch16-224 (transformers ViT: its config.json, label names
  aside, and its legacy preprocessor_config.json), and
- transformers' Data2Vec-vision layout (its older nested layers; absolute positions, no layer scale),
and each is converted with keep rate 0.7 at layers 4,7,10, as is the timm model. On the same pixels
(the timm model's preprocessing) of every photo of ../shared/real/imagenette-val it reports how often
the top-1 agrees with the timm path, on how many photos a logit differs by more than 1e-3, and how far
the dense models differ. Results: benchmarks/results/layouts_real.{json,md}, written at the end.
(tests/adapters/test_transformers_real.py runs the same check on 16 photos.)

    python benchmarks/layouts_real.py               # all 3925 photos, about 20 min on 2 CPU cores
    python benchmarks/layouts_real.py --limit 256   # a quick run
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also when run from elsewhere
import _common as c  # noqa: E402

LAYERS, KEEP = (4, 7, 10), 0.7
# facebook/deit-tiny-patch16-224 as published on the hub (config.json without its 1000 label names;
# preprocessor_config.json: the legacy feature extractor, resize to 256x256, crop 224, bicubic)
HUB_CONFIG = {"architectures": ["ViTForImageClassification"], "attention_probs_dropout_prob": 0.0,
              "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "hidden_size": 192, "image_size": 224,
              "initializer_range": 0.02, "intermediate_size": 768, "layer_norm_eps": 1e-12, "model_type": "vit",
              "num_attention_heads": 3, "num_channels": 3, "num_hidden_layers": 12, "patch_size": 16,
              "qkv_bias": True, "transformers_version": "4.13.0.dev0"}
HUB_PREPROCESSOR = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                    "feature_extractor_type": "DeiTFeatureExtractor", "image_mean": [0.485, 0.456, 0.406],
                    "image_std": [0.229, 0.224, 0.225], "resample": 3, "size": 256}


# --------------------------------------------------------------------------- the mappers (timm -> transformers)


def map_timm_embeddings(sd: dict, prefix: str) -> dict:
    """timm's class token, positions, patch embedding and final norm under transformers' ``prefix`` keys."""
    return {
        f"{prefix}.embeddings.cls_token": sd["cls_token"],
        f"{prefix}.embeddings.position_embeddings": sd["pos_embed"],
        f"{prefix}.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        f"{prefix}.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        f"{prefix}.layernorm.weight": sd["norm.weight"],
        f"{prefix}.layernorm.bias": sd["norm.bias"],
    }


def map_timm_blocks(sd: dict, layers: str, names, qkv: tuple[str, str, str], key_bias: bool = True) -> dict:
    """timm's blocks under ``layers.{i}``: ``names`` maps timm modules to theirs, ``qkv`` names the split
    projections (without ``key_bias`` the key gets no bias)."""
    out, i = {}, 0
    while f"blocks.{i}.norm1.weight" in sd:
        b, h = f"blocks.{i}", f"{layers}.{i}"
        for t, n in names:
            out[f"{h}.{n}.weight"], out[f"{h}.{n}.bias"] = sd[f"{b}.{t}.weight"], sd[f"{b}.{t}.bias"]
        for part, w, bias in zip(qkv, sd[f"{b}.attn.qkv.weight"].chunk(3), sd[f"{b}.attn.qkv.bias"].chunk(3)):
            out[f"{h}.{part}.weight"] = w
            if key_bias or part != qkv[1]:
                out[f"{h}.{part}.bias"] = bias
        i += 1
    return out


def timm_to_vit(sd: dict) -> dict:
    """A timm ViT state dict on transformers' ViTForImageClassification keys."""
    names = (("norm1", "layernorm_before"), ("norm2", "layernorm_after"), ("attn.proj", "attention.o_proj"),
             ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))
    qkv = ("attention.q_proj", "attention.k_proj", "attention.v_proj")
    return {**map_timm_embeddings(sd, "vit"), **map_timm_blocks(sd, "vit.layers", names, qkv),
            "classifier.weight": sd["head.weight"], "classifier.bias": sd["head.bias"]}


def timm_to_data2vec(sd: dict) -> dict:
    """A timm ViT state dict in transformers' older nested Data2Vec-vision layout (absolute positions, no layer
    scale, class-token pooling). Data2Vec's keys have no bias: dropping timm's key bias changes no attention
    weight (q . b_k is the same for every key of a query, and softmax ignores it)."""
    p = "data2vec_vision"
    names = (("norm1", "layernorm_before"), ("norm2", "layernorm_after"), ("attn.proj", "attention.output.dense"),
             ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"))
    qkv = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
    return {**map_timm_embeddings(sd, p), **map_timm_blocks(sd, f"{p}.encoder.layer", names, qkv, key_bias=False),
            "classifier.weight": sd["head.weight"], "classifier.bias": sd["head.bias"]}


def hub_folder(dst: Path) -> Path:
    """facebook/deit-tiny-patch16-224's config and legacy preprocessor, with the real timm weights mapped in."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    config = {**HUB_CONFIG, "id2label": {str(i): f"LABEL_{i}" for i in range(1000)}}
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (dst / "preprocessor_config.json").write_text(json.dumps(HUB_PREPROCESSOR, indent=2) + "\n")
    sd = {k: v.contiguous() for k, v in timm_to_vit(load_file(str(c.WEIGHTS))).items()}
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def data2vec_deit_tiny(attn: str):
    """The real DeiT-Tiny as a dense transformers Data2VecVisionForImageClassification (``attn``: eager or sdpa)."""
    from safetensors.torch import load_file
    from transformers import Data2VecVisionConfig, Data2VecVisionForImageClassification

    cfg = Data2VecVisionConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                               image_size=224, patch_size=16, layer_norm_eps=1e-6, num_labels=1000,
                               use_absolute_position_embeddings=True, use_relative_position_bias=False,
                               use_mean_pooling=False, layer_scale_init_value=0.0, attn_implementation=attn)
    model = Data2VecVisionForImageClassification(cfg).eval()
    model.load_state_dict(timm_to_data2vec(load_file(str(c.WEIGHTS))), strict=True)
    return model


# --------------------------------------------------------------------------- the comparison


def compare(models: dict, timm_evit, batches) -> list[dict]:
    """Each converted model of another layout against the timm path, EViT and dense, on the same batches."""
    import torch

    import evit_cli

    pairs = {name: (evit, evit_cli.dense_copy(evit)) for name, evit in models.items()}
    timm_dense = evit_cli.dense_copy(timm_evit)
    stats = {name: {"top1_agree": 0, "logit_diff_over_1e-3": 0, "dense_max_logit_diff": 0.0} for name in models}
    done = 0
    with torch.no_grad():
        for x in batches:
            ref, ref_dense = timm_evit(x), timm_dense(x)
            for name, (evit, dense) in pairs.items():
                a, st = evit(x).logits, stats[name]
                st["top1_agree"] += int((a.argmax(1) == ref.argmax(1)).sum())
                st["logit_diff_over_1e-3"] += int(((a - ref).abs().amax(1) > 1e-3).sum())
                st["dense_max_logit_diff"] = max(st["dense_max_logit_diff"],
                                                 float((dense(x).logits - ref_dense).abs().max()))
            done += len(x)
            print(f"{done} photos", file=sys.stderr, flush=True)
    return [{"layout": name, "photos": done, **stats[name], "tokens": evit_cli.tokens_after_layers(models[name])}
            for name in models]


def parse_args(argv):
    ap = c.Parser(__doc__)
    ap.add_argument("--limit", type=int, default=None, help="Photos, spread over the classes. [all: 3925]")
    ap.add_argument("--batch", type=int, default=128, help="Photos per forward pass. [128]")
    ap.add_argument("--out", type=Path, default=c.RESULTS, help="Folder for layouts_real.{json,md}.")
    args = ap.parse_args(argv)
    c.check_args(ap, args, ("limit", "batch"))
    return args


def markdown(result: dict) -> str:
    lines = [f"Keep {result['keep_rate']} at layers {','.join(map(str, result['layers']))}, against evit's timm path; "
             f"{result['machine']}. "
             "The hub config's LayerNorm eps is 1e-12 (timm's 1e-6), so its logits differ a little more.", "",
             "| layout | photos | top-1 agrees | logit diff > 1e-3 | dense max logit diff |", "|---|---|---|---|---|"]
    lines += [f"| {r['layout']} | {r['photos']} | {r['top1_agree']} | {r['logit_diff_over_1e-3']} | "
              f"{r['dense_max_logit_diff']:.1e} |" for r in result["rows"]]
    return "\n".join(lines) + "\n"


def run(args) -> dict:
    import torch

    import evit_cli

    torch.manual_seed(0)
    paths = c.photos()
    idx = c.spread(list(range(len(paths))), args.limit)
    timm_evit = evit_cli.convert("deit_tiny_patch16_224", checkpoint=str(c.WEIGHTS), keep_rate=KEEP, layers=LAYERS)
    batches = c.image_batches(paths, idx, c.dense_model(), batch=args.batch)  # the timm model's preprocessing
    with tempfile.TemporaryDirectory() as tmp:
        models = {"transformers ViT (facebook/deit-tiny-patch16-224 hub layout)":
                  evit_cli.convert(str(hub_folder(Path(tmp) / "deit-tiny")), keep_rate=KEEP, layers=LAYERS)}
    for attn in ("sdpa", "eager"):
        models[f"transformers Data2Vec-vision, {attn}"] = evit_cli.convert(data2vec_deit_tiny(attn), keep_rate=KEEP,
                                                                           layers=LAYERS)
    rows = compare(models, timm_evit, batches)
    result = {"keep_rate": KEEP, "layers": list(LAYERS), "machine": f"{c.machine()}, torch {torch.__version__}",
              "rows": rows}
    c.write_results(args.out, "layouts_real", result, markdown(result))
    return result


def main(argv=None) -> int:
    return c.run_script("layouts_real.py", parse_args, run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
