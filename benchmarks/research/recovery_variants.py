"""Variants of the label-free recovery, compared fast: what was tried for the README's tables.

Shown in docs/finetuning.md, "Winning the accuracy back, measured: ...": the table of variants
"trained on classes 0-4" (a classifier) and the commands under it; and in "Embedding models": the
table "What was tried for the loss" (--embed). Both from
benchmarks/research/results/recovery_variants.jsonl (one line per run). On the project's 2-core CPU
machine one variant of 2 epochs on the 1450 photos of a split takes about 4 minutes (3.5 to 6; the
--tokens term about 12), 4 epochs about 14; the first run also decodes all 3925 photos into the
cache (a few minutes).

A short training loop outside `evit finetune` (the photos decoded once into tensors, the dense
teacher's held-out logits cached), so that one variant takes minutes on 2 cores. Same data as
benchmarks/generalize_real.py: DeiT-Tiny of ../shared/real, EViT 0.7 at 4,7,10; train on the photos
with index % 4 != 0 of the --split classes (a flat set, no labels), score on the held-out photos
(index % 4 == 0) of the classes it saw and never saw: top-1 / agreement with the ORIGINAL dense
model / KL (--embed: cosine / neighbour overlap / kNN top-1, 20 neighbours as `evit eval`). Function
matching throughout (the teacher sees the same mixup/CutMix batch), MSE on the logits, AdamW, cosine
lr, as `evit finetune`; the options change one thing each:

    python benchmarks/research/recovery_variants.py --offshelf --split 0-4
    python benchmarks/research/recovery_variants.py --split 0-4 --name base --wise 0.5
    python benchmarks/research/recovery_variants.py --split 0-4 --name feat1 --feat 1.0     # + pre-logits features
    python benchmarks/research/recovery_variants.py --split 0-4 --name jig50 --jigsaw 0.5   # + shuffled 4x4 tiles
    python benchmarks/research/recovery_variants.py --split 0-4 --name ep4 --epochs 4 --wise 0.7
    python benchmarks/research/recovery_variants.py --embed --split 0-4 --name e_cosrel --loss cosrel  # headless
    python benchmarks/research/recovery_variants.py --embed --split 0-4 --name e_cls1 --loss cosrel --cls-layers 1
    python benchmarks/research/recovery_variants.py --embed --split 0-4 --name e_tok1 --loss cosrel --tokens 1
    python benchmarks/research/recovery_variants.py --embed --split 0-4 --name e_rel1 --loss cosrel --rel 1 \
        --rel-tau 0.1

--wise A also scores the weights interpolated A of the way from the start to the end (WiSE-FT).
Each result is a line in --out/recovery_variants.jsonl. The decoded photos are cached in
$EVIT_VARIANTS_CACHE (default: a folder in the temporary directory).
"""

import copy
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _common
import _common as c  # noqa: E402  (puts this checkout first on sys.path)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import evit_cli  # noqa: E402
from evit_cli.train.loader import mix_batch  # noqa: E402

R = Path(os.environ.get("EVIT_VARIANTS_CACHE", Path(tempfile.gettempdir()) / "evit_recovery_variants"))
RESULTS = Path(__file__).resolve().parent / "results"
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def cache():
    """Every photo as a 224 px uint8 crop (the training input), the held-out ones (index % 4 == 0) through
    the dense model's eval preprocessing, their class numbers and the dense model's held-out logits."""
    R.mkdir(parents=True, exist_ok=True)
    f = R / "cache.pt"
    if f.exists():
        return torch.load(f)
    import torchvision.transforms.v2.functional as TF
    from PIL import Image

    paths = c.photos()
    m = c.dense_model()
    tf = c.eval_transform(m)
    raw, ev = [], []
    for i, p in enumerate(paths):
        im = Image.open(p).convert("RGB")
        raw.append(TF.center_crop(TF.resize(TF.pil_to_tensor(im), 224, antialias=True), 224))
        if i % 4 == 0:
            ev.append(tf(im))
    raw = torch.stack(raw)
    ev = torch.stack(ev)
    cls = torch.tensor(c.class_numbers(paths, list(range(len(paths)))))
    with torch.inference_mode():
        dl = torch.cat([m(ev[s : s + 128]) for s in range(0, len(ev), 128)])
    d = {"raw": raw, "ev": ev, "cls": cls, "dl": dl}
    torch.save(d, f)
    return d


def augment(x, a, g):
    """x uint8 [B,3,224,224] -> float normalized batch."""
    import torchvision.transforms.v2.functional as TF

    out = []
    for im in x:
        area = 224 * 224 * (a.scale_min + (1 - a.scale_min) * torch.rand((), generator=g).item())
        ar = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand((), generator=g).item())
        w = min(224, int(round(math.sqrt(area * ar))))
        h = min(224, int(round(math.sqrt(area / ar))))
        top = int(torch.randint(0, 224 - h + 1, (), generator=g))
        left = int(torch.randint(0, 224 - w + 1, (), generator=g))
        im = TF.resized_crop(im, top, left, h, w, [224, 224], antialias=True)
        if torch.rand((), generator=g) < 0.5:
            im = TF.horizontal_flip(im)
        out.append(im)
    x = torch.stack(out).float() / 255
    if a.jigsaw > 0:
        n = x.shape[0]
        sel = torch.rand(n, generator=g) < a.jigsaw
        if sel.any():
            k = 4
            p = 224 // k
            t = x[sel].unfold(2, p, p).unfold(3, p, p)  # B,3,k,k,p,p
            B = t.shape[0]
            t = t.reshape(B, 3, k * k, p, p)
            perm = torch.randperm(k * k, generator=g)
            t = t[:, :, perm]
            x[sel] = t.reshape(B, 3, k, k, p, p).permute(0, 1, 2, 4, 3, 5).reshape(B, 3, 224, 224)
    return (x - MEAN) / STD


def metrics(lg, dl, y, mask):
    """:func:`_common.score` under this loop's keys (n, top1, agree, kl), as its jsonl has them."""
    r = c.score(lg, dl, y, mask)
    return dict(n=r["photos"], top1=r["top1"], agree=r["agreement"], kl=r["kl"])


def escore(model, d, seen):
    from evit_cli.measure.fidelity import knn_top1, neighbour_overlap

    e = held_out_outputs(model, d)
    ref = d["de"]
    ecls = d["cls"][::4]
    sm = torch.tensor([k in seen for k in ecls.tolist()])
    out = {}
    for k, m in (("seen", sm), ("unseen", ~sm)):
        out[k] = dict(
            top1=F.cosine_similarity(e[m], ref[m]).mean().item(),
            agree=neighbour_overlap(e[m], ref[m]),
            kl=knn_top1(e[m], ecls[m]),
        )
    return out


def held_out_outputs(model, d):
    with torch.inference_mode():
        return torch.cat([model.eval()(d["ev"][s : s + 128]) for s in range(0, len(d["ev"]), 128)])


def score(model, d, seen, embed):
    if embed:
        return escore(model, d, seen)
    lg = held_out_outputs(model, d)
    ecls = d["cls"][::4]
    y = torch.tensor([c.SYNSET_INDEX[c.SYNSETS[k]] for k in ecls])
    sm = torch.tensor([k in seen for k in ecls.tolist()])
    return dict(seen=metrics(lg, d["dl"], y, sm), unseen=metrics(lg, d["dl"], y, ~sm))


def fmt(s):
    return " | ".join(f"{k} {v['top1']:.2f}/{v['agree']:.2f}/{v['kl']:.3f}" for k, v in s.items())


def parse_args(argv=None):
    ap = c.Parser(__doc__)
    ap.add_argument("--split", default="0-4", help="Classes trained on (0..9 in synset order), e.g. 0-4. [0-4]")
    ap.add_argument("--name", default="", help="The run's name in the output and the jsonl.")
    ap.add_argument("--embed", action="store_true", help="The headless model (num_classes=0): embedding losses.")
    ap.add_argument("--offshelf", action="store_true", help="Only score the dense and the off-the-shelf models.")
    ap.add_argument("--keep", type=float, default=0.7, help="EViT keep rate at layers 4,7,10. [0.7]")
    ap.add_argument("--lr", type=float, default=5e-5, help="Peak learning rate (cosine to 1e-6). [5e-5]")
    ap.add_argument("--epochs", type=float, default=2, help="Epochs over the split's photos. [2]")
    ap.add_argument("--batch", type=int, default=32, help="Batch size. [32]")
    ap.add_argument("--wd", type=float, default=0.05, help="AdamW weight decay (not on biases and norms). [0.05]")
    ap.add_argument("--loss", default="mse", help="mse | kl[TAU] | cos | cosrel | cmse (centred logits). [mse]")
    ap.add_argument("--mixup", type=float, default=1.0, help="Mixup alpha, 0: off. [1]")
    ap.add_argument("--cutmix", type=float, default=1.0, help="CutMix alpha, 0: off. [1]")
    ap.add_argument("--scale-min", type=float, default=0.08, help="Smallest random-resized-crop area. [0.08]")
    ap.add_argument("--jigsaw", type=float, default=0, help="Share of images with their 4x4 tiles shuffled. [0]")
    ap.add_argument("--train", default="all", help="Which weights train: all | norms | blocks>=N. [all]")
    ap.add_argument("--l2sp", type=float, default=0, help="Weight of the L2 pull towards the start weights. [0]")
    ap.add_argument("--feat", type=float, default=0,
                    help="Weight of the MSE on the pre-logits features (--embed: block 11's class token). [0]")
    ap.add_argument("--ema", type=float, default=0, help="Also score an EMA of the weights with this decay. [0: no]")
    ap.add_argument("--rel", type=float, default=0, help="Weight of the relational (similarity) term, --embed. [0]")
    ap.add_argument("--rel-tau", type=float, default=0.05, help="Temperature of the relational term. [0.05]")
    ap.add_argument("--bank", type=int, default=0, help="Teacher embeddings kept for --rel. [0: the batch]")
    ap.add_argument("--cls-layers", type=float, default=0, help="Weight of the MSE on the class token after every "
                    "block but the last. [0]")
    ap.add_argument("--tokens", type=float, default=0, help="Weight of the MSE on every kept token after every "
                    "block but the last. [0]")
    ap.add_argument("--wise", default="", help="Also score WiSE-FT interpolations, e.g. 0.5,0.7. [none]")
    ap.add_argument("--limit", type=int, default=0, help="At most N training photos, evenly spaced. [0: all]")
    ap.add_argument("--out", default=str(RESULTS), help="Folder of recovery_variants.jsonl (appended to).")
    a = ap.parse_args(argv)
    try:
        a.seen = c.parse_classes(a.split)
    except ValueError:
        ap.error(f"--split {a.split!r}: expected classes such as 0-4 or 0,2,4 (0..9)")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if not c.WEIGHTS.exists() or not c.PHOTOS.is_dir():
        sys.stderr.write(f"recovery_variants.py: error: {c.REAL} must hold the DeiT-Tiny weights and imagenette-val\n")
        return 2
    try:
        run(a)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    return 0


def run(a) -> None:
    seen = a.seen
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    d = cache()
    if a.embed:
        d["de"] = held_out_outputs(c.dense_model(headless=True), d)
    teacher = c.dense_model(headless=a.embed)
    student = evit_cli.convert(c.dense_model(headless=a.embed), keep_rate=a.keep, layers=(4, 7, 10))
    if a.offshelf:
        print("dense", fmt(score(teacher, d, seen, a.embed)))
        print("offshelf", fmt(score(student, d, seen, a.embed)))
        return
    idx = torch.tensor([i for i in range(len(d["cls"])) if i % 4 and int(d["cls"][i]) in seen])
    idx = c.spread(idx, a.limit or None)
    start = {k: v.detach().clone() for k, v in student.named_parameters()}
    for n, p in student.named_parameters():
        if a.train == "norms":
            p.requires_grad = ("norm" in n) or n.endswith("bias")
        elif a.train.startswith("blocks>="):
            k = int(a.train[8:])
            p.requires_grad = n.startswith("blocks.") and int(n.split(".")[1]) >= k - 1 or n.startswith("norm")
    params = [p for p in student.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    nodecay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.wd}, {"params": nodecay, "weight_decay": 0}], lr=a.lr)
    steps = int(math.ceil(a.epochs * len(idx) / a.batch))
    ema = copy.deepcopy(student) if a.ema else None
    feats = {}
    if a.feat:
        (student.blocks[-2] if a.embed else student.norm).register_forward_hook(
            lambda m, i, o: feats.__setitem__("s", o[:, 0])
        )
        (teacher.blocks[-2] if a.embed else teacher.norm).register_forward_hook(
            lambda m, i, o: feats.__setitem__("t", o[:, 0])
        )
    if a.tokens:
        def grab(key, bi):
            def hook(m, i, o):
                pos = evit_cli.model_state(student).positions  # the PositionState of this forward
                feats[("tokens", key, bi)] = (o, pos.pos if key == "s" and pos is not None else None)
            return hook

        for key, mm in (("s", student), ("t", teacher)):
            for bi, blk in enumerate(mm.blocks[:-1]):
                blk.register_forward_hook(grab(key, bi))
    if a.cls_layers:
        for key, mm in (("s", student), ("t", teacher)):
            for bi, blk in enumerate(mm.blocks[:-1]):
                blk.register_forward_hook(lambda m, i, o, key=key, bi=bi: feats.__setitem__((key, bi), o[:, 0]))
    bank = []
    t0 = time.time()
    step = 0
    student.train()
    while step < steps:
        order = idx[torch.randperm(len(idx), generator=gen)]
        for s in range(0, len(order) - a.batch + 1, a.batch):
            if step >= steps:
                break
            lr = 1e-6 + (a.lr - 1e-6) * 0.5 * (1 + math.cos(math.pi * step / steps))
            for gr in opt.param_groups:
                gr["lr"] = lr
            x = augment(d["raw"][order[s : s + a.batch]], a, gen)
            if a.mixup > 0 or a.cutmix > 0:
                x, _, _ = mix_batch(x, a.mixup, a.cutmix)
            with torch.no_grad():
                t = teacher(x)
            o = student(x)
            if a.loss == "mse":
                loss = F.mse_loss(o, t)
            elif a.loss.startswith("kl"):
                tau = float(a.loss[2:] or 1)
                loss = (
                    F.kl_div(
                        F.log_softmax(o / tau, -1), F.log_softmax(t / tau, -1), reduction="batchmean", log_target=True
                    )
                    * tau
                    * tau
                )
            elif a.loss == "cos":
                loss = 1 - F.cosine_similarity(o, t).mean()
            elif a.loss == "cosrel":
                loss = 1 - F.cosine_similarity(o, t).mean() + F.mse_loss(o, t) / t.pow(2).mean()
            elif a.loss == "cmse":  # centered logits
                loss = F.mse_loss(o - o.mean(-1, keepdim=True), t - t.mean(-1, keepdim=True))
            if a.feat:
                fs, ft = feats["s"], feats["t"]
                loss = loss + a.feat * F.mse_loss(fs, ft)
            if a.cls_layers:
                nb = len(student.blocks) - 1
                loss = loss + a.cls_layers * sum(
                    F.mse_loss(feats[("s", b)], feats[("t", b)]) / feats[("t", b)].pow(2).mean() for b in range(nb)
                ) / nb
            if a.tokens:
                tl = []
                for b in range(len(student.blocks) - 1):
                    (so, pos), (to, _) = feats[("tokens", "s", b)], feats[("tokens", "t", b)]
                    if pos is None:
                        tl.append(F.mse_loss(so, to) / to.pow(2).mean())
                        continue
                    ok = (pos >= 0).float()[..., None]  # the fused tokens have no counterpart
                    tp = to[:, 1:].gather(1, pos.clamp_min(0)[..., None].expand(-1, -1, to.shape[-1]))
                    err = ((so[:, 1 : 1 + pos.shape[1]] - tp) ** 2 * ok).sum() + ((so[:, :1] - to[:, :1]) ** 2).sum()
                    n = (ok.sum() + len(so)) * to.shape[-1]
                    tl.append(err / n / to.pow(2).mean())
                    continue
                loss = loss + a.tokens * sum(tl) / len(tl)
            if a.rel:
                zs, zt = F.normalize(o, dim=-1), F.normalize(t, dim=-1)
                ref = torch.cat([zt, *bank]) if a.bank else zt
                ss, st = zs @ ref.T / a.rel_tau, zt @ ref.T / a.rel_tau
                eye = torch.eye(len(zs), ref.shape[0], dtype=torch.bool)
                ss, st = ss.masked_fill(eye, -1e9), st.masked_fill(eye, -1e9)
                loss = loss + a.rel * F.kl_div(
                    F.log_softmax(ss, -1), F.log_softmax(st, -1), reduction="batchmean", log_target=True
                )
                if a.bank:
                    bank.insert(0, zt.detach())
                    while sum(len(b) for b in bank) > a.bank:
                        bank.pop()
            if a.l2sp:
                loss = loss + a.l2sp * sum(
                    ((p - start[n]) ** 2).sum() for n, p in student.named_parameters() if p.requires_grad
                )
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if ema is not None:
                with torch.no_grad():
                    for pe, ps in zip(ema.parameters(), student.parameters()):
                        pe.lerp_(ps, 1 - a.ema)
            if step % 20 == 0:
                print(
                    f"step {step}/{steps} loss {loss.item():.4f} {time.time() - t0:.0f}s", file=sys.stderr, flush=True
                )
    tt = time.time() - t0
    res = {"args": {k: v for k, v in vars(a).items() if k != "seen"}, "train_photos": len(idx), "train_s": tt}
    res["final"] = score(student, d, seen, a.embed)
    print(a.name, "final", fmt(res["final"]), f"({tt:.0f}s)", flush=True)
    if ema is not None:
        res["ema"] = score(ema, d, seen, a.embed)
        print(a.name, "ema", fmt(res["ema"]), flush=True)
    for al in [float(x) for x in a.wise.split(",") if x]:
        m = evit_cli.convert(c.dense_model(headless=a.embed), keep_rate=a.keep, layers=(4, 7, 10))
        sd = student.state_dict()
        m.load_state_dict({k: start[k].lerp(sd[k], al) if k in start else sd[k] for k in sd})
        res[f"wise{al}"] = score(m, d, seen, a.embed)
        print(a.name, f"wise{al}", fmt(res[f"wise{al}"]), flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    with open(Path(a.out) / "recovery_variants.jsonl", "a") as fh:
        fh.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    sys.exit(main())
