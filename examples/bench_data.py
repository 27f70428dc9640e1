"""Data-path benchmark: start-up (discovery + split + first batch) and DataLoader worker memory over a full
pass, on a tree of many tile files (hard links to a few real tiles, so a 1M-tile tree takes a minute to make).

    pip install psutil                                                           # the one extra it needs
    python examples/bench_data.py /tmp/tree --tiles 1000000 --workers 4 --pass   # walk + full pass
    python examples/bench_data.py /tmp/tree --manifest                           # start-up from tiles.csv
    python examples/bench_data.py /tmp/tree --g2l OLD/g2l.py --pass              # the same with another g2l.py

Worker memory is USS (pages only that worker holds) and PSS (shared pages split among their users), from
/proc via psutil, sampled after the first batch and through the pass: growth = copy-on-read of shared data.
Tiles are the bundled CC0 tiles shrunk to 32 px, so the pass measures the data path, not JPEG decoding.
"""
import argparse, importlib.util, json, os, sys, time
from pathlib import Path

try:
    import psutil
except ImportError:
    raise SystemExit("error: examples/bench_data.py needs psutil for worker memory: pip install psutil")
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from prep_tiles import write_manifest  # tiles.csv exactly as prep_tiles.py writes it (dot folders skipped)

def make_tree(root, n, per_slide):
    """root/slideNNNNN/slideNNNNN_x<X>_y0.jpg: hard links to the bundled tiles shrunk to 32 px (root/.src)."""
    src = root / ".src"
    src.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(sorted((HERE / "tiles").rglob("*.jpg"))):
        Image.open(p).convert("RGB").resize((32, 32)).save(src / f"{i}.jpg", quality=90)
    srcs = sorted(src.iterdir())
    for s in range((n + per_slide - 1) // per_slide):
        d = root / f"slide{s:05d}"
        d.mkdir(exist_ok=True)
        for i in range(s * per_slide, min(n, (s + 1) * per_slide)):
            os.link(srcs[i % len(srcs)], d / f"slide{s:05d}_x{i}_y0.jpg")

def worker_mem():
    """(USS, PSS) in MB of each DataLoader worker (the children of this process)."""
    mem = [c.memory_full_info() for c in psutil.Process().children()]
    return [(m.uss / 2**20, m.pss / 2**20) for m in mem]

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="the tile tree (made here when missing)")
    ap.add_argument("--tiles", type=int, default=1_000_000, help="tiles in the tree, when it is made")
    ap.add_argument("--per-slide", type=int, default=5000, help="tiles per slide folder, when the tree is made")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--g2l", default=str(HERE.parent / "g2l.py"), help="the g2l.py to measure")
    ap.add_argument("--manifest", action="store_true", help="write root/tiles.csv first (default: remove it)")
    ap.add_argument("--pass", dest="full_pass", action="store_true", help="then a full pass, sampling memory")
    a = ap.parse_args()
    root = Path(a.root)
    if not root.is_dir():
        t = time.perf_counter()
        make_tree(root, a.tiles, a.per_slide)
        print(f"made {a.tiles} tiles under {root} in {time.perf_counter() - t:.1f} s", flush=True)
    if a.manifest and not (root / "tiles.csv").exists():
        write_manifest(root)
    elif not a.manifest:
        (root / "tiles.csv").unlink(missing_ok=True)
    spec = importlib.util.spec_from_file_location("g2l", a.g2l)
    g2l = importlib.util.module_from_spec(spec)
    sys.modules["g2l"] = g2l
    spec.loader.exec_module(g2l)
    cfg = g2l.Config(data=[str(root)], batch_size=a.batch_size, workers=a.workers, img_size=32, load_size=32)
    t0 = time.perf_counter()
    train, val = g2l.split_data(cfg)
    t1 = time.perf_counter()
    batches = g2l.make_batches(cfg, train, 0, torch.device("cpu"))
    next(batches)
    t2 = time.perf_counter()
    res = dict(g2l=a.g2l, tiles=len(train) + len(val), train=len(train), manifest=a.manifest,
               index_split_s=round(t1 - t0, 2), first_batch_s=round(t2 - t1, 2), startup_s=round(t2 - t0, 2),
               main_rss_mb=round(psutil.Process().memory_info().rss / 2**20))
    if a.full_pass:
        n = len(train) // a.batch_size
        first, samples = worker_mem(), []
        for i in range(1, n):
            next(batches)
            if i % max(1, n // 10) == 0:
                samples.append(worker_mem())
        last = worker_mem()
        peak = [max(s[w][0] for s in samples + [last]) for w in range(len(first))]
        res.update(pass_s=round(time.perf_counter() - t2, 1), batches=n,
                   uss_worker0_mb=[round(s[0][0]) for s in samples],
                   uss_first_mb=[round(u) for u, _ in first], uss_last_mb=[round(u) for u, _ in last],
                   uss_growth_mb=[round(p - f[0]) for p, f in zip(peak, first)],
                   pss_first_mb=[round(p) for _, p in first], pss_last_mb=[round(p) for _, p in last])
    print(json.dumps(res), flush=True)

if __name__ == "__main__":
    main()
