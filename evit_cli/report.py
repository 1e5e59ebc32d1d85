"""Render results: rich tables for people, JSON and Markdown files for scripts and reports."""

from __future__ import annotations

import os
from pathlib import Path

from rich.table import Table

from .fsutil import write_json, write_text

BENCH_JSON = "bench.json"
BENCH_MD = "bench.md"


def _ms(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def _fmt_latency(s: dict) -> str:
    return f"{_ms(s['median_ms'])} ({_ms(s['min_ms'])}-{_ms(s['max_ms'])})"


def bench_rows(r: dict) -> list[list[str]]:
    """The benchmark report as rows: header first, one row per model."""
    rows = [[
        "model", "GMACs", "params (M)", "tokens", f"images/s @{r['batch']}",
        f"ms/batch @{r['batch']}", "ms @1",
    ]]
    compiled = r.get("compiled") or {}
    for label, key in (("dense", "dense"), ("EViT", "evit_model")):
        m = r[key]
        static = [f"{m['gmacs']:.2f}", f"{m['params_m']:.1f}", "→".join(map(str, m["tokens"]))]
        for suffix, t in (("", m), (" compiled", compiled.get(key))):
            if t is not None:
                rows.append([label + suffix, *static, f"{t['images_per_s']:.1f}",
                             _fmt_latency(t["latency"]), _fmt_latency(t["latency_b1"])])
    return rows


def bench_notes(r: dict) -> list[str]:
    """Lines under the table: attention kernels, compiled and training speedups."""
    notes = []
    kernels = {k: r[k].get("attention_kernels") for k in ("dense", "evit_model")}
    if all(v is not None for v in kernels.values()):
        text = {k: ", ".join(f"{name} x{n}" for name, n in v.items()) or "none seen" for k, v in kernels.items()}
        notes.append(f"attention kernels: dense {text['dense']}; EViT {text['evit_model']}")
    if r.get("compiled"):
        c = r["compiled"]
        notes.append(f"torch.compile (mode {c['mode']}): speedup {c['speedup']:.2f}x at batch {r['batch']}, "
                     f"{c['speedup_b1']:.2f}x at batch 1")
    if r.get("training"):
        t = r["training"]
        notes.append(f"training step (forward, backward, AdamW) at batch {r['batch']}: dense "
                     f"{t['dense']['images_per_s']:.1f} images/s, EViT {t['evit_model']['images_per_s']:.1f}, "
                     f"speedup {t['speedup']:.2f}x")
    return notes


def bench_caption(r: dict) -> str:
    e = r["evit"]
    layers = ",".join(map(str, e["layers"]))
    rates = ",".join(f"{k:g}" for k in e["keep_rates"])
    return (
        f"{r['model']} @{r['img_size']}px, EViT layers {layers} keep {rates}{'' if e['fuse'] else ' (drop)'}; "
        f"{r['device_name']}, {r['precision']}, torch {r['torch']}; "
        f"speedup {r['speedup']:.2f}x at batch {r['batch']}, {r['speedup_b1']:.2f}x at batch 1, "
        f"MAC ratio {r['mac_ratio']:.2f}x. Latency: median (min-max) over {r['reps']} reps"
    )


def rows_table(title: str, caption: str, rows: list[list[str]]) -> Table:
    """A rich table from rows (header first): first column left, numbers right."""
    table = Table(title=title, caption=caption)
    for i, h in enumerate(rows[0]):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows[1:]:
        table.add_row(*row)
    return table


def bench_table(r: dict) -> Table:
    return rows_table("evit bench", "\n".join([bench_caption(r), *bench_notes(r)]), bench_rows(r))


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines) + "\n"


def bench_markdown(r: dict) -> str:
    notes = "".join(f"\n- {n}" for n in bench_notes(r))
    return f"# evit bench\n\n{bench_caption(r)}\n\n{markdown_table(bench_rows(r))}{notes}\n"


def write_bench(r: dict, folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    return [write_json(folder / BENCH_JSON, r), write_text(folder / BENCH_MD, bench_markdown(r))]


def kv_table(title: str, items: dict) -> Table:
    """A two-column table of named values."""
    table = Table(title=title, show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for k, v in items.items():
        table.add_row(str(k), v if isinstance(v, str) else _fmt(v))
    return table


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) if isinstance(x, float) else str(x) for x in v)
    return str(v)


def eval_rows(r: dict) -> list[list[str]]:
    rows = [["model", "top-1 (%)", "top-5 (%)", "GMACs", f"images/s @{r['batch']}"]]
    for label, key in (("dense", "dense"), ("EViT", "evit_model")):
        m = r[key]
        rows.append([label, f"{m['top1']:.2f}", f"{m['top5']:.2f}", f"{m['gmacs']:.2f}", f"{m['images_per_s']:.1f}"])
    return rows


def eval_table(r: dict) -> Table:
    e = r["evit"]
    caption = (f"{r['model']} on {r['dataset']} ({r['images']} images), EViT layers {','.join(map(str, e['layers']))} "
               f"keep {','.join(f'{k:g}' for k in e['keep_rates'])}, no training; speedup {r['speedup']:.2f}x; {r['device_name']}")
    return rows_table("evit eval", caption, eval_rows(r))


def sweep_rows(r: dict) -> list[list[str]]:
    acc = "top1" in r["rows"][0]
    head = ["model", "keep rate", "GMACs", f"images/s @{r['batch']}", "speedup"] + (["top-1 (%)", "top-5 (%)"] if acc else [])
    rows = [head]
    for x in r["rows"]:
        row = [x["model"], f"{x['keep_rate']:g}", f"{x['gmacs']:.3f}", f"{x['images_per_s']:.1f}", f"{x['speedup']:.2f}x"]
        if acc:
            row += [f"{x['top1']:.2f}", f"{x['top5']:.2f}"]
        rows.append(row)
    return rows


def sweep_table(r: dict) -> Table:
    caption = f"{r.get('model', '')} @{r['img_size']}px, EViT layers {','.join(map(str, r['layers']))}"
    return rows_table("evit sweep", caption, sweep_rows(r))


def sweep_markdown(r: dict) -> str:
    return f"# evit sweep\n\n{r.get('model', '')} @{r['img_size']}px, EViT layers {','.join(map(str, r['layers']))}\n\n{markdown_table(sweep_rows(r))}"
