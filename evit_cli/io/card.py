"""The model card (``README.md``) of an exported folder: what the model is, how it was made and
trained, and what loads how; and the one-line summaries ``evit info`` shows."""

from __future__ import annotations

from . import bundle

# What ranks the tokens (config.SCORES), in the model card's words.
SCORE_WORDS = {"cls": "class-token attention (the paper's)", "mean_query": "attention of the mean query",
               "received": "attention each token receives, averaged over queries",
               "probe": "the attention-pooling head's own query"}


def model_card(meta: dict) -> str:
    src, e = meta["source"], meta["evit"]
    lines = [
        "---",
        "library_name: "
        + ("timm" if meta["family"] == "timm" and meta.get("layout") != "transformers" else "transformers"),
        "tags: [image-classification, vision-transformer, evit]",
        "---",
        "",
        f"# {src.get('model')} + EViT",
        "",
        f"{src.get('model')} ({meta['family']}) with EViT token reorganization (Liang et al., ICLR 2022),",
        f"made with evit {meta['tool_version']}.",
        "",
    ]
    if e:
        lines += [
            f"- EViT layers (1-based): {', '.join(map(str, e['layers']))}",
            f"- keep rates: {', '.join(f'{k:g}' for k in e['keep_rates'])}; inattentive tokens "
            + ("fused into one token" if e["fuse"] else "dropped"),
            f"- tokens: {' -> '.join(map(str, [meta['num_tokens']] + meta['token_counts']))}",
            f"- tokens ranked by: {SCORE_WORDS.get(e.get('score', 'cls'), e.get('score'))}",
        ]
        if e.get("method", "evit") != "evit":
            lines.append(f"- method: {e['method']}")
        if e.get("restore"):
            r = e["restore"]
            lines.append(f"- removed patches restored for dense maps by: {r['strategy']} (temperature "
                         f"{r['temperature']:g}" + (f", top {r['top_k']}" if r.get("top_k") else "") + ")")
    if "gmacs" in meta:
        lines.append(f"- GMACs per image: {meta['gmacs_dense']:.2f} dense -> {meta['gmacs']:.2f} EViT")
    lines += [
        f"- weights: {weights_of(meta)}",
        f"- image size: {meta['img_size']}, classes: {meta['num_classes']}",
    ]
    lines += training_lines(meta)
    return "\n".join(lines + loading_lines(meta)) + "\n"


def loading_lines(meta: dict) -> list[str]:
    """The model card's account of what loads how: with evit, with transformers' remote code, dense."""
    lines = ["", "## Loading", "", "With evit installed (`pip install evit-cli`), the EViT model:", "",
             "```python", "import evit_cli", 'model = evit_cli.load("path/to/this/folder")  # or "org/name" on the hub',
             "```"]
    auto = meta.get("auto_class")
    if not auto:
        return lines
    return lines + [
        "", "Without evit, the EViT model through transformers: the folder carries its modeling code "
        f"(`{bundle.ENTRY_FILE}` and the `evit_*.py` files it imports, evit's own EViT code), which "
        "`trust_remote_code=True` runs:", "",
        "```python", f"from transformers import {auto}",
        f'model = {auto}.from_pretrained("path/to/this/folder", trust_remote_code=True)', "```", "",
        f"Without `trust_remote_code`, `{auto}.from_pretrained` gives the **dense** model with the same "
        "weights: correct outputs, but none of EViT's speed.",
    ]


def weights_of(meta: dict) -> str:
    """Where the weights come from, in words: fine-tuned, a checkpoint, pretrained or random."""
    t, src = meta.get("training"), meta["source"]
    if t:
        return f"fine-tuned from {describe_start(t['from'])} on {t['dataset']} ({t['steps']} steps)"
    if src.get("pretrained") is False and not src.get("checkpoint"):
        return "random"
    return src.get("checkpoint") or "pretrained"


def describe_start(start: dict) -> str:
    pretrained = start.get("pretrained")
    w = start.get("checkpoint") or {True: "pretrained weights", False: "random weights",
                                    None: "its weights"}[pretrained]
    return f"{start.get('model')} ({w})"


def training_summary(meta: dict) -> str:
    """One line on how the weights were trained (for ``evit info``)."""
    t = meta.get("training")
    if not t:
        return "none (converted, not fine-tuned)"
    dist = f", distilled from {t['distillation']['teacher']}" if t.get("distillation") else ""
    if t.get("token_selection", "own class attention") != "own class attention":
        dist += f", tokens chosen by the {t['token_selection']}"
    return (f"{t['steps']} steps on {t['dataset']} ({'with' if t['labels'] else 'without'} labels{dist}); "
            f"head {t['head']}; metrics on {t['metrics_split']}")


def training_lines(meta: dict) -> list[str]:
    """The model card's account of a fine-tune."""
    t = meta.get("training")
    if not t:
        return ["- training: none (converted, not fine-tuned)"]
    lines = [
        "",
        "## Fine-tuning",
        "",
        f"- from: {describe_start(t['from'])}",
        f"- data: {t['dataset']}, split {t['train_split']!r}"
        + (f", {t['train_images']} images" if t.get("train_images") else ""),
        f"- labels: {'used' if t['labels'] else 'none (unlabelled images)'}; loss: {t['loss']}",
        f"- head: {t['head']}",
        f"- steps: {t['steps']} ({t['epochs']:g} epochs at batch {t['global_batch']}, peak lr {t['lr']:g})",
    ]
    if t.get("token_selection", "own class attention") != "own class attention":
        lines.append(f"- token selection while training: {t['token_selection']} (the paper's oracle); "
                     "at inference the model chooses by its own class attention")
    if t.get("distillation"):
        dd = t["distillation"]
        lines.append(f"- distillation: teacher {dd['teacher']}, weight {dd['alpha']:g}, temperature {dd['tau']:g}")
    m = meta.get("metrics") or {}
    keys = ("agreement", "kl", "cosine", "neighbour_overlap", "knn_top1", "top1", "top5")
    shown = ", ".join(f"{k} {m[k]:.{4 if k in ('kl', 'cosine') else 2}f}" for k in keys if k in m)
    if shown:
        lines.append(f"- metrics on {t['metrics_split']}: {shown}")
    return lines

