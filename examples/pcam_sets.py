"""pcam_sets.py: the PatchCamelyon data roles of examples/reproduce.sh and examples/lift.sh, in one place.

    python examples/pcam_sets.py repro PCAM OUT              # reproduce.sh: one folder split three ways by block
    python examples/pcam_sets.py lift PCAM_TRAIN PCAM_EVAL OUT  # lift.sh: distil on one split, evaluate on another

PCAM folders hold 0/ and 1/ of JPEGs named patch<INDEX>.jpg, INDEX being the tile's row in its PCam split. PCam
ships no slide ids; consecutive rows come from the same slide region, so each 50-row block stands in for a slide:
the probe's splits are grouped by block. Written under OUT:
- distil/: unlabelled distillation tiles (lift: symlinks into PCAM_TRAIN, all but the last --val of each class).
- val/: tiles for the trainer's agreement log only (never probed, never trained on in lift).
- eval/labels.csv (path,label,slide) and eval/robust.csv (+center): the labelled evaluation tiles. Odd blocks are
  also written as a synthetic second centre B (eval/B/): a stain/scanner-like shift in optical density, so that
  eval.py robustness has a centre axis to measure.
"""
import argparse, csv, os, re, shutil
from pathlib import Path

import numpy as np
from PIL import Image

def pcam_tiles(folder):
    """[(path, label, row index)] of a PCam folder, class 0 then 1, each sorted by file name."""
    tiles = [(p, c, int(re.sub(r"\D", "", p.stem))) for c in "01" for p in sorted((Path(folder) / c).glob("*.jpg"))]
    if not tiles:
        raise SystemExit(f"error: {folder} has no 0/*.jpg or 1/*.jpg tiles; point it at the folder that holds the "
                         "class folders 0/ and 1/")
    return tiles

def centre_b(src, dst):
    """A second 'centre': more haematoxylin, less eosin (a mix in optical density), then a warmer, darker scan."""
    od = -np.log((np.asarray(Image.open(src).convert("RGB"), float) + 1) / 256)
    od = od @ np.array([[1.15, 0.05, 0.0], [0.0, 0.85, 0.05], [0.05, 0.0, 0.95]])
    y = np.clip(256 * np.exp(-od) - 1, 0, 255) * np.array([1.0, 0.95, 0.88])
    Image.fromarray(y.astype(np.uint8)).save(dst, quality=95)

def write_csv(path, rows, cols):
    """Written whole or not at all (temp file + rename): labels.csv is the scripts' "done" mark."""
    with open(f"{path}.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows({c: r[c] for c in cols} for r in rows)
    os.replace(f"{path}.tmp", path)

def eval_sets(rows, out):
    """eval/labels.csv and eval/robust.csv from rows of dict(path, label, slide='block<N>')."""
    (out / "eval" / "B").mkdir(parents=True, exist_ok=True)
    rob = []
    for r in rows:
        if int(r["slide"][5:]) % 2:
            p = out / "eval" / "B" / Path(r["path"]).name
            centre_b(r["path"], p)
            rob.append(dict(r, path=str(p.resolve()), center="B"))
        else:
            rob.append(dict(r, center="A"))
    write_csv(out / "eval" / "robust.csv", rob, ["path", "label", "slide", "center"])
    write_csv(out / "eval" / "labels.csv", rows, ["path", "label", "slide"])  # last: the scripts' "done" mark

def repro(pcam, out):
    """A third of the 50-row blocks: unlabelled distillation data; the rest: labelled evaluation data; every 8th
    evaluation tile (256 at most) is also copied to val/ for the trainer's agreement log (unlabelled use only)."""
    ev = []
    for p, label, i in pcam_tiles(pcam):
        block = i // 50
        if block % 3 == 0:
            d = out / "distil" / f"block{block}"
            d.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, d / p.name)
        else:
            ev.append(dict(path=str(p.resolve()), label=label, slide=f"block{block}"))
    vd = out / "val" / "pcam"
    vd.mkdir(parents=True, exist_ok=True)
    for r in ev[::8][:256]:
        shutil.copy(r["path"], vd / Path(r["path"]).name)
    eval_sets(ev, out)  # last: its labels.csv says the data is complete
    print(f"distil {sum(1 for _ in (out / 'distil').rglob('*.jpg'))} tiles, eval {len(ev)} tiles, "
          f"val {len(list(vd.iterdir()))}")

def lift(train, evaluate, out, n_val):
    """Distil on PCAM_TRAIN (its last n_val tiles of each class by row, at most a tenth, held out for the agreement
    log), evaluate on PCAM_EVAL: PCam draws its splits from different slides, so the two share none."""
    tiles = pcam_tiles(train)
    for c in "01":
        mine = sorted((t for t in tiles if t[1] == c), key=lambda t: t[2])
        held = min(n_val, len(mine) // 10)  # at most a tenth (a small smoke-test folder)
        for k, (p, _, _) in enumerate(mine):
            d = out / ("val" if k >= len(mine) - held else "distil") / "pcam" / c
            d.mkdir(parents=True, exist_ok=True)
            if not (d / p.name).exists():
                (d / p.name).symlink_to(p.resolve())
    ev = [dict(path=str(p.resolve()), label=c, slide=f"block{i // 50}") for p, c, i in pcam_tiles(evaluate)]
    eval_sets(ev, out)
    n = {s: sum(1 for _ in (out / s / "pcam").rglob("*.jpg")) for s in ("distil", "val")}
    print(f"distil {n['distil']} PCam tiles, val {n['val']}, eval {len(ev)} (from {evaluate})")

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("repro")
    r.add_argument("pcam")
    r.add_argument("out", type=Path)
    li = sub.add_parser("lift")
    li.add_argument("train")
    li.add_argument("evaluate")
    li.add_argument("out", type=Path)
    li.add_argument("--val", type=int, default=256, help="held-out tiles per class for the agreement log")
    a = ap.parse_args()
    if a.cmd == "repro":
        repro(a.pcam, a.out)
    else:
        lift(a.train, a.evaluate, a.out, a.val)
