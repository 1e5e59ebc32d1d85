"""Embedding fidelity of headless models: cosine, neighbour overlap and kNN top-1, checked against
naive NumPy computations, in eval, sweep, search and per-epoch validation."""

from __future__ import annotations

import io
import json
import shlex

import numpy as np
import pytest
import torch
from conftest import tiny_timm
from test_cli import run
from test_fidelity import independent_logits, write_flat_folder
from test_train import COLORS, write_colour_folder

import evit_cli
from evit_cli.measure import fidelity
from evit_cli.measure.fidelity import Tally, knn_top1, neighbour_overlap
from evit_cli.model.convert import dense_copy

# --------------------------------------------------------------------------- naive references


def naive_neighbours(x: np.ndarray, k: int) -> list[set[int]]:
    """Each row's k most cosine-similar other rows, by sorting every row's similarities."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    out = []
    for i in range(len(x)):
        sims = [(float(unit[i] @ unit[j]), j) for j in range(len(x)) if j != i]
        out.append({j for _, j in sorted(sims, reverse=True)[:k]})
    return out


def naive_overlap(x: np.ndarray, ref: np.ndarray, k: int) -> float:
    a, b = naive_neighbours(x, k), naive_neighbours(ref, k)
    return 100 * np.mean([len(s & t) / k for s, t in zip(a, b)])


def naive_knn_top1(x: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Leave-one-out: each labelled image votes among its k nearest labelled images, weight = cosine."""
    keep = labels >= 0
    x, labels = x[keep], labels[keep]
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    right = 0
    for i in range(len(x)):
        sims = sorted(((float(unit[i] @ unit[j]), j) for j in range(len(x)) if j != i), reverse=True)[:k]
        votes: dict[int, float] = {}
        for s, j in sims:
            votes[int(labels[j])] = votes.get(int(labels[j]), 0.0) + s
        best = max(votes.values())
        right += min(c for c, v in votes.items() if v == best) == labels[i]
    return 100 * right / len(x)


@pytest.fixture
def emb():
    g = np.random.default_rng(0)
    return g.normal(size=(40, 8))


# --------------------------------------------------------------------------- the measures


def test_neighbour_overlap_matches_brute_force(emb):
    g = np.random.default_rng(1)
    noisy = emb + 0.6 * g.normal(size=emb.shape)
    got = neighbour_overlap(torch.tensor(noisy), torch.tensor(emb), k=10)
    want = naive_overlap(noisy, emb, 10)
    assert got == pytest.approx(want)
    assert 10 < want < 90  # neither trivial end: the check can fail


def test_same_embedding_overlaps_fully_and_a_permuted_one_does_not(emb):
    t = torch.tensor(emb)
    assert neighbour_overlap(t, t) == pytest.approx(100)
    shuffled = t[torch.randperm(len(t), generator=torch.Generator().manual_seed(0))]
    assert neighbour_overlap(shuffled, t) == pytest.approx(naive_overlap(shuffled.numpy(), emb, 10))
    assert neighbour_overlap(shuffled, t) < 50
    tally = Tally(embedding=True)
    tally.add(t.float(), t.float())
    r = tally.result()
    assert r["cosine"] == pytest.approx(1) and r["neighbour_overlap"] == pytest.approx(100)


def test_knn_top1_matches_brute_force_and_skips_unlabelled(emb):
    g = np.random.default_rng(2)
    labels = g.integers(0, 3, len(emb))
    x = emb + 1.5 * np.eye(3)[labels] @ g.normal(size=(3, 8))  # classes a little apart
    labels[:5] = -1
    for k in (5, 20):
        got = knn_top1(torch.tensor(x), torch.tensor(labels), k=k)
        assert got == pytest.approx(naive_knn_top1(x, labels, k))
    assert 40 < naive_knn_top1(x, labels, 5) < 100


def test_tally_gathers_the_whole_set_in_batches_and_blocks(emb, monkeypatch):
    """Batches of 7 rows and similarity blocks of 6 give what the whole set at once gives."""
    monkeypatch.setattr(fidelity, "_CHUNK", 6)
    g = np.random.default_rng(3)
    ref, out = torch.tensor(emb).float(), torch.tensor(emb + 0.5 * g.normal(size=emb.shape)).float()
    labels = torch.tensor(g.integers(0, 4, len(emb)))
    tally = Tally(embedding=True)
    for i in range(0, len(emb), 7):
        tally.add(out[i:i + 7], ref[i:i + 7], labels[i:i + 7])
    r = tally.result()
    cos = np.mean([a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(out.numpy(), ref.numpy())])
    assert r["cosine"] == pytest.approx(cos, rel=1e-5)
    assert r["neighbour_overlap"] == pytest.approx(naive_overlap(out.numpy(), ref.numpy(), fidelity.NEIGHBOURS))
    assert r["knn_top1"] == pytest.approx(naive_knn_top1(out.numpy(), labels.numpy(), fidelity.KNN_K))
    assert r["images"] == r["labelled_images"] == len(emb)


def test_one_image_has_no_neighbours():
    tally = Tally(embedding=True)
    tally.add(torch.ones(1, 4), torch.ones(1, 4), torch.zeros(1, dtype=torch.long))
    assert set(tally.result()) == {"images", "cosine"}


# --------------------------------------------------------------------------- through the commands


@pytest.fixture(scope="module")
def headless(tmp_path_factory):
    folder = tmp_path_factory.mktemp("headless") / "m"
    return evit_cli.save(evit_cli.convert(tiny_timm("vit", num_classes=0), keep_rate=0.3, layers=(2, 4)), folder)


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return write_colour_folder(tmp_path_factory.mktemp("colours") / "c", 8)


def colour_labels(folder) -> np.ndarray:
    """The class of each image in independent_logits' order (sorted paths), by its folder's name."""
    names = sorted(COLORS)
    return np.array([names.index(p.parent.name) for p in sorted(folder.rglob("*.png"))])


def test_eval_reports_embedding_fidelity_and_knn(headless, colours, capsys):
    code, stdout, err = run(["eval", headless, "--dataset", colours, "--batch", 5, "--reps", 1, "--workers", 0,
                             "--json"], capsys)
    assert code == 0, err
    r = json.loads(stdout)
    model = evit_cli.load(headless)
    evit, dense = independent_logits(model, colours).numpy(), independent_logits(dense_copy(model), colours).numpy()
    labels = colour_labels(colours)
    e, d = r["evit_model"], r["dense"]
    assert e["neighbour_overlap"] == pytest.approx(naive_overlap(evit, dense, 10))
    assert e["knn_top1"] == pytest.approx(naive_knn_top1(evit, labels, 20))
    assert d["knn_top1"] == pytest.approx(naive_knn_top1(dense, labels, 20))
    assert "neighbour_overlap" not in d and "top1" not in e and e["labelled_images"] == 24
    assert e["neighbour_overlap"] < 100  # keep 0.3 moves the embeddings: the check can fail


def test_eval_without_labels_has_overlap_but_no_knn(headless, tmp_path, capsys):
    photos = write_flat_folder(tmp_path / "photos", 14)
    code, stdout, err = run(["eval", headless, "--dataset", photos, "--batch", 4, "--reps", 1, "--workers", 0,
                             "--json"], capsys)
    assert code == 0, err
    e = json.loads(stdout)["evit_model"]
    model = evit_cli.load(headless)
    evit, dense = independent_logits(model, photos).numpy(), independent_logits(dense_copy(model), photos).numpy()
    assert e["neighbour_overlap"] == pytest.approx(naive_overlap(evit, dense, 10))
    assert "knn_top1" not in e


def test_sweep_rows_carry_the_embedding_measures(headless, colours, tmp_path, capsys):
    code, stdout, err = run(["sweep", headless, "--keep-rates", "0.5,1.0", "--dataset", colours, "--reps", 1,
                             "--batch", 8, "--workers", 0, "-o", tmp_path / "sw", "--json"], capsys)
    assert code == 0, err
    rows = {(x["model"], x["keep_rate"]): x for x in json.loads(stdout)["rows"]}
    assert rows[("evit", 1.0)]["neighbour_overlap"] == pytest.approx(100)
    assert rows[("evit", 1.0)]["cosine"] == pytest.approx(1, abs=1e-5)
    assert rows[("evit", 1.0)]["knn_top1"] == pytest.approx(rows[("dense", 1.0)]["knn_top1"])
    assert rows[("evit", 0.5)]["neighbour_overlap"] <= 100 and "knn_top1" in rows[("evit", 0.5)]
    assert "overlap" in (tmp_path / "sw" / "sweep.md").read_text()


def test_tables_show_the_measures_within_80_columns():
    from rich.console import Console

    from evit_cli.measure.report import eval_table, sweep_table

    m = {"cosine": 0.94123, "neighbour_overlap": 67.25, "knn_top1": 71.5, "gmacs": 1.2568, "images_per_s": 1234.5}
    ev = {"model": "deit_tiny_patch16_224", "dataset": "photos", "images": 3925, "labelled": True, "batch": 64,
          "evit": {"layers": [4, 7, 10], "keep_rates": [0.7]}, "speedup": 1.4, "device_name": "cpu",
          "dense": {"knn_top1": 73.0, "gmacs": 1.2568, "images_per_s": 1000.0}, "evit_model": m}
    rows = [{"model": "dense", "keep_rate": 1.0, "gmacs": 1.2568, "images_per_s": 1000.0, "speedup": 1.0,
             "knn_top1": 73.0}]
    rows += [{"model": "evit", "keep_rate": k, "gmacs": 1.2, "images_per_s": 1234.5, "speedup": 1.5, **m}
             for k in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]
    sweep = {"model": "deit_tiny_patch16_224", "img_size": 224, "layers": [4, 7, 10], "batch": 64, "rows": rows}
    texts = []
    for table in (eval_table(ev), sweep_table(sweep)):
        buf = io.StringIO()
        Console(file=buf, width=80).print(table)
        texts.append(buf.getvalue())
        assert max(len(line) for line in texts[-1].splitlines()) <= 80 and "…" not in texts[-1]
        assert "67.25" in texts[-1] and "0.9412" in texts[-1] and "73.00" in texts[-1]
    assert "10-NN overlap (%)" in texts[0] and "kNN top-1 (%)" in texts[0]
    assert "10-NN" in texts[1] and "overlap" in texts[1]  # the sweep's seven models fold its headers


def test_search_min_cosine_keeps_it_measured_independently(headless, colours, tmp_path, capsys):
    code, stdout, err = run(["search", headless, "--dataset", colours, "--min-cosine", 0.95, "--limit", 100,
                             "--workers", 0, "--json"], capsys)
    assert code == 0, err
    r = json.loads(stdout)
    assert r["constraint"] == "cosine >= 0.95" and r["gmacs"] < r["gmacs_dense"] and "knn_top1_dense" in r
    code, _, err = run([*shlex.split(r["command"])[1:], "-o", tmp_path / "found"], capsys)
    assert code == 0, err
    found = evit_cli.load(tmp_path / "found")
    a, b = independent_logits(found, colours), independent_logits(dense_copy(found), colours)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()
    assert cos >= 0.95 and cos == pytest.approx(r["cosine"], rel=1e-4)
    assert r["neighbour_overlap"] == pytest.approx(naive_overlap(a.numpy(), b.numpy(), 10))


@pytest.mark.parametrize("argv, words", [
    (["--min-agreement", 90], "constrain it with --min-cosine"),
    (["--min-cosine", 1.5], "--min-cosine must be between 0 and 1"),
    (["--min-cosine", 0.9, "--min-agreement", 90], "give one accuracy constraint"),
])
def test_search_constraints_of_a_headless_model_are_one_line(headless, colours, argv, words, capsys):
    code, stdout, err = run(["search", headless, "--dataset", colours, *argv, "--workers", 0], capsys)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1 and stdout == ""


def test_min_cosine_refuses_a_classifier(tmp_path, colours, capsys):
    folder = evit_cli.save(evit_cli.convert(tiny_timm("vit", num_classes=3), keep_rate=0.7, layers=(2,)),
                           tmp_path / "m")
    code, _, err = run(["search", folder, "--dataset", colours, "--min-cosine", 0.9, "--workers", 0], capsys)
    assert code == 2 and "--min-cosine is for headless" in err and len(err.strip().splitlines()) == 1


def test_per_epoch_validation_measures_embeddings(headless, colours):
    """The validation of a fine-tune, with the dense model as teacher, on a headless model."""
    from evit_cli import adapters
    from evit_cli.io.datasets import load_image_data
    from evit_cli.io.images import transforms, with_transform
    from evit_cli.measure.metrics import describe
    from evit_cli.train import TrainConfig
    from evit_cli.train.distill import Teacher
    from evit_cli.train.validation import evaluate

    model = evit_cli.load(headless)
    adapter = adapters.get_adapter(model)
    data = load_image_data(str(colours), val_split=None, whole_if_no_val=True)
    ds = with_transform(data.val, data.image_column, data.label_column,
                        transforms(adapter.data_config(model), train=False))
    teacher = Teacher(dense_copy(model).eval(), None, "dense")
    r = evaluate(model, model, ds, None, TrainConfig(batch_size=5, workers=0), torch.device("cpu"), teacher)
    evit, dense = independent_logits(model, colours).numpy(), independent_logits(teacher.model, colours).numpy()
    assert r["neighbour_overlap"] == pytest.approx(naive_overlap(evit, dense, 10))
    assert r["knn_top1"] == pytest.approx(naive_knn_top1(evit, colour_labels(colours), 20))
    r.update(keep_rate=[0.3], split="val")
    assert "10-NN overlap" in describe(r) and "kNN top-1" in describe(r)
