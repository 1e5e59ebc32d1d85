"""Render results: rich tables for people, JSON and Markdown files for scripts and reports."""

from __future__ import annotations

import os
from pathlib import Path

from rich import box
from rich.table import Table
from rich.text import Text

from ..algorithm.restore import parse_restore
from ..utils.files import write_json, write_text
from .metrics import cells, present

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
    compiled, ort = r.get("compiled") or {}, r.get("onnxruntime") or {}
    for label, key in (("dense", "dense"), ("EViT", "evit_model")):
        m = r[key]
        static = [f"{m['gmacs']:.2f}", f"{m['params_m']:.1f}", "→".join(map(str, m["tokens"]))]
        for suffix, t in (("", m), (" compiled", compiled.get(key)), (" ONNX Runtime", ort.get(key))):
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
    if r.get("onnxruntime"):
        o = r["onnxruntime"]
        notes.append(f"ONNX Runtime {o['onnxruntime']} ({o['provider']}, {o['threads']} threads): speedup "
                     f"{o['speedup']:.2f}x at batch {r['batch']}, {o['speedup_b1']:.2f}x at batch 1")
    if r.get("intermediates"):
        i = r["intermediates"]
        notes.append(f"forward_intermediates (NCHW maps at {','.join(map(str, i['indices']))}: backbone and restore): "
                     f"speedup {i['speedup']:.2f}x at batch {r['batch']}, {i['speedup_b1']:.2f}x at batch 1")
    if r.get("training"):
        t = r["training"]
        notes.append(f"training step (forward, backward, AdamW) at batch {r['batch']}: dense "
                     f"{t['dense']['images_per_s']:.1f} images/s, EViT {t['evit_model']['images_per_s']:.1f}, "
                     f"speedup {t['speedup']:.2f}x")
    return notes


def setting_note(e: dict) -> str:
    """What the EViT settings ``e`` (EViTConfig.to_dict) change from the paper's, for a caption:
    the method, the score and the restore ("" for the paper's algorithm)."""
    r = e.get("restore")
    parts = [e.get("method", "evit") != "evit" and e["method"], e.get("score") and f"ranked by {e['score']}",
             r and f"restore {parse_restore(r).text()}"]
    return "".join(f", {p}" for p in parts if p)


def bench_caption(r: dict) -> str:
    e = r["evit"]
    layers = ",".join(map(str, e["layers"]))
    rates = ",".join(f"{k:g}" for k in e["keep_rates"])
    return (
        f"{r['model']} @{r['img_size']}px, EViT layers {layers} keep {rates}{'' if e['fuse'] else ' (drop)'}"
        f"{setting_note(e)}; "
        f"{r['device_name']}, {r['precision']}, torch {r['torch']}; "
        f"speedup {r['speedup']:.2f}x at batch {r['batch']}, {r['speedup_b1']:.2f}x at batch 1, "
        f"MAC ratio {r['mac_ratio']:.2f}x. Latency: median (min-max) over {r['reps']} reps"
    )


def _plain_table(title: str, caption: str, rows: list[list[str]]) -> Table:
    table = Table(title=Text(title), caption=Text(caption), box=box.ROUNDED)
    for i, h in enumerate(rows[0]):
        table.add_column(Text(h), justify="left" if i == 0 else "right", overflow="fold")
    for row in rows[1:]:
        table.add_row(*(Text(cell) for cell in row))
    return table


class FittedTable:
    """Rows (header first) as a table that fits the terminal: one row per model when that fits,
    else one row per measurement (a column per model), else the first layout with cells folded.
    Cells are plain text (no markup) and are never cut with an ellipsis."""

    def __init__(self, title: str, caption: str, rows: list[list[str]]):
        self.wide = _plain_table(title, caption, rows)
        self.tall = _plain_table(title, caption, [list(col) for col in zip(*rows)])

    def __rich_console__(self, console, options):
        from rich.measure import Measurement

        unbounded = options.update(max_width=10_000)  # a measurement is clamped to the width it is given
        for table in (self.wide, self.tall):
            if Measurement.get(console, unbounded, table).maximum <= options.max_width:
                yield table
                return
        yield self.wide


def rows_table(title: str, caption: str, rows: list[list[str]]) -> FittedTable:
    """A rich renderable from rows (header first): first column left, numbers right."""
    return FittedTable(title, caption, rows)


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
    """A two-column table of named values; a nested dict becomes indented rows. Plain text, folded."""
    table = Table(title=Text(title), show_header=False, box=box.ROUNDED)
    table.add_column("", style="bold", overflow="fold")
    table.add_column("", overflow="fold")
    for k, v in items.items():
        if isinstance(v, dict):
            table.add_row(Text(str(k)), Text(""))
            for sub, value in v.items():
                table.add_row(Text(f"  {sub}"), Text(fmt_value(value)))
        else:
            table.add_row(Text(str(k)), Text(fmt_value(v)))
    return table


def fmt_number(v: float) -> str:
    """Rounded for reading: 4.601, 0.7, 72.74, 0.0001, 1.2e+07."""
    if v == 0 or 0.01 <= abs(v) < 1e6:
        return f"{v:.3f}".rstrip("0").rstrip(".")
    return f"{v:.3g}"


def fmt_value(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower() if isinstance(v, bool) else "-"
    if isinstance(v, float):
        return fmt_number(v)
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt_value(x) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k} {fmt_value(x)}" for k, x in v.items())
    return str(v)


def eval_rows(r: dict) -> list[list[str]]:
    """The eval report as rows: the measures some model has, GMACs, and images/s when it was timed."""
    models = (("dense", r["dense"]), ("EViT", r["evit_model"]))
    cols = present([m for _, m in models])
    timed = any(m.get("images_per_s") is not None for _, m in models)
    rows = [["model", *(m.title for m in cols), "GMACs", *([f"images/s @{r['batch']}"] if timed else [])]]
    for label, m in models:
        speed = [f"{m['images_per_s']:.1f}"] if timed else []
        rows.append([label, *cells(m, cols), f"{m['gmacs']:.2f}", *speed])
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
    skipped = f", {r['skipped_images']} unreadable skipped" if r.get("skipped_images") else ""
    speedup = f"speedup {r['speedup']:.2f}x; " if r.get("speedup") is not None else ""
    caption = (f"{r['model']} on {r['dataset']} ({r['images']} images{labels}{skipped}), EViT layers "
               f"{','.join(map(str, e['layers']))} "
               f"keep {','.join(f'{k:g}' for k in e['keep_rates'])}{setting_note(e)}, "
               f"{training_note(r.get('training'))}; "
               f"{r.get('reference', 'reference: the dense model')}; {speedup}{r['device_name']}")
    return rows_table("evit eval", caption, eval_rows(r))


def sweep_rows(r: dict) -> list[list[str]]:
    cols = present(r["rows"])
    rows = [["model", "keep rate", "GMACs", f"images/s @{r['batch']}", "speedup", *(m.title for m in cols)]]
    for x in r["rows"]:
        rows.append([x["model"], f"{x['keep_rate']:g}", f"{x['gmacs']:.3f}", f"{x['images_per_s']:.1f}",
                     f"{x['speedup']:.2f}x", *cells(x, cols)])
    return rows


def sweep_table(r: dict) -> Table:
    caption = f"{r.get('model', '')} @{r['img_size']}px, EViT layers {','.join(map(str, r['layers']))}"
    if r.get("skipped_images"):
        caption += f"; {r['skipped_images']} unreadable images skipped"
    return rows_table("evit sweep", caption, sweep_rows(r))


def sweep_markdown(r: dict) -> str:
    return (f"# evit sweep\n\n{r.get('model', '')} @{r['img_size']}px, EViT layers {','.join(map(str, r['layers']))}"
            f"\n\n{markdown_table(sweep_rows(r))}")
