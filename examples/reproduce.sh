#!/usr/bin/env bash
# Small-scale G2L reproduction on 2 CPU cores: a real pretrained teacher (DINOv2 ViT-S/14, natural images),
# real pathology tiles, ablations, evaluation. Every number in the README's "Does it work?" table comes from
# one run of this script. From the repository root:
#
#     PCAM=path/to/pcam SLIDES=path/to/slides bash examples/reproduce.sh [data|distil|eval|all]
#
# PCAM: a folder 0/ + 1/ of PatchCamelyon JPEGs named patch<INDEX>.jpg (the README says where to get the 3,000
#       used for the table; examples/pcam, the 200 bundled tiles, is a quick smoke run).
# SLIDES: a folder of whole-slide images (the table used examples/CMU-1-Small-Region.svs and the TCGA crop
#       tcga-cr-7395-01a-01-ts1.svs; slides without an mpp in their header are read as 0.25 µm/px).
# Needs `pip install onnx` for the teacher conversion (examples/make_dinov2_teacher.py; not a project dependency).
set -euo pipefail
OUT=${OUT:-repro}
STAGE=${1:-all}
IMG=${IMG:-112}                 # teacher px (IMG=224 on a GPU); students run on the same patch grid
STU=$((IMG / 14 * 16))
fail() { echo "error: $*" >&2; exit 2; }
case "$STAGE" in data|distil|eval|all) ;; *) fail "unknown stage '$STAGE'; use data, distil, eval or all";; esac
if [ "$STAGE" != eval ] || [ ! -f "$OUT/eval/labels.csv" ]; then  # eval alone reuses the data already prepared
  [ -n "${PCAM:-}" ] || fail "set PCAM to a folder of PatchCamelyon tiles (0/*.jpg, 1/*.jpg); see the README's \"Does it work?\" for where to get them, or PCAM=examples/pcam for a smoke run"
  ls "$PCAM"/0/*.jpg "$PCAM"/1/*.jpg > /dev/null 2>&1 || fail "PCAM=$PCAM has no 0/*.jpg and 1/*.jpg tiles; point it at the folder that holds the class folders 0/ and 1/"
  [ -n "${SLIDES:-}" ] || fail "set SLIDES to a folder of whole-slide images (e.g. SLIDES=examples, which holds the CC0 slide CMU-1-Small-Region.svs)"
  [ -d "$SLIDES" ] || fail "SLIDES=$SLIDES is not a folder; point it at a folder of whole-slide images"
fi
[ "$STAGE" = data ] || [ -f "$OUT/teacher$IMG/config.json" ] || python -c "import onnx" 2> /dev/null \
  || fail "the teacher conversion needs the onnx package, which g2l does not install; run: pip install onnx"
mkdir -p "$OUT"

# ---- data: PCam split by contiguous index blocks (a stand-in for slides: PCam ships no slide ids), so the
# distillation tiles, the probe's train tiles and its test tiles never share a block (examples/pcam_sets.py)
[ -f "$OUT/eval/labels.csv" ] || python examples/pcam_sets.py repro "$PCAM" "$OUT"
[ "$STAGE" = eval ] || [ -f "$OUT/slide_tiles/tiles.csv" ] || python prep_tiles.py "$SLIDES" --out "$OUT/slide_tiles" \
    --mpp 0.5 --mpp-override 0.25   # CMU-1-Small-Region has its mpp; the TCGA crop has none (0.25 is assumed)
[ "$STAGE" = data ] && exit 0
[ -f "$OUT/teacher$IMG/config.json" ] || python examples/make_dinov2_teacher.py --out "$OUT/teacher$IMG" --img-size $IMG

T="$OUT/teacher$IMG"
COMMON=(--teacher "$T" --data "$OUT/distil" "$OUT/slide_tiles" --val-data "$OUT/val" --img-size $IMG
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
  distil global_local_12ep --student vit_tiny_patch16_224 --w-local 1 --epochs 12  # 3x longer: does it keep improving?
fi

# ---- evaluation: the teacher, a random-init student, and every distilled student, on the held-out PCam blocks
if [ "$STAGE" != distil ]; then
  RUNS=(global global_local cosine wlocal0.5 wlocal2 independent noaug convnext global_local_12ep)
  MODELS=(--model "$T" --img-size $IMG --model vit_tiny_patch16_224 --img-size $STU)
  for r in "${RUNS[@]}"; do MODELS+=(--model "$OUT/runs/$r" --img-size 0); done
  R="$OUT/results"
  python eval.py probe "${MODELS[@]}" --data "$OUT/eval/labels.csv" --task pcam --seeds 3 --out "$R"
  python eval.py robustness "${MODELS[@]}" --data "$OUT/eval/robust.csv" --task pcam_2centres --out "$R"
  STUDENTS=(--student vit_tiny_patch16_224 --student-img-size $STU)
  for r in "${RUNS[@]}"; do STUDENTS+=(--student "$OUT/runs/$r" --student-img-size 0); done
  python eval.py agree --teacher "$T" --teacher-img-size $IMG "${STUDENTS[@]}" --data "$OUT/eval/labels.csv" --task pcam --out "$R"
  python eval.py bench --model "$T" --model vit_tiny_patch16_224 --model convnext_atto --img-size $IMG \
      --batch-sizes 32 --iters 10 --out "$R"
  python eval.py report --out "$R"
  python - "$OUT" <<'PY'   # the README table, from the files above
import json, sys
from pathlib import Path
out = Path(sys.argv[1]); R = out / "results"
probe = {Path(r["model"]).name: r for r in json.loads((R / "probe_pcam.json").read_text())}
ri = {Path(r["model"]).name: r for r in json.loads((R / "robustness_pcam_2centres.json").read_text()) if r["k"] == 20}
agree = {Path(r["student"]).name: r for r in json.loads((R / "agree_pcam.json").read_text())}
bench = {r["model"]: r for r in json.loads((R / "bench.json").read_text())}
wall = dict(l.split()[:2] for l in (out / "runs" / "walltime.txt").read_text().splitlines())
arch = lambda n: "convnext_atto" if n == "convnext" else "vit_tiny_patch16_224" if n in wall else n
print("| model | bal. acc (linear) | AUROC (linear) | kNN acc | kNN bal. acc | CKA to teacher | RI@20 | de Jong@20 | params | img/s | distil wall time |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
label = {"teacher112": "teacher: DINOv2 ViT-S/14 (pretrained)", "teacher224": "teacher: DINOv2 ViT-S/14 (pretrained)", "vit_tiny_patch16_224": "student ViT-Ti/16, random init",
         "global": "ViT-Ti distilled, global only (paper)", "global_local": "ViT-Ti distilled, global + local"}
for name, p in probe.items():
    b = bench.get(arch(name)) or bench.get(p["model"], {})
    a = agree.get(name, {})
    cka = "1 (itself)" if name.startswith("teacher") else f"{a.get('cka', float('nan')):.3f}"
    print(f"| {label.get(name, name)} | {p['linear_bacc']:.3f} ± {p['linear_bacc_std']:.3f} | {p['linear_auroc']:.3f} | {p['knn_acc']:.3f} | "
          f"{p['knn_bacc']:.3f} | {cka} | {ri[name]['ri']:.3f} | {ri[name]['dejong']:.3f} | {b.get('params_m', float('nan')):.1f}M | "
          f"{b.get('img_per_s', float('nan')):.0f} | {wall[name] + ' s' if name in wall else '-'} |")
PY
fi
