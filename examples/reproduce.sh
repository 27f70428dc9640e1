#!/usr/bin/env bash
# Small-scale G2L reproduction on 2 CPU cores: a real pretrained teacher (DINOv2 ViT-S/14, natural images),
# real pathology tiles, ablations, evaluation. Every number in the README's "Does it work?" table comes from
# one run of this script.       bash examples/reproduce.sh [distil|eval|all]     (from the repository root)
# Needs `pip install onnx` for the teacher conversion (not a project dependency) and ../shared/ beside the repo.
set -euo pipefail
OUT=${OUT:-repro}
SHARED=${SHARED:-../shared}
STAGE=${1:-all}
mkdir -p "$OUT"

# ---- data: PCam split by contiguous index blocks (a stand-in for slides: PCam ships no slide ids), so the
# distillation tiles, the probe's train tiles and its test tiles never share a block
if [ ! -f "$OUT/eval/labels.csv" ]; then
python - "$SHARED/datasets/pcam-subset" "$OUT" <<'PY'
import csv, sys, shutil
from pathlib import Path
import numpy as np
from PIL import Image
src, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = list(csv.DictReader(open(src / "labels.csv")))
ev, rob = [], []
for r in rows:
    i = int(r["pcam_index"]); block = i // 50
    if block % 3 == 0:   # a third of the blocks: unlabelled distillation data
        d = out / "distil" / f"block{block}"; d.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / r["path"], d / Path(r["path"]).name)
    else:                # the rest: labelled evaluation data, grouped by block
        ev.append(dict(path=str((src / r["path"]).resolve()), label=r["label"], slide=f"block{block}"))
# synthetic centres for the robustness index: blocks alternate between centre A (as scanned) and centre B
# (a stain/scanner-like shift in optical density: more haematoxylin, less eosin, a warmer, darker scan)
(out / "eval" / "B").mkdir(parents=True, exist_ok=True)
for r in ev:
    if int(r["slide"][5:]) % 2:
        x = np.asarray(Image.open(r["path"]).convert("RGB"), float)
        od = -np.log((x + 1) / 256)
        od = od @ np.array([[1.15, 0.05, 0.0], [0.0, 0.85, 0.05], [0.05, 0.0, 0.95]])
        y = np.clip(256 * np.exp(-od) - 1, 0, 255) * np.array([1.0, 0.95, 0.88])
        p = out / "eval" / "B" / Path(r["path"]).name
        Image.fromarray(y.astype(np.uint8)).save(p, quality=95)
        rob.append(dict(r, path=str(p.resolve()), center="B"))
    else:
        rob.append(dict(r, center="A"))
for name, rs, cols in (("labels.csv", ev, ["path", "label", "slide"]), ("robust.csv", rob, ["path", "label", "slide", "center"])):
    with open(out / "eval" / name, "w", newline="") as f:
        w = csv.DictWriter(f, cols); w.writeheader(); w.writerows({c: r[c] for c in cols} for r in rs)
# validation tiles for the trainer's agreement log: 256 evaluation tiles (unlabelled use only)
vd = out / "val" / "pcam"; vd.mkdir(parents=True, exist_ok=True)
for r in ev[::8][:256]:
    shutil.copy(r["path"], vd / Path(r["path"]).name)
print(f"distil {sum(1 for _ in (out / 'distil').rglob('*.jpg'))} tiles, eval {len(ev)} tiles, val {len(list(vd.iterdir()))}")
PY
fi
[ -f "$OUT/teacher112/config.json" ] || python "$SHARED/tools/make_offline_teacher.py" --out "$OUT/teacher112" --img-size 112
[ -f "$OUT/slide_tiles/slides.csv" ] || python prep_tiles.py "$SHARED/datasets/wsi-real" --out "$OUT/slide_tiles" \
    --mpp 0.5 --mpp-override 0.25   # CMU-1-Small-Region has its mpp; the TCGA crop has none (0.25 is assumed)

T="$OUT/teacher112"
COMMON=(--teacher "$T" --data "$OUT/distil" "$OUT/slide_tiles" --val-data "$OUT/val" --img-size 112
        --batch-size 32 --epochs 4 --lr 5e-4 --warmup-steps 20 --eval-every 50 --log-every 10 --workers 2 --seed 0)
distil() {  # name, then options; skipped when the run has already exported its student
  local name=$1; shift
  [ -f "$OUT/runs/$name/student/model.safetensors" ] && return 0
  local t0=$SECONDS
  python g2l.py "${COMMON[@]}" "$@" --out "$OUT/runs/$name" 2>&1 | grep -v "^distil" > "$OUT/runs/$name.log" || true
  echo "$name $((SECONDS - t0)) s" | tee -a "$OUT/runs/walltime.txt"
}
if [ "$STAGE" != eval ]; then
  mkdir -p "$OUT/runs"
  distil global        --student vit_tiny_patch16_224 --w-local 0                  # the paper's recipe
  distil global_local  --student vit_tiny_patch16_224 --w-local 1                  # + local loss
  distil cosine        --student vit_tiny_patch16_224 --w-local 0 --global-loss cosine
  distil wlocal0.5     --student vit_tiny_patch16_224 --w-local 0.5
  distil wlocal2       --student vit_tiny_patch16_224 --w-local 2
  distil independent   --student vit_tiny_patch16_224 --w-local 1 --views independent
  distil noaug         --student vit_tiny_patch16_224 --w-local 1 --no-augment
  distil convnext      --student convnext_atto --w-local 1                        # another family (token map resized)
fi
