"""lift_table.py: the README's "A pretrained student" table from the results of examples/lift.sh.

    python examples/lift_table.py OUT NAME [NAME ...]

NAMES: the models in the order lift.sh passed them to eval.py: teacher, every6, first6, vitti (the undistilled
models), then the run folders OUT/runs/<row>_s<seed>. Rows with several seeds show mean ± sd over the seeds (each
seed's figure being the mean over eval.py's 3 probe splits); single models show ± sd over the probe splits.
"""
import json, re, statistics, sys
from pathlib import Path

LABEL = {"teacher": "teacher: DINOv2 ViT-S/14, 12 blocks", "every6": "start: teacher blocks 0,2,..,10 (no training)",
         "first6": "start: teacher blocks 0..5 (no training)", "vitti": "start: ViT-Ti/16, random init",
         "even6_g": "blocks 0,2,..,10, distilled, global only (paper)",
         "even6_gl": "blocks 0,2,..,10, distilled, global + local",
         "even6_gl_cosine": "blocks 0,2,..,10, global `cosine` + local",
         "even6_gl_mlp": "blocks 0,2,..,10, global + local, MLP heads",
         "even6_gl_lr3e-4": "blocks 0,2,..,10, global + local, lr 3e-4",
         "vitti_gl": "ViT-Ti from scratch, global + local, lr 5e-4",
         "first6_gl": "blocks 0..5, distilled, global + local"}
ARCH = {"teacher": 0, "every6": 1, "first6": 1, "even6": 1, "vitti": 2}  # row of bench.json (batch 64)

def ms(xs, fmt="{:.3f}"):
    if len(xs) == 1:
        return fmt.format(xs[0])
    return (fmt + " ± " + fmt).format(statistics.mean(xs), statistics.stdev(xs))

def main(out, names):
    res = Path(out) / "results"
    load = lambda f: json.loads((res / f).read_text())
    probe, rob = load("probe_pcam.json"), [r for r in load("robustness_pcam_2centres.json") if r["k"] == 20]
    agree, bench = load("agree_pcam.json"), load("bench.json")
    walls = dict(line.split() for line in (Path(out) / "runs" / "walltime.txt").read_text().splitlines())
    assert len(probe) == len(names) == len(rob) == len(agree) + 1, "results do not match the names given"
    rows = {}  # row name -> per-model dicts
    for i, name in enumerate(names):
        row = re.sub(r"_s\d+$", "", name)
        cka = 1.0 if i == 0 else agree[i - 1]["cka"]
        rows.setdefault(row, []).append(dict(probe[i], cka=cka, ri=rob[i]["ri"], wall=walls.get(name), run=name))
    print("| model | seeds | linear bal. acc | linear AUROC | kNN bal. acc | CKA to teacher | RI@20 | params | "
          "img/s (× teacher) | peak mem | distil wall time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row, models in rows.items():
        b = bench[ARCH[row.split("_")[0]]]
        if len(models) == 1:  # one model: the probe splits' sd
            m = models[0]
            lin = f"{m['linear_bacc']:.3f} ± {m['linear_bacc_std']:.3f}"
        else:
            lin = ms([m["linear_bacc"] for m in models])
        secs = [float(m["wall"]) for m in models if m["wall"]]
        cells = [LABEL.get(row, row), str(len(models)) if models[0]["run"] != row else "-", lin,
                 ms([m["linear_auroc"] for m in models]), ms([m["knn_bacc"] for m in models]),
                 "1 (itself)" if row == "teacher" else ms([m["cka"] for m in models]), ms([m["ri"] for m in models]),
                 f"{b['params_m']:.1f}M", f"{b['img_per_s']:.0f} ({b['speedup']:.1f}×)", f"{b['peak_mem_gb']:.2f} GB",
                 ms(secs, "{:.0f}") + " s" if secs else "-"]
        print("| " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
