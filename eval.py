"""eval.py: is the distilled student as good and as robust as its teacher, and how much cheaper? Frozen encoders only.

    python eval.py probe --model h-optimus-0 --model runs/luad --data luad/labels.csv --out results/
    python eval.py agree --teacher h-optimus-0 --student uni --student runs/luad --data tiles/ --out results/
    python eval.py robustness --model h-optimus-0 --model runs/luad --data multicentre.csv --out results/
    python eval.py bench --model h-optimus-0 --model uni --random-init --batch-sizes 1 8 --out results/
    python eval.py bench-data --data tiles/ --workers 4 --out results/    # tile loader throughput
    python eval.py report --out results/ --run runs/luad  # report.md, report.png (results), curves.png (the run)
    python eval.py probe --model vit_small_patch14_dinov2 --model-kwargs '{"depth": 1, "global_pool": "avg"}' \\
        --img-size 56 --data examples/pcam/labels.csv     # any timm model, random init, on the bundled PCam tiles

--data: a CSV path,label[,split,center,slide] (paths relative to it) or an ImageFolder root/[<split>/]<class>/*.
Models are named as in g2l.py, their options given once per --model, in order, or (not --model-weights) once for all.
Features are cached in OUT/features/; each command writes OUT/<name>.json + .csv and prints a table. Protocols (UNI,
eva): logistic-regression probe, C picked on val; kNN, k=20 centred cosine; robustness, PathoROB's index.
Exit status: 0 done, 1 a failure during the work, 2 an argument error (found before any model is built), 128+n
stopped by signal n (SIGTERM: 143; features extracted so far stay cached).
"""
import argparse, csv, hashlib, itertools, json, math, multiprocessing as mp, os, random, signal, sys, time
from collections import Counter
from concurrent.futures.process import BrokenProcessPool, ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from g2l import AUG, BAR, DTYPES, Config, HelpFormatter, TileDataset, UsageError, atomic_open, centred_cosine, \
    check_model, check_out, encode, extract_features, forward_flops, index_tiles, linear_cka, load_model, make_views, \
    number, peak_memory_gb, projection, quiet_worker

# ----------------------------------------------------------------------------- data
DATA = "a labels CSV (path,label[,split,center,slide]; paths relative to it) or an ImageFolder root/<split>/<class>/*"
SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val",
          "tune": "val", "test": "test", "testing": "test", "holdout": "test"}

def read_labelled(data, need=("path", "label")):
    """Rows (dicts, absolute paths) from a labels CSV or an ImageFolder tree; fails on missing columns or files."""
    p = Path(data)
    if p.is_dir():
        tiles = index_tiles([str(p)])
        parts = [(f, Path(f).relative_to(p).parts) for f in map(tiles.path, range(len(tiles)))]
        has_split = all(len(q) >= 3 and q[0].lower() in SPLITS for _, q in parts)  # root/<split>/<class>/*
        cols = ["path", "label", "split"][:2 + has_split]
        rows = [dict(zip(cols, [f, q[has_split] if len(q) > 1 else "", q[0]])) for f, q in parts]
    elif p.is_file():
        try:  # an image or other binary file given as --data is not a CSV
            with open(p, newline="") as fh:  # the header's names cleaned first, then each row read by them
                cols = [c.strip().replace("centre", "center") for c in next(csv.reader(fh), [])]
                rows = [{c: (r[c] or "").strip() for c in cols} for r in csv.DictReader(fh, fieldnames=cols)]
        except (UnicodeDecodeError, csv.Error) as e:
            raise UsageError(f"error: --data {data} is not a labels CSV ({type(e).__name__}); pass {DATA}")
        rows = [dict(r, path=os.path.normpath(p.parent / r.get("path", ""))) for r in rows]
    else:
        raise UsageError(f"error: --data {data} does not exist; pass {DATA}")
    if not rows:
        raise UsageError(f"error: --data {data} lists no images; pass {DATA} that has images")
    if missing := [c for c in need if c not in cols]:
        raise UsageError(f"error: {data} has no column {', '.join(missing)} (it has {', '.join(cols)}); pass {DATA}")
    if "label" in need and any(not r["label"] for r in rows):
        raise UsageError(f"error: {data} has rows without a label; fill them in or use root/<class>/* folders")
    if gone := [r["path"] for r in rows if not os.path.isfile(r["path"])]:
        raise UsageError(f"error: {len(gone)} image(s) listed in {data} do not exist (e.g. {gone[0]}); "
                         "paths are relative to the CSV")
    return rows

def group_split(rows, idx, seed, frac):
    """Hold out about frac of idx, whole slides at a time (each tile is its own group without a slide column)."""
    group = lambda i: rows[i].get("slide") or rows[i]["path"]
    groups = sorted({group(i) for i in idx})
    random.Random(seed).shuffle(groups)
    size = Counter(map(group, idx))
    before = itertools.accumulate([size[g] for g in groups[:-1]], initial=0)  # always keep one group on the other side
    held = {g for g, n in zip(groups[:-1], before) if n < frac * len(idx)}
    return [i for i in idx if group(i) not in held], [i for i in idx if group(i) in held]

def split_rows(rows, seed, val=0.15, test=0.25):
    """train/val/test indices: the split column if it has >= 2 values (no test split: val is test), else by slide."""
    names = {r.get("split", "").lower() for r in rows}
    if len(names) >= 2:
        if unknown := names - set(SPLITS):
            raise UsageError(f"error: unknown split value(s) {sorted(unknown)} in --data; use train/val/test")
        idx = {s: [i for i, r in enumerate(rows) if SPLITS[r["split"].lower()] == s] for s in ("train", "val", "test")}
        if not idx["test"]:
            idx["test"], idx["val"] = idx["val"], []
        if not idx["val"]:
            idx["train"], idx["val"] = group_split(rows, idx["train"], seed, val)
    else:
        rest, te = group_split(rows, list(range(len(rows))), seed, test)
        tr, va = group_split(rows, rest, seed + 1000, val / (1 - test))
        idx = dict(train=tr, val=va, test=te)
    if not all(idx.values()):
        raise UsageError(f"error: too few samples or slides in --data for a train/val/test split "
                         f"({ {k: len(v) for k, v in idx.items()} }); add data or give a split column")
    return idx

# ----------------------------------------------------------------------------- models and features
def model_list(names, weights, kwargs, sizes, flag="--model"):
    """[{name, weights, kwargs, size}]: each option given once per model, in order, or (not weights) once for all."""
    cols, n, size_flag = [names], len(names), "--img-size" if flag == "--model" else flag + "-img-size"
    for values, opt, default in [(weights, flag + "-weights", ""), (kwargs, flag + "-kwargs", ""),
                                 (sizes, size_flag, 0)]:
        once = not opt.endswith("-weights")  # a weights file fits one model, never all of them
        if len(values) not in (0, n, 1 if once else 0):
            raise UsageError(f"error: {opt} given {len(values)} times for {n} models; give it once per model, in "
                             "order ('' for none)" + ", or once for all" * once)
        cols.append(values if len(values) > 1 else [values[0] if values else default] * n)
    for name, file in zip(cols[0], cols[1]):  # every model's name and weights file, before any work
        check_model(name, file, flag + "-weights")
    return [dict(name=a, weights=b, kwargs=c, size=d) for a, b, c, d in zip(*cols)]

def run_settings(models):
    """A g2l run folder's config.json gives its teacher, if listed, the run's size, kwargs and weights unless given."""
    for run in models:
        if (Path(run["name"]) / "student").is_dir() and (conf := Path(run["name"]) / "config.json").is_file():
            c = json.loads(conf.read_text())
            run["distilled_px"] = c.get("student_img_size")
            for t in (t for t in models if t["name"] == c.get("teacher")):
                t.update(size=t["size"] or c.get("img_size", 0), kwargs=t["kwargs"] or c.get("teacher_kwargs", ""),
                         weights=t["weights"] or c.get("teacher_weights", ""), distilled_px=c.get("img_size"))
    return models

def describe(name, source, px, distilled_px=None):
    """The log line saying what a model is: a bare timm name is random init at its default size (DINOv2's: 518 px)."""
    print(f"{name}: {source}" + " (no pretrained weights)" * (source == "random init") + f", {px} px" +
          f" (note: its g2l run distilled it at {distilled_px} px)" * (distilled_px not in (None, px)))  # say so

def open_model(m, device):
    """g2l's loader; seeded, so a random-init architecture is the same model on every call (and in the cache)."""
    torch.manual_seed(0)
    model, spec = load_model(m["name"], m["weights"], m["kwargs"], m["size"], device)
    return model.eval(), spec

def features(m, rows, a):
    """[N, D] frozen features, cached in OUT/features/ by model, weights (and date), kwargs, data, size, pooling."""
    folder = Path(m["name"].removeprefix("local-dir:"))  # a local-dir, a transformers folder or a g2l run folder
    files = [f for f in (m["weights"], folder / "model.safetensors", folder / "pytorch_model.bin",
                         folder / "student" / "model.safetensors") if f and os.path.isfile(f)]
    key = json.dumps([m["name"], m["weights"], m["kwargs"], str(Path(a.data).resolve()), m["size"], a.pooling,
                      len(rows), [os.path.getmtime(f) for f in files]])
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in m["name"].strip("/"))[-60:]
    cache = Path(a.out) / "features" / f"{safe}_{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"
    paths = [r["path"] for r in rows]
    got = torch.load(cache, weights_only=True) if cache.is_file() else {}
    if got.get("paths") != paths or "source" not in got:
        got = extract(m, paths, a)
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(cache, "wb") as f:
            torch.save(got, f)
    feats, m["source"], m["px"] = got["feats"], got["source"], got["size"]
    describe(m["name"], m["source"], m["px"], m.get("distilled_px"))
    if len(bad := (~torch.isfinite(feats).all(1)).nonzero().flatten()):
        raise SystemExit(f"error: {len(bad)} of {len(feats)} feature vectors of {m['name']} are NaN/inf (e.g. "
                         f"{paths[int(bad[0])]}); check its weights or precision (try --device cpu), delete {cache}")
    return feats

def extract(m, paths, a):
    model, spec = open_model(m, a.device)
    dl = torch.utils.data.DataLoader(TileDataset(paths, m["size"] or spec.size), batch_size=a.batch_size,
                                     num_workers=a.workers, worker_init_fn=quiet_worker)  # main decides on a signal
    def pooled(x):
        f = encode(model, spec, x)
        g, mean = f.global_, f.tokens.flatten(2).mean(2)
        return {"cls": g, "mean": mean, "cls+mean": torch.cat([g, mean], 1)}[a.pooling]
    dev = torch.device(a.device)
    amp = lambda: torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda")
    (feats,), skipped = extract_features(dl, [pooled], dev, amp, desc=f"features {m['name']}")
    if len(bad := skipped.nonzero()):  # TileDataset swaps in the next tile: a wrong label here, so stop instead
        raise SystemExit(f"error: {paths[int(bad[0])]} cannot be read; fix it or drop its row from {a.data}")
    return dict(feats=feats, paths=paths, source=spec.source, size=m["size"] or spec.size)

def load_heads(run):
    """The global projection head of a g2l run, frozen: its student's features in the teacher's space."""
    from safetensors.torch import load_file
    sd = {k.split(".", 1)[1]: v for k, v in load_file(str(Path(run) / "heads.safetensors")).items()
          if k.startswith("global_head.")}
    weights = [sd[k] for k in sorted(sd) if k.endswith("weight")]  # nn.Linear, or Sequential(Linear, GELU, Linear)
    head = projection("linear" if "weight" in sd else "mlp", weights[0].shape[1], weights[-1].shape[0])
    head.load_state_dict(sd)
    return head.requires_grad_(False)

# ----------------------------------------------------------------------------- metrics, probe, kNN
def auroc(pos, score):
    """P(score of a positive > score of a negative), ties count 1/2 (Mann-Whitney U with average ranks)."""
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if not n1 or not n0:
        return float("nan")
    _, inv, counts = np.unique(score, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inv]
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))

def metrics(y, proba):
    """Balanced accuracy, accuracy, macro/weighted F1, AUROC (binary: class 1; multiclass: macro one-vs-rest)."""
    y, proba = np.asarray(y), np.asarray(proba, dtype=np.float64)
    pred, present = proba.argmax(1), np.unique(y)
    is_true, is_pred = [v[:, None] == np.union1d(present, pred) for v in (y, pred)]  # [N, classes seen]
    ntrue, npred = is_true.sum(0), is_pred.sum(0)
    f1 = 2 * (is_true & is_pred).sum(0) / np.maximum(ntrue + npred, 1)  # = 2PR/(P+R), 0 where undefined
    aucs = [auroc(y == 1, proba[:, 1])] if proba.shape[1] == 2 else [auroc(y == c, proba[:, c]) for c in present]
    return dict(bacc=float(np.mean([np.mean(pred[y == c] == c) for c in present])), acc=float(np.mean(pred == y)),
                f1_macro=float(f1.mean()), f1_weighted=float((f1 * ntrue).sum() / len(y)),
                auroc=float(np.nanmean(aucs)))

def logreg(x, y, C, init, iters=200):
    """Multinomial logistic regression from init (W, b): sklearn's C * sum(CE) + |W|^2 / 2 (bias free), by L-BFGS."""
    W, b = [t.clone().requires_grad_() for t in init]
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=iters, tolerance_grad=1e-6, history_size=20,
                            line_search_fn="strong_wolfe")
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ W + b, y) + (W ** 2).sum() / (2 * C * len(x))
        loss.backward()
        return loss
    opt.step(closure)
    return W.detach(), b.detach()

def linear_probe(f, y, sp, K, Cs):
    """UNI: standardise by train statistics, pick C on val by balanced accuracy (fits warm-started), score test."""
    mu, sd = f[sp["train"]].mean(0), f[sp["train"]].std(0) + 1e-6
    z = lambda i: ((f[i] - mu) / sd).double()
    best, wb = None, (torch.zeros(f.shape[1], K, dtype=torch.float64), torch.zeros(K, dtype=torch.float64))
    for C in sorted(Cs):
        wb = logreg(z(sp["train"]), y[sp["train"]], C, wb)
        score = metrics(y[sp["val"]], torch.softmax(z(sp["val"]) @ wb[0] + wb[1], 1))["bacc"] if len(Cs) > 1 else 0
        if best is None or score > best[0]:
            best = (score, C, wb)
    return metrics(y[sp["test"]], torch.softmax(z(sp["test"]) @ best[2][0] + best[2][1], 1)), best[1]

def knn(ftr, ytr, fte, K, k=20):
    """Vote shares of the k nearest train samples by cosine, after centring by the train mean and L2-normalising."""
    a, b = (F.normalize(f - ftr.mean(0), dim=1) for f in (ftr, fte))
    idx = torch.cat([(c @ a.T).topk(min(k, len(a)), dim=1).indices for c in b.split(1024)])
    votes = F.one_hot(ytr[idx], K).sum(1).double()
    return votes / votes.sum(1, keepdim=True)  # argmax: majority vote, ties to the lower class index

# ----------------------------------------------------------------------------- robustness
def check_design(labels, centres, slides=None, ks=(3, 5, 10, 20)):
    """(labels, centres, slide index per sample, the ks there is room for), or ValueError naming what is missing."""
    labels, centres = np.asarray(labels), np.asarray(centres)
    if len(set(centres)) < 2 or len(set(labels)) < 2:
        raise ValueError(f"{len(set(centres))} centre(s) and {len(set(labels))} label(s); "
                         "the robustness index needs >= 2 of each")
    if not any(len(set(centres[labels == l])) >= 2 for l in set(labels)):
        raise ValueError("no label occurs in >= 2 centres, so biology and centre cannot be told apart; "
                         "add a second centre's samples of one class")
    slides = np.unique(np.asarray(slides), return_inverse=True)[1] if slides is not None else np.arange(len(labels))
    room = len(labels) - np.bincount(slides).max()  # fewest neighbours any sample can have
    if not (ks := [k for k in ks if k <= room]):
        raise ValueError(f"too few samples outside each slide for k nearest neighbours (at most {room})")
    return labels, centres, slides, ks

def robustness_index(feats, labels, centres, slides=None, ks=(3, 5, 10, 20), n_boot=200, seed=0):
    """Over each sample's k nearest cosine neighbours (never from its own slide): SS/SO = same label, same/other
    centre, OS = other label, same centre. PathoROB's RI_k = sum SO / sum(SO + OS) (0.5 neutral, 1 = biology only)
    and the de Jong ratio sum(SS + SO) / sum(SS + OS) (> 1: biology dominates), with bootstrap std over queries."""
    labels, centres, slides, ks = check_design(labels, centres, slides, ks)
    x, sl = F.normalize(torch.as_tensor(np.asarray(feats), dtype=torch.float32), dim=1), torch.as_tensor(slides)
    idx = torch.cat([(x[s:s + 1024] @ x.T).masked_fill(sl[s:s + 1024, None] == sl[None], -math.inf)
                     .topk(max(ks), dim=1).indices for s in range(0, len(x), 1024)]).numpy()  # never its own slide
    same_l, same_c = labels[idx] == labels[:, None], centres[idx] == centres[:, None]
    boots = np.random.default_rng(seed).integers(0, len(labels), (n_boot, len(labels)))
    all_, out = np.arange(len(labels)), []
    for k in ks:
        ss, so, os_ = [(m[:, :k]).sum(1) for m in (same_l & same_c, same_l & ~same_c, ~same_l & same_c)]
        ri = lambda q: so[q].sum(-1) / np.maximum((so + os_)[q].sum(-1), 1)
        dj = lambda q: (ss + so)[q].sum(-1) / np.maximum((ss + os_)[q].sum(-1), 1)
        out.append(dict(k=k, ri=float(ri(all_)), ri_std=float(ri(boots).std()),
                        dejong=float(dj(all_)), dejong_std=float(dj(boots).std())))
    return out

# ----------------------------------------------------------------------------- bench
SPREAD = 0.2  # bench: timings of one model spread wider than this around their median mean a busy machine

def timed(step, n, warmup, device, desc=None, runs=1):
    """Seconds per call of step() in each of `runs` runs of n calls, after `warmup` untimed calls; GPU work awaited."""
    sync, times = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None), []
    for _ in range(warmup):
        step()
    sync()
    for _ in range(runs):
        t = time.perf_counter()
        for _ in tqdm(range(n), desc=desc, disable=desc is None or not sys.stderr.isatty(), **BAR):  # short: no log
            step()
        sync()
        times.append((time.perf_counter() - t) / n)
    return times

def bench_one(m, a):
    """One model, in a fresh process so that its peak memory is its own; batch sizes ascending: CPU RSS only grows."""
    dev = torch.device(a.device)
    base = 0 if dev.type == "cuda" else peak_memory_gb(dev)  # CPU: this process's baseline RSS before the model
    model, spec = open_model(dict(m, size=a.img_size, weights="random" if a.random_init else m["weights"]), dev)
    describe(m["name"], spec.source, a.img_size)
    bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
    dtype = DTYPES.get(a.dtype, torch.bfloat16 if bf16 else torch.float32)  # auto: as its --help says
    params_m, rows = sum(p.numel() for p in model.parameters()) / 1e6, []
    gflops = forward_flops(model, a.img_size) / 1e9  # NaN for a model without patch tokens
    for bs in sorted(a.batch_sizes):
        x = torch.rand(bs, 3, a.img_size, a.img_size, device=dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        with torch.inference_mode(), torch.autocast(dev.type, dtype, enabled=dtype != torch.float32):
            dts = timed(lambda: encode(model, spec, x), a.iters, a.warmup, dev, f"bench {m['name']} x{bs}", a.runs)
        dt = float(np.median(dts))
        spread = (max(dts) - min(dts)) / dt  # one timing hides a busy machine; the spread of several shows it
        if spread > SPREAD:
            print(f"warning: {m['name']} x{bs}: its {a.runs} timings spread {spread:.0%} around their median (over "
                  f"{SPREAD:.0%}): the machine was busy; rerun on idle cores or an idle GPU")
        rows.append(dict(model=m["name"], source=spec.source, img_size=a.img_size, dtype=str(dtype)[6:], batch=bs,
                         img_per_s=bs / dt, ms_per_batch=1e3 * dt, runs=a.runs, spread=spread, steady=spread <= SPREAD,
                         peak_mem_gb=peak_memory_gb(dev) - base, params_m=params_m, gflops=gflops))
    return rows

# ----------------------------------------------------------------------------- commands
def fmt(r, c):
    v, sd = r.get(c, ""), r.get(c + "_std")
    if not isinstance(v, float):
        return str(v)
    return (f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}") + (f"±{sd:.3f}" if isinstance(sd, float) else "")

def save_and_print(a, name, rows, cols):
    """OUT/name.json + OUT/name.csv (atomic), then one aligned table."""
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_open(out / f"{name}.json") as fh:
        fh.write(json.dumps(rows, indent=1))
    with atomic_open(out / f"{name}.csv", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    cells = [cols] + [[fmt(r, c) for c in cols] for r in rows]
    widths = [max(map(len, column)) for column in zip(*cells)]
    for x in cells:
        print("  ".join(s.ljust(w) for s, w in zip(x, widths)).rstrip())
    print(f"wrote {out / name}.json and .csv")

def cmd_probe(a):
    rows = read_labelled(a.data)
    classes = sorted({r["label"] for r in rows})
    if len(classes) < 2:
        raise UsageError(f"error: {a.data} has a single class ({classes[0]!r}); a probe needs >= 2 labels")
    y = torch.tensor([classes.index(r["label"]) for r in rows])
    if len({r.get("split", "").lower() for r in rows}) < 2:
        print("note: --data has no usable split column; using seeded train/val/test splits " +
              ("grouped by slide" if rows[0].get("slide") else "of single tiles (no slide column: slides may leak)"))
    splits = [split_rows(rows, seed) for seed in range(a.seeds)]
    slides = lambda split: {rows[i].get("slide") for i in splits[0][split]}
    if leak := slides("train") & slides("test") - {None, ""}:
        print(f"warning: {len(leak)} slide(s) in both the train and the test split of {a.data} (e.g. {min(leak)}): "
              "optimistic results")
    for sp in splits:
        if absent := set(y[sp["test"]].tolist()) - set(y[sp["train"]].tolist()):
            raise UsageError(f"error: class(es) {[classes[c] for c in absent]} in the test split of {a.data} have "
                             "no training rows; add training samples of them or drop them")
    res = []
    for m in run_settings(model_list(a.model, a.model_weights, a.model_kwargs, a.img_size)):
        f, per, Cs = features(m, rows, a), [], []  # per seed: the metrics, the C picked on val
        for sp in splits:
            lin, C = linear_probe(f, y, sp, len(classes), a.C)
            kn = metrics(y[sp["test"]], knn(f[sp["train"]], y[sp["train"]], f[sp["test"]], len(classes), a.k))
            per.append({**{f"linear_{k}": v for k, v in lin.items()}, **{f"knn_{k}": v for k, v in kn.items()}})
            Cs.append(C)
        row = dict(model=m["name"], source=m["source"], img_size=m["px"], task=a.task, pooling=a.pooling,
                   n_train=len(splits[0]["train"]), n_test=len(splits[0]["test"]), seeds=a.seeds,
                   C=float(np.median(Cs)))
        row |= {k + s: float(agg([p[k] for p in per])) for k in per[0] for s, agg in (("", np.mean), ("_std", np.std))}
        res.append(row)
    save_and_print(a, f"probe_{a.task}", res, ["model", "task", "n_train", "n_test", "linear_bacc",
                   "linear_auroc", "linear_f1_macro", "knn_bacc", "knn_auroc", "knn_f1_macro", "C"])

def cmd_agree(a):
    """Teacher vs each student on the same tiles, and a g2l run's student through its heads, in the teacher's space."""
    rows = read_labelled(a.data, need=("path",))
    t, *students = run_settings(model_list([a.teacher], [a.teacher_weights], [a.teacher_kwargs], [a.teacher_img_size],
                                           "--teacher") + model_list(a.student, a.student_weights, a.student_kwargs,
                                                                     a.student_img_size, "--student"))
    ft, res = features(t, rows, a), []
    for s in students:
        fs = features(s, rows, a)
        r = dict(teacher=t["name"], student=s["name"], teacher_source=t["source"], student_source=s["source"],
                 teacher_img_size=t["px"], student_img_size=s["px"], n=len(rows), pooling=a.pooling,
                 cka=linear_cka(fs, ft))
        if fs.shape[1] == ft.shape[1]:
            r.update(cos_centred=centred_cosine(fs, ft), cos_raw=float(F.cosine_similarity(fs, ft).mean()))
        if (Path(s["name"]) / "heads.safetensors").is_file() and a.pooling == "cls":  # G2L: in the teacher's space
            z = load_heads(s["name"])(fs)
            if z.shape[1] == ft.shape[1]:
                r.update(heads_cka=linear_cka(z, ft), heads_cos_centred=centred_cosine(z, ft),
                         heads_cos_raw=float(F.cosine_similarity(z, ft).mean()))
            else:
                print(f"note: the heads of {s['name']} map to {z.shape[1]} dims, not the teacher's {ft.shape[1]}; "
                      "skipped")
        res.append(r)
    save_and_print(a, f"agree_{a.task}", res, ["teacher", "student", "n", "cka", "cos_centred", "cos_raw",
                   "heads_cka", "heads_cos_centred", "heads_cos_raw"])

def cmd_robustness(a):
    rows, res = read_labelled(a.data, need=("path", "label", "center")), []
    labels, centres = [r["label"] for r in rows], [r["center"] for r in rows]
    slides = [r["slide"] for r in rows] if "slide" in rows[0] else None
    try:
        check_design(labels, centres, slides, a.ks)  # before any model is built
        for m in run_settings(model_list(a.model, a.model_weights, a.model_kwargs, a.img_size)):
            res += [dict(model=m["name"], source=m["source"], img_size=m["px"], task=a.task, n=len(rows), **r)
                    for r in robustness_index(features(m, rows, a), labels, centres, slides, a.ks, a.boot)]
    except ValueError as e:
        raise UsageError(f"error: {a.data}: {e}")
    save_and_print(a, f"robustness_{a.task}", res, ["model", "task", "n", "k", "ri", "dejong"])

def run_isolated(m, a):
    try:  # in a fresh process; a SystemExit there (unknown model, ...) is re-raised here
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
            return ex.submit(bench_one, m, a).result()
    except BrokenProcessPool:
        raise SystemExit(f"error: benchmarking {m['name']} killed its process (out of memory?); lower --batch-sizes")

def cmd_bench(a):
    res = [r for m in model_list(a.model, a.model_weights, a.model_kwargs, []) for r in run_isolated(m, a)]
    for r in res:  # the first --model (the teacher) is the reference
        ref = next(x for x in res if x["batch"] == r["batch"])
        r.update(speedup=r["img_per_s"] / ref["img_per_s"], param_ratio=ref["params_m"] / r["params_m"],
                 flop_ratio=ref["gflops"] / r["gflops"])
    save_and_print(a, "bench", res, ["model", "batch", "img_per_s", "ms_per_batch", "spread", "peak_mem_gb", "params_m",
                   "gflops", "speedup", "param_ratio", "flop_ratio"])

class CpuAugmented(TileDataset):
    """The usual CPU pipeline, for comparison: the same augmentations in PIL/torchvision inside the workers."""
    def __init__(self, tiles, size, crop):
        import torchvision.transforms.v2 as T
        super().__init__(tiles, size)
        self.tf = T.Compose([T.RandomCrop(crop), T.RandomHorizontalFlip(), T.RandomVerticalFlip(),
                             T.RandomApply([T.ColorJitter(*AUG["jitter"])], p=AUG["p_jitter"]),
                             T.RandomApply([T.GaussianBlur(AUG["blur_px"], AUG["sigma"])], p=AUG["p_blur"])])
    def __getitem__(self, i):
        x, skipped = super().__getitem__(i)
        return self.tf(x), skipped

def cmd_bench_data(a):
    """Tiles/s: decode only (g2l augments on the device) vs decode + CPU augmentation, then the device's share."""
    load = a.load_size or a.img_size
    cfg = Config(img_size=a.img_size, load_size=load, batch_size=a.batch_size)  # g2l's augmentation settings
    tiles, dev, res = index_tiles(a.data), torch.device(a.device), []
    for name, ds in (("workers decode + CPU augment", CpuAugmented(tiles, load, a.img_size)),
                     ("workers decode only (g2l)", TileDataset(tiles, load))):
        dl = torch.utils.data.DataLoader(ds, batch_size=a.batch_size, shuffle=True, num_workers=a.workers,
                                         drop_last=True)
        batches = (batch for _ in itertools.count() for batch in dl)  # the loader again and again
        rate = a.batch_size / timed(lambda: next(batches), a.batches, 1, torch.device("cpu"))[0]  # 1: start-up
        res.append(dict(pipeline=name, workers=a.workers, tiles_per_s=rate, per_worker=rate / max(1, a.workers)))
    x, steps = torch.randint(0, 256, (a.batch_size, 3, load, load), dtype=torch.uint8), itertools.count()
    rate = a.batch_size / timed(lambda: make_views(x, cfg, next(steps), 0, dev), a.batches, 1, dev)[0]
    res.append(dict(pipeline=f"device augment, batched ({dev.type})", workers=0, tiles_per_s=rate, per_worker=rate))
    save_and_print(a, "bench-data", [dict(r, load_px=load) for r in res],
                   ["pipeline", "workers", "tiles_per_s", "per_worker", "load_px"])

# ----------------------------------------------------------------------------- report
TITLES = dict(loss="loss (total)", val_cos="validation: centred cos", val_cka="validation: CKA", lr="learning rate",
              grad_norm="grad norm (before clipping)", img_per_s="images / s")

def draw_curves(plt, run):
    """A run's metrics.jsonl over steps, one panel per figure; a dashed line where the run was resumed."""
    if not (f := Path(run) / "metrics.jsonl").is_file():
        raise UsageError(f"error: --run {run} has no metrics.jsonl; give a g2l run folder (g2l.py's --out)")
    rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k in TITLES and k != "val_cka" or k[:2] == "l_"]
    fig, axes = plt.subplots(2, (len(keys) + 1) // 2, figsize=(1.7 * len(keys) + 1, 6), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        for key in ("val_cos", "val_cka") if k == "val_cos" else (k,):
            ax.plot(*zip(*[(r["step"], r[key]) for r in rows if key in r]), ".-"[k != "val_cos":],
                    label=TITLES.get(key, key).split(": ")[-1])
        for x in (r["resumed_from"] for r in rows if "resumed_from" in r):
            ax.axvline(x, ls="--", c="grey", lw=1, label="resumed")
        ax.set_title(TITLES.get(k, f"loss term {k}").split(":")[0])
        if len(ax.lines) > 1:  # several curves, or a resume
            ax.legend(fontsize=7)
    axes.flat[-1].set_visible(len(keys) % 2 == 0)
    fig.suptitle(f"g2l run {run}", fontsize=10), fig.supxlabel("step", fontsize=10)
    return fig

def cmd_report(a):
    """OUT/report.md (every results table), report.png (their bars, ± as error bars), curves.png (--run's metrics)."""
    out, md, bars = Path(a.out), ["# g2l evaluation report", ""], {}  # bars: {metric: {model: (value, sd)}}
    shown = dict(probe=["linear_bacc", "linear_auroc", "knn_bacc"], agree=["cka", "heads_cka"], robustness=["ri"])
    for f in sorted(out.glob("*.json")):
        rows = json.loads(f.read_text())
        if not isinstance(rows, list) or not rows or not isinstance(rows[0], dict):
            continue
        cols = [c for c in rows[0] if not c.endswith("_std")]
        md += [f"## {f.stem}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        md += ["| " + " | ".join(fmt(r, c) for c in cols) + " |" for r in rows] + [""]
        kind, _, task = f.stem.partition("_")
        top = {"robustness": "k", "bench": "batch"}.get(kind)  # bars of the largest k, of the largest batch
        rows = [r for r in rows if r[top] == max(x[top] for x in rows)] if top else rows
        for r in rows:
            name = r.get("student") or r.get("model")
            for k in shown.get(kind, []):
                if isinstance(r.get(k), float):
                    bars.setdefault(f"{task} {k}" + f"@{r.get('k')}" * (kind == "robustness"), {})[name] = \
                        (r[k], r.get(k + "_std", math.nan))  # the ± of its seeds or bootstraps
            if kind == "bench":  # speed relative to the fastest model
                fastest = max(x["img_per_s"] for x in rows)
                bars.setdefault(f"speed rel. x{r['batch']}", {})[name] = (r["img_per_s"] / fastest, math.nan)
    if not bars and not a.run:
        raise UsageError(f"error: no results (*.json from probe/agree/robustness/bench) in {out} and no --run; run "
                         "those first, or give --run RUN to draw a run's curves")
    import matplotlib  # only here: the one command that draws
    matplotlib.use("Agg")  # files, no display
    import matplotlib.pyplot as plt
    out.mkdir(parents=True, exist_ok=True)
    if bars:  # one group of bars per metric, a colour per model (in the legend), the results' ± as error bars
        models, (fig, ax) = list(dict.fromkeys(m for g in bars.values() for m in g)), plt.subplots(figsize=(9, 4.2))
        for i, m in enumerate(models):
            v, e = zip(*[bars[k].get(m, (math.nan, math.nan)) for k in bars])
            ax.bar(np.arange(len(bars)) + (i - (len(models) - 1) / 2) * 0.8 / len(models), v, 0.8 / len(models),
                   yerr=e, capsize=3, label=m.removeprefix("local-dir:").removesuffix("/student")[-32:])  # fits
        ax.set_xticks(range(len(bars)), [k.replace(" ", "\n", 1) for k in bars], fontsize=8)
        ax.set(ylim=(0, 1.05), ylabel="score (speed: relative to the fastest)")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
    for name, fig in (("curves", a.run and draw_curves(plt, a.run)), ("report", bars and fig)):
        if fig:
            fig.tight_layout()
            with atomic_open(out / f"{name}.png", "wb") as fh:
                fig.savefig(fh, format="png", dpi=80)
            md += [f"![{name}]({name}.png)", ""]
    with atomic_open(out / "report.md") as fh:
        fh.write("\n".join(md))
    print(f"wrote {out / 'report.md'}" + f", {out}/curves.png" * bool(a.run) + f", {out}/report.png" * bool(bars))

# ----------------------------------------------------------------------------- command line
def parser():
    whole0, whole1 = number(int), number(int, 1)  # g2l's range types: 0 or more, 1 or more
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub, par = p.add_subparsers(dest="cmd", required=True), lambda: argparse.ArgumentParser(add_help=False)
    cmd = lambda name, parents, text: sub.add_parser(name, parents=parents, help=text, description=text,
                                                      formatter_class=HelpFormatter)
    out, dev, data, group = par(), par(), par(), {}
    out.add_argument("--out", default="results", help="results folder: NAME.json + .csv per command, features/ cache")
    dev.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    for r in ("model", "teacher", "student"):  # repeat for several models, with their options in the same order
        g, many = group.setdefault(r, par()), dict(action="append", default=[]) if r != "teacher" else {}
        g.add_argument(f"--{r}", required=True, **many, help="preset, timm name, hf-hub:, local-dir:, a DINOv2 "
                       "folder or a g2l run" + f"; repeat --{r} for several, each with its options" * bool(many))
        g.add_argument(f"--{r}-weights", **(many or dict(default="")),
                       help="local .safetensors/.pth/.bin weights for its architecture (default: none)")
        g.add_argument(f"--{r}-kwargs", **(many or dict(default="")),
                       help="JSON architecture kwargs, e.g. '{\"depth\": 2}' (default: none)")
        if r != "model":  # --model's is --img-size, below: bench has another
            g.add_argument(f"--{r}-img-size", type=whole0, **(many or dict(default=0)),
                           help="input px; 0 = as built or trained" + " (default: 0)" * bool(many))
    data.add_argument("--data", required=True, help="labels CSV (path,label[,split,center,slide]) or ImageFolder root")
    data.add_argument("--task", default="", help="name in the results (default: the data folder's name)")
    data.add_argument("--pooling", default="cls", choices=["cls", "mean", "cls+mean"],
                      help="the model's global output (cls), the mean patch token, or both concatenated")
    data.add_argument("--batch-size", type=whole1, default=64, help="tiles per forward pass")
    data.add_argument("--workers", type=whole0, default=2, help="DataLoader processes decoding tiles (0 = in-process)")
    pr = cmd("probe", [out, dev, group["model"], data], "linear probe and kNN on frozen features, per model")
    pr.add_argument("--seeds", type=whole1, default=3, help="seeded splits (own split column: seeded val carve-outs)")
    pr.add_argument("--k", type=whole1, default=20, help="neighbours for the kNN vote")
    pr.add_argument("--C", type=number(float, 0, ends="()"), nargs="+", default=[1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0],
                    help="inverse L2 strengths tried on val; one value = fixed")
    cmd("agree", [out, dev, group["teacher"], group["student"], data],
        "teacher-student agreement: linear CKA, and centred cosine through a run's heads")
    ro = cmd("robustness", [out, dev, group["model"], data],
             "PathoROB robustness index and de Jong ratio (needs center and slide columns)")
    ro.add_argument("--ks", type=whole1, nargs="+", default=[3, 5, 10, 20], help="neighbour counts to report")
    ro.add_argument("--boot", type=whole1, default=200, help="bootstrap resamples for the std")
    for s in (pr, ro):
        s.add_argument("--img-size", type=whole0, action="append", default=[],
                       help="input px, once for all or once per --model; 0 = as built or trained (default: 0)")
    be = cmd("bench", [out, dev, group["model"]], "inference speed and memory per model, in a fresh process each")
    be.add_argument("--img-size", type=whole1, default=224, help="the same input size for every model")
    be.add_argument("--batch-sizes", type=whole1, nargs="+", default=[1, 8], help="batch sizes to time")
    be.add_argument("--iters", type=whole1, default=5, help="timed forward passes per batch size")
    be.add_argument("--warmup", type=whole0, default=2, help="untimed passes first")
    be.add_argument("--runs", type=number(int, 3), default=3,  # fewer: no spread can be told from one slow run
                    help=f"timed runs of --iters passes: median reported, a spread over {SPREAD * 100:.0f}%% flagged")
    be.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="auto = bf16 on GPUs that support it, else fp32")
    be.add_argument("--random-init", action="store_true", help="presets' bare architectures, random weights")
    bd = cmd("bench-data", [out, dev], "tile loader throughput: decode only (g2l) vs decode + CPU augmentation")
    bd.add_argument("--data", nargs="+", required=True, help="tile folders (as g2l.py --data)")
    bd.add_argument("--img-size", type=whole1, default=224, help="crop px (g2l.py --img-size)")
    bd.add_argument("--batch-size", type=whole1, default=32, help="tiles per batch")
    bd.add_argument("--load-size", type=whole0, default=0, help="tiles decoded at this px; 0 = --img-size")
    bd.add_argument("--workers", type=whole0, default=2, help="DataLoader processes")
    bd.add_argument("--batches", type=whole1, default=20, help="timed batches per pipeline")
    rep = cmd("report", [out], "report.md + report.png (results in --out as bars) + curves.png (--run's metrics)")
    rep.add_argument("--run", default="", help="a g2l run folder: its metrics.jsonl drawn as curves (default: none)")
    return p

def main(argv=None):
    a = parser().parse_args(argv)
    check_out(a.out)
    if getattr(a, "task", None) == "":  # the results' name: the data folder's
        a.task = Path(a.data).parent.name if Path(a.data).is_file() else Path(a.data).name
    default = signal.signal(signal.SIGTERM, interrupt)
    try:
        return globals()[f"cmd_{a.cmd.replace('-', '_')}"](a)
    except KeyboardInterrupt as e:  # Ctrl-C, or a scheduler's SIGTERM through interrupt()
        n = e.args[0] if e.args else signal.SIGINT
        print(f"stopped by {signal.Signals(n).name}; features extracted so far are cached: rerun the same command",
              file=sys.stderr)
        return 128 + n
    finally:
        signal.signal(signal.SIGTERM, default)

def interrupt(signum, frame):
    raise KeyboardInterrupt(signum)  # unwinds like Ctrl-C: temp files removed, workers stopped

if __name__ == "__main__":
    try:
        sys.exit(main())
    except UsageError as e:  # the one line without argparse's usage block, and argparse's exit status
        print(e, file=sys.stderr)
        sys.exit(2)
