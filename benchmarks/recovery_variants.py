"""Variants of the label-free recovery, compared fast: what was tried for the README's table.

A short training loop outside `evit finetune` (the photos decoded once into tensors, the dense
teacher's held-out logits cached), so that one variant takes minutes on 2 cores. Same data as
benchmarks/generalize_real.py: DeiT-Tiny of ../shared/real, EViT 0.7 at 4,7,10; train on the photos
with index % 4 != 0 of the --split classes (a flat set, no labels), score on the held-out photos
(index % 4 == 0) of the classes it saw and never saw: top-1 / agreement with the ORIGINAL dense
model / KL. Function matching throughout (the teacher sees the same mixup/CutMix batch), MSE on the
logits, AdamW, cosine lr, as `evit finetune`; the options change one thing each:

    python benchmarks/recovery_variants.py --offshelf --split 0-4
    python benchmarks/recovery_variants.py --split 0-4 --name base --wise 0.5
    python benchmarks/recovery_variants.py --split 0-4 --name feat1 --feat 1.0     # + pre-logits features
    python benchmarks/recovery_variants.py --split 0-4 --name jig50 --jigsaw 0.5   # + shuffled 4x4 tiles
    python benchmarks/recovery_variants.py --split 0-4 --name ep4 --epochs 4 --wise 0.7
    python benchmarks/recovery_variants.py --embed --split 0-4 --name e_cosrel --loss cosrel  # headless
    python benchmarks/recovery_variants.py --embed --split 0-4 --name e_cls1 --loss cosrel --cls-layers 1
    python benchmarks/recovery_variants.py --embed --split 0-4 --name e_tok1 --loss cosrel --tokens 1
    python benchmarks/recovery_variants.py --embed --split 0-4 --name e_rel1 --loss cosrel --rel 1 --rel-tau 0.1

--wise A also scores the weights interpolated A of the way from the start to the end (WiSE-FT).
Each result is a line in --out/recovery_variants.jsonl. The decoded photos are cached in --cache.
"""

import argparse  # noqa: E401
import copy
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import timm
import timm.data
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import generalize_real as g  # noqa: E402

import evit_cli  # noqa: E402
from evit_cli.io.data import mix_batch  # noqa: E402

REAL = g.REAL
R = Path(os.environ.get("EVIT_VARIANTS_CACHE", Path(tempfile.gettempdir()) / "evit_recovery_variants"))
SYN = {
    "n01440764": 0,
    "n02102040": 217,
    "n02979186": 482,
    "n03000684": 491,
    "n03028079": 497,
    "n03394916": 566,
    "n03417042": 569,
    "n03425413": 571,
    "n03445777": 574,
    "n03888257": 701,
}
SYNS = sorted(SYN)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

EMBED = "--embed" in sys.argv


def dense():
    m = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=0 if EMBED else 1000)
    sd = load_file(str(REAL / "deit_tiny_patch16_224.safetensors"))
    if EMBED:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    m.load_state_dict(sd)
    return m.eval()


def cache():
    R.mkdir(parents=True, exist_ok=True)
    f = R / "cache.pt"
    if f.exists():
        return torch.load(f)
    from PIL import Image

    paths = sorted(p for p in (REAL / "imagenette-val").rglob("*") if p.suffix.lower() in {".jpeg", ".jpg", ".png"})
    m = dense()
    tf = timm.data.create_transform(**timm.data.resolve_data_config({}, model=m))
    import torchvision.transforms.v2.functional as TF

    raw, ev, cls = [], [], []
    for i, p in enumerate(paths):
        im = Image.open(p).convert("RGB")
        raw.append(TF.center_crop(TF.resize(TF.pil_to_tensor(im), 224, antialias=True), 224))
        cls.append(SYNS.index(p.parent.name))
        if i % 4 == 0:
            ev.append(tf(im))
    raw = torch.stack(raw)
    ev = torch.stack(ev)
    cls = torch.tensor(cls)
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
    lg, dl, y = lg[mask], dl[mask], y[mask]
    kl = F.kl_div(F.log_softmax(lg, -1), F.log_softmax(dl, -1), reduction="none", log_target=True).sum(-1)
    return dict(
        n=int(mask.sum()),
        top1=100 * (lg.argmax(-1) == y).float().mean().item(),
        agree=100 * (lg.argmax(-1) == dl.argmax(-1)).float().mean().item(),
        kl=kl.mean().item(),
    )


def escore(model, d, seen):
    from evit_cli.measure.fidelity import knn_top1, neighbour_overlap

    with torch.inference_mode():
        e = torch.cat([model.eval()(d["ev"][s : s + 128]) for s in range(0, len(d["ev"]), 128)])
    ref = d["de"]
    ecls = d["cls"][::4]
    sm = torch.tensor([c in seen for c in ecls.tolist()])
    out = {}
    for k, m in (("seen", sm), ("unseen", ~sm)):
        out[k] = dict(
            top1=F.cosine_similarity(e[m], ref[m]).mean().item(),
            agree=neighbour_overlap(e[m], ref[m]),
            kl=knn_top1(e[m], ecls[m]),
        )
    return out


def score(model, d, seen):
    if EMBED:
        return escore(model, d, seen)
    with torch.inference_mode():
        lg = torch.cat([model.eval()(d["ev"][s : s + 128]) for s in range(0, len(d["ev"]), 128)])
    ecls = d["cls"][::4]
    y = torch.tensor([SYN[SYNS[c]] for c in ecls])
    sm = torch.tensor([c in seen for c in ecls.tolist()])
    return dict(seen=metrics(lg, d["dl"], y, sm), unseen=metrics(lg, d["dl"], y, ~sm))


def fmt(s):
    return " | ".join(f"{k} {v['top1']:.2f}/{v['agree']:.2f}/{v['kl']:.3f}" for k, v in s.items())


def main():
    ap = g.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="0-4")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--loss", default="mse")
    ap.add_argument("--mixup", type=float, default=1.0)
    ap.add_argument("--cutmix", type=float, default=1.0)
    ap.add_argument("--scale-min", type=float, default=0.08)
    ap.add_argument("--jigsaw", type=float, default=0)
    ap.add_argument("--train", default="all", help="all | after | norms | blocks>=N")
    ap.add_argument("--l2sp", type=float, default=0)
    ap.add_argument("--feat", type=float, default=0)
    ap.add_argument("--ema", type=float, default=0)
    ap.add_argument("--rel", type=float, default=0, help="weight of the relational (similarity) term, --embed")
    ap.add_argument("--rel-tau", type=float, default=0.05)
    ap.add_argument("--bank", type=int, default=0, help="teacher embeddings kept for --rel (0: the batch)")
    ap.add_argument("--cls-layers", type=float, default=0, help="MSE on the class token after every block")
    ap.add_argument("--tokens", type=float, default=0, help="MSE on every kept token after every block")
    ap.add_argument("--wise", default="")
    ap.add_argument("--keep", type=float, default=0.7)
    ap.add_argument("--name", default="")
    ap.add_argument("--embed", action="store_true")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--offshelf", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    d = cache()
    if EMBED:
        with torch.inference_mode():
            m = dense()
            d["de"] = torch.cat([m(d["ev"][s : s + 128]) for s in range(0, len(d["ev"]), 128)])
    lo, hi = a.split.split("-") if "-" in a.split else (None, None)
    seen = list(range(int(lo), int(hi) + 1)) if lo is not None else [int(c) for c in a.split.split(",")]
    teacher = dense()
    student = evit_cli.convert(dense(), keep_rate=a.keep, layers=(4, 7, 10))
    if a.offshelf:
        print("dense", fmt(score(teacher, d, seen)))
        print("offshelf", fmt(score(student, d, seen)))
        return
    idx = torch.tensor([i for i in range(len(d["cls"])) if i % 4 and int(d["cls"][i]) in seen])
    if a.limit:
        idx = idx[:: max(1, len(idx) // a.limit)][: a.limit]
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
        (student.norm if not EMBED else student.blocks[-2]).register_forward_hook(
            lambda m, i, o: feats.__setitem__("s", o[:, 0])
        )
        (teacher.norm if not EMBED else teacher.blocks[-2]).register_forward_hook(
            lambda m, i, o: feats.__setitem__("t", o[:, 0])
        )
    if a.tokens:
        def grab(key, bi):
            def hook(m, i, o):
                pos = getattr(student, "evit_positions", None)
                feats[(key, bi)] = (o, pos.pos if key == "s" and pos is not None else None)
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
                    (so, pos), (to, _) = feats[("s", b)], feats[("t", b)]
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
    res = {"args": vars(a), "train_photos": len(idx), "train_s": tt}
    res["final"] = score(student, d, seen)
    print(a.name, "final", fmt(res["final"]), f"({tt:.0f}s)", flush=True)
    if ema is not None:
        res["ema"] = score(ema, d, seen)
        print(a.name, "ema", fmt(res["ema"]), flush=True)
    for al in [float(x) for x in a.wise.split(",") if x]:
        m = evit_cli.convert(dense(), keep_rate=a.keep, layers=(4, 7, 10))
        sd = student.state_dict()
        m.load_state_dict({k: start[k].lerp(sd[k], al) if k in start else sd[k] for k in sd})
        res[f"wise{al}"] = score(m, d, seen)
        print(a.name, f"wise{al}", fmt(res[f"wise{al}"]), flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    with open(Path(a.out) / "recovery_variants.jsonl", "a") as fh:
        fh.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    if not g.WEIGHTS.exists():
        sys.exit(f"recovery_variants.py: error: {REAL} must hold the DeiT-Tiny weights and imagenette-val")
    try:
        main()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
