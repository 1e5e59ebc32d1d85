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
    for label, key in (("dense", "dense"), ("EViT", "evit_model")):
        m = r[key]
        rows.append([
            label, f"{m['gmacs']:.2f}", f"{m['params_m']:.1f}", "→".join(map(str, m["tokens"])),
            f"{m['images_per_s']:.1f}", _fmt_latency(m["latency"]), _fmt_latency(m["latency_b1"]),
        ])
    return rows


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
    return rows_table("evit bench", bench_caption(r), bench_rows(r))


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines) + "\n"


def bench_markdown(r: dict) -> str:
    return f"# evit bench\n\n{bench_caption(r)}\n\n{markdown_table(bench_rows(r))}"


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


FIDELITY_COLUMNS = (("agreement", "agreement (%)", "{:.2f}"), ("kl", "KL(dense‖EViT)", "{:.4f}"),
                    ("cosine", "cosine", "{:.4f}"), ("top1", "top-1 (%)", "{:.2f}"), ("top5", "top-5 (%)", "{:.2f}"))


def _fidelity_columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """The fidelity and accuracy columns that some row has; a row without one shows '-' (the dense model itself)."""
    return [c for c in FIDELITY_COLUMNS if any(c[0] in x for x in rows)]


def _cells(x: dict, cols) -> list[str]:
    return [fmt.format(x[k]) if k in x else "-" for k, _, fmt in cols]


def eval_rows(r: dict) -> list[list[str]]:
    cols = _fidelity_columns([r["dense"], r["evit_model"]])
    rows = [["model", *(h for _, h, _ in cols), "GMACs", f"images/s @{r['batch']}"]]
    for label, key in (("dense", "dense"), ("EViT", "evit_model")):
        m = r[key]
        rows.append([label, *_cells(m, cols), f"{m['gmacs']:.2f}", f"{m['images_per_s']:.1f}"])
    return rows


def training_note(t: dict | None) -> str:
    if not t:
        return "no training"
    how = "with labels" if t.get("labels") else "without labels"
    dist = ", distilled" if t.get("distillation") else ""
    return f"fine-tuned on {t['dataset']} ({t['steps']} steps, {how}{dist})"


def eval_table(r: dict) -> Table:
    e = r["evit"]
    labels = "" if r.get("labelled", True) else ", no labels"
    caption = (f"{r['model']} on {r['dataset']} ({r['images']} images{labels}), EViT layers {','.join(map(str, e['layers']))} "
               f"keep {','.join(f'{k:g}' for k in e['keep_rates'])}, {training_note(r.get('training'))}; "
               f"speedup {r['speedup']:.2f}x; {r['device_name']}")
    return rows_table("evit eval", caption, eval_rows(r))


def sweep_rows(r: dict) -> list[list[str]]:
    cols = _fidelity_columns(r["rows"])
    rows = [["model", "keep rate", "GMACs", f"images/s @{r['batch']}", "speedup", *(h for _, h, _ in cols)]]
    for x in r["rows"]:
        rows.append([x["model"], f"{x['keep_rate']:g}", f"{x['gmacs']:.3f}", f"{x['images_per_s']:.1f}",
                     f"{x['speedup']:.2f}x", *_cells(x, cols)])
    return rows


def sweep_table(r: dict) -> Table:
    caption = f"{r.get('model', '')} @{r['img_size']}px, EViT layers {','.join(map(str, r['layers']))}"
    return rows_table("evit sweep", caption, sweep_rows(r))


def sweep_markdown(r: dict) -> str:
    return f"# evit sweep\n\n{r.get('model', '')} @{r['img_size']}px, EViT layers {','.join(map(str, r['layers']))}\n\n{markdown_table(sweep_rows(r))}"
