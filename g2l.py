"""g2l.py: distil a frozen giga-scale pathology ViT (teacher) into a smaller student, in one file.

Recipe: G2L (Cho et al., arXiv 2510.11176): teacher and student see the same augmented tile, a
projection head maps the student's global feature into the teacher's space, and the loss is the
log-sum of |BN(student) - BN(teacher)|^4 (Miles & Mikolajczyk, AAAI 2024). g2l adds an optional
local loss on patch tokens (RADIO / GPFM style: 0.9 cosine + 0.1 smooth-L1).

    python g2l.py    # demo (CC0 tiles, small ViTs): 127 s on 2 idle cores of an AMD EPYC machine with HF_HUB_OFFLINE=1
    python g2l.py --demo --steps 5                   # the demo's settings, any option changed
    python g2l.py --teacher h-optimus-0 --student uni --data tiles/ --out runs/luad
    python g2l.py --teacher h-optimus-0 --student hibou-l --w-local 0 --data tiles/   # the paper's pair and loss
    torchrun --standalone --nproc_per_node=8 g2l.py --teacher h-optimus-0 --student uni --data tiles/
    python g2l.py --teacher h-optimus-0 --teacher-weights h0.safetensors \\
        --student vit_large_patch16_224 --data tiles/                  # offline weights
    python g2l.py --synthetic --steps 20 --student uni   # step speed without I/O (loader speed: eval.py bench-data)

The student lands in OUT/student/ as a timm local-dir:
    timm.create_model("local-dir:runs/NAME/student", pretrained=True)
Exit status: 0 done, 1 a failure, 2 an argument error, 128+n stopped by signal n (after saving; SIGTERM: 143).
"""
import argparse, contextlib, csv, dataclasses, fcntl, functools, gc, hashlib, inspect, json, math, os
import re, resource, shlex, shutil, signal, sys, time, warnings
from collections import deque
from pathlib import Path
from typing import Callable, Literal, NamedTuple, Optional, get_args

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

try:
    import timm
except RuntimeError as e:  # a torchvision built for another torch: "operator torchvision::nms does not exist"
    if "torchvision" not in str(e):
        raise
    from importlib.metadata import version
    raise SystemExit(f"error: torch {version('torch')} and torchvision {version('torchvision')} do not match "
                     f"({' '.join(str(e).split())[-60:]}); install the tested pair from PyPI (no extra index): "
                     "pip install --force-reinstall torch==2.14.1 torchvision==0.29.1 (README: Set-up)") from None
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

def rank_world():
    """(rank, world size) from torch.distributed itself: (0, 1) for a single process."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

def print0(*a, **k):
    if rank_world()[0] == 0:
        print(*a, **k, flush=True)

def one_line(e, limit=200):
    """An exception in one short line, for the one-line errors: its type and its message (whitespace collapsed)."""
    msg = " ".join(str(e).split())
    if len(msg) > limit:  # keep the end too, where torch names the key or shape; cut between words
        msg = msg[:limit // 3].rsplit(" ", 1)[0] + " ... " + msg[-limit * 2 // 3:].split(" ", 1)[-1]
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__

class UsageError(SystemExit):
    code = 2  # an argument error, found before any work: argparse's exit status (its one line: see __main__)

# ----------------------------------------------------------------------------- config and command line
@dataclasses.dataclass(frozen=True)  # frozen: derived values come from final_config, never by assignment
class Config:
    teacher: str = "h-optimus-0"        # preset, timm name, hf-hub:ORG/NAME, local-dir:PATH or a g2l run folder
    student: str = "uni"                # the same naming rules as --teacher
    teacher_weights: str = ""           # local .safetensors/.pth/.bin for the teacher's architecture ("random": none)
    student_weights: str = ""           # local weights for the student's architecture ("random": random init)
    teacher_kwargs: str = ""            # JSON architecture kwargs, e.g. '{"depth": 2}'
    student_kwargs: str = ""            # JSON architecture kwargs for the student
    data: list = dataclasses.field(default_factory=lambda: ["tiles"])  # folders (recursive) or CSVs with a path column
    val_data: list = dataclasses.field(default_factory=list)  # validation tile folders (default: held-out slides)
    val_frac: float = 0.05              # held-out fraction of the tiles when --data has only one slide
    max_val: int = 512                  # validation tiles used at each evaluation
    balance: bool = False               # sample slides equally often, whatever their tile counts
    out: str = "runs/g2l"               # the run folder: config, metrics, checkpoint, exported student
    img_size: int = 0                   # teacher input px; 0 = the teacher's native size
    student_img_size: int = 0           # 0 = the size whose patch grid equals the teacher's
    load_size: int = 0                  # tiles are resized to this, then randomly cropped to img_size (0 = img_size)
    batch_size: int = 32                # per process, per micro-step
    grad_accum: int = 1                 # micro-steps per optimizer step
    steps: int = 0                      # optimizer steps; 0 = derive from --epochs
    epochs: float = 5.0                 # passes over the training tiles, when --steps is 0
    lr: float = 1e-4                    # AdamW peak learning rate (G2L)
    min_lr_frac: float = 0.01           # lr and weight decay both decay (cosine) to this fraction
    weight_decay: float = 0.05          # AdamW peak weight decay (G2L)
    warmup_steps: int = 100             # linear warm-up of the learning rate
    clip_grad: float = 1.0              # max gradient norm (0 = no clipping)
    global_loss: Literal["logsum", "cosine", "smoothl1", "mse"] = "logsum"  # on the global feature (logsum: G2L's)
    local_loss: Literal["cosine-smoothl1", "logsum", "mse", "none"] = "cosine-smoothl1"  # on the patch tokens
    w_global: float = 1.0               # weight of the global loss
    w_local: float = 1.0                # weight of the local loss (0 = the paper's global-only recipe)
    alpha: float = 4.0                  # exponent of the logsum loss
    head: Literal["linear", "mlp"] = "linear"  # the projection heads (mlp: Linear-GELU-Linear), dropped at export
    augment: bool = True                # the paper's flips, colour jitter and blur
    views: Literal["same", "independent"] = "same"  # independent: colour and blur drawn per model (crop, flips shared)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # autocast dtype (auto: bf16 on a GPU that has it)
    compile: Literal["auto", "on", "off"] = "auto"  # torch.compile the student (auto: on for CUDA)
    grad_checkpointing: bool = False    # recompute the student's activations in backward (memory)
    teacher_chunk: int = 0              # teacher forward in micro-batches of this size (memory)
    workers: int = 4                    # DataLoader processes decoding tiles
    seed: int = 0                       # data order, augmentations and init
    log_every: int = 10                 # steps between log lines / metrics.jsonl rows
    eval_every: int = 100               # steps between validation agreement checks
    ckpt_every: int = 500               # steps between checkpoints (and one at the end)
    resume: str = ""                    # auto (OUT/ckpt.pt) or a path to a ckpt.pt
    overwrite: bool = False             # start over in an --out that holds a run (ckpt.pt or student/)
    early_stop: bool = False            # G2L: stop when loss > mean of last 100 steps more than 10 times in a row
    max_bad_frac: float = 0.01          # stop when over this fraction of the tiles drawn, and over 10, are unreadable
    synthetic: bool = False             # random tensors instead of tiles: measures the step alone
    demo: bool = False                  # start from the demo's settings (what `python g2l.py` alone runs)

# the no-argument demo: real CC0 tiles shipped in examples/, a small real teacher when the hub is reachable
DEMO = dict(teacher="vit_small_patch14_dinov2.lvd142m", student="vit_tiny_patch16_224",
            data=[str(Path(__file__).resolve().parent / "examples" / "tiles")], out="runs/demo",
            img_size=112, batch_size=16, steps=120, warmup_steps=10, lr=5e-4, eval_every=40, log_every=10,
            ckpt_every=60, workers=2, val_frac=0.15, max_val=64)

def number(kind, lo=0, hi=math.inf, ends="[)"):
    """An argparse type: a `kind` between lo and hi, `ends` saying which ends are included; NaN and inf are refused."""
    def parse(text):
        v = kind(text)
        if not ((lo <= v if ends[0] == "[" else lo < v) and (v <= hi if ends[1] == "]" else v < hi)):
            raise argparse.ArgumentTypeError(f"{text} is not in {ends[0]}{lo}, {hi}{ends[1]}")
        return v
    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse

RANGES = {number(int, 1): "batch_size grad_accum log_every eval_every ckpt_every max_val",  # other ints: >= 0
          number(float, 0, ends="()"): "lr alpha epochs",  # other floats: >= 0
          number(float, 0, 1, "[]"): "min_lr_frac max_bad_frac", number(float, 0, 1, "()"): "val_frac"}
TYPES = {name: kind for kind, names in RANGES.items() for name in names.split()}

def parse_args(argv=None):
    """The command line is the Config: same names (dashes for underscores), its comments are the --help."""
    argv = sys.argv[1:] if argv is None else argv
    helps = dict(re.findall(r"^    (\w+): .*?# (.*)$", inspect.getsource(Config), re.M))
    epilog = (f"--data: folders, searched recursively for {'/'.join(e[1:] for e in IMG_EXTS)} (a tile's parent folder "
              f"is its slide), or CSVs with a path column (relative to the CSV).\npresets: {', '.join(PRESETS)}")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, epilog=epilog)
    for f in dataclasses.fields(Config):
        choices = get_args(f.type) or None  # a Literal field: its values
        name, kw = "--" + f.name.replace("_", "-"), dict(help=helps.get(f.name, " "), choices=choices)
        if f.type is bool:
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, help=kw["help"])
        elif f.type is list:
            p.add_argument(name, nargs="+", default=f.default_factory(), **kw)
        else:
            kind = TYPES.get(f.name) or (number(f.type) if f.type in (int, float) else str)
            p.add_argument(name, type=kind, default=f.default, **kw)
    if not argv or "--demo" in argv:  # the demo's values become the defaults, so any flag given still wins
        p.set_defaults(**DEMO, demo=True)
    return Config(**vars(p.parse_args(argv)))

def check_args(cfg):
    """The rules argparse cannot express, checked before any model is built or any file written: one line each."""
    for flag in ("teacher_kwargs", "student_kwargs"):
        json_kwargs(getattr(cfg, flag), "--" + flag.replace("_", "-"))
    if not any(w > 0 for w in loss_weights(cfg).values()):
        raise UsageError(f"error: --w-global {cfg.w_global} and --w-local {cfg.w_local} (--local-loss "
                         f"{cfg.local_loss}) leave no loss to train on")
    if cfg.load_size and cfg.img_size and cfg.load_size < cfg.img_size:
        raise UsageError(f"error: --load-size {cfg.load_size}: must be >= --img-size {cfg.img_size}")
    if int(os.environ.get("RANK", 0)) == 0:  # rank 0 writes everything: a read-only place fails before any model
        check_out(cfg.out)
    if not (cfg.resume or cfg.overwrite or cfg.out == DEMO["out"] and cfg.demo) and holds_run(cfg.out):
        raise UsageError(f"error: --out {cfg.out} holds a run (ckpt.pt or student/); add --resume auto to continue "
                         "it, or --overwrite to start over (it is replaced at the first checkpoint)")
    check_names(cfg)  # the models, their weight files and --resume PATH, before any data is indexed or model built

def check_out(out):
    """--out refused before any data is read or model built: a file, or a place this user cannot write."""
    p = Path(out).absolute()
    near = next(q for q in [p, *p.parents] if q.exists())  # --out itself is made later
    if not near.is_dir() or not os.access(near, os.W_OK | os.X_OK):
        why = "it is a file" if near == p else f"{near} is a file" if not near.is_dir() else f"{near} is read-only"
        raise UsageError(f"error: --out {out} is not a writable folder ({why}); choose a folder you can write to")

def json_kwargs(text, flag):
    """A --*-kwargs value as a dict ("" is none); anything but a JSON object is an argument error."""
    try:
        kwargs = json.loads(text or "{}")
    except ValueError:
        kwargs = None
    if not isinstance(kwargs, dict):
        raise UsageError(f"error: {flag} {text}: must be a JSON object, e.g. '{{\"depth\": 2}}'")
    return kwargs

def holds_run(out):
    return any((Path(out) / f).exists() for f in ("ckpt.pt", "student"))

def input_sizes(cfg, spec_t, spec_s):
    """Teacher px, the student px whose patch grid equals the teacher's (/14 at 224 -> 16x16 -> /16 at 256), load px."""
    img = cfg.img_size or spec_t.size
    if not spec_t.patch:
        raise SystemExit(f"error: the teacher {cfg.teacher} has no patch embedding; g2l distils from ViT teachers")
    if img % spec_t.patch:
        raise UsageError(f"error: --img-size {img} is not a multiple of the teacher's patch size {spec_t.patch}")
    student = cfg.student_img_size or (img // spec_t.patch * spec_s.patch if spec_s.patch else img)
    if (cfg.load_size or img) < img:
        raise UsageError(f"error: --load-size {cfg.load_size} is smaller than --img-size {img}")
    return dict(img_size=img, student_img_size=student, load_size=cfg.load_size or img)

def run_steps(cfg, n_train):
    """The run's length in optimizer steps (from --epochs when --steps is 0)."""
    per_batch = cfg.batch_size * rank_world()[1]
    if not cfg.synthetic and n_train < per_batch:
        raise UsageError(f"error: {n_train} training tiles is fewer than one batch over all processes "
                         f"({per_batch}); lower --batch-size")
    steps = cfg.steps or max(1, int(cfg.epochs * n_train / (per_batch * cfg.grad_accum)))
    if cfg.warmup_steps > steps:
        print0(f"warning: --warmup-steps {cfg.warmup_steps} is more than the run's {steps} steps: the learning "
               f"rate never reaches --lr {cfg.lr:g} (it ends at {cfg.lr * steps / cfg.warmup_steps:.2g})")
    return steps

def final_config(cfg, device, spec_t, spec_s, n_train, teacher_kwargs):
    """cfg with every derived value set once (precision, compile, workers, sizes, steps, demo teacher kwargs)."""
    precision = cfg.precision  # bf16 autocast where supported, fp32 on CPU
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    compile_ = "on" if cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda") else "off"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if cfg.workers > cores:  # more decoders than cores only adds contention and memory
        print0(f"note: --workers {cfg.workers} is more than the {cores} CPU cores available; using {cores}")
    return dataclasses.replace(cfg, precision=precision, compile=compile_, workers=min(cfg.workers, cores),
                               teacher_kwargs=teacher_kwargs, steps=run_steps(cfg, n_train),
                               **input_sizes(cfg, spec_t, spec_s))

# ----------------------------------------------------------------------------- data
IMG_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp")

class Tiles:
    """Tile paths in three numpy arrays, not a list of str: DataLoader workers fork and read them without
    touching one Python object per path (reference counts would copy those pages into every worker, ~1.3 GB
    per 10M paths). dirs: slide folders (bytes); slide: int32 folder index per tile; names: file names (bytes)."""
    def __init__(self, dirs, slide, names):
        self.dirs, self.slide, self.names = dirs, slide, names
    def __len__(self):
        return len(self.names)
    def path(self, i):
        return os.path.join(os.fsdecode(self.dirs[self.slide[i]]), os.fsdecode(self.names[i]))
    def subset(self, keep):  # a boolean mask or integer indices
        return Tiles(self.dirs, self.slide[keep], self.names[keep])

def index_tiles(folders):
    """All tiles under the folders (see index_folder). Only rank 0 touches the disk; the other ranks receive them."""
    box, (rank, world) = [None], rank_world()
    if rank == 0:
        try:
            box = [concat_tiles([index_folder(f) for f in folders])]
        except SystemExit as e:  # every rank stops with rank 0's message instead of waiting for the broadcast
            box = [e]
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], SystemExit):
        raise box[0]
    return box[0]

def load_tile(path, size):
    """Decode one tile to a uint8 [3, size, size] tensor. JPEG draft mode decodes at 1/2, 1/4 or 1/8
    scale when the stored tile is much larger than needed, which is most of the decode cost."""
    with Image.open(path) as im:
        im.draft("RGB", (size, size))
        if im.mode.startswith("I"):  # 16/32-bit grey (16-bit PNG): convert("RGB") would clip it to white
            a = np.asarray(im).astype(np.float64)
            a = a / 257 if im.mode.startswith("I;16") or a.max() > 255 else a
            im = Image.fromarray(a.round().clip(0, 255).astype(np.uint8))
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR, reducing_gap=2.0)
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)

class TileDataset(torch.utils.data.Dataset):
    """uint8 tiles, augmented later on the device; an unreadable tile is replaced by the next readable one, counted."""
    def __init__(self, tiles, size):  # tiles: Tiles, or a list of paths
        self.tiles = tiles if isinstance(tiles, Tiles) else group_tiles(map(os.path.split, tiles))  # in their order
        self.size = size
    def __len__(self):
        return len(self.tiles)
    def __getitem__(self, i):
        for k in range(len(self.tiles)):
            path = self.tiles.path((i + k) % len(self.tiles))
            try:
                return load_tile(path, self.size), k
            except Exception as e:  # corrupt / truncated / not an image
                print(f"warning: skipping unreadable tile {path}: {one_line(e)}", flush=True)
        raise RuntimeError("no readable tile in the dataset")

def split_data(cfg):
    """Training and validation Tiles: --val-data, or whole held-out slides, only as many as --max-val needs
    (at least two when there are ten or more, so one odd slide does not decide the agreement figures)."""
    tiles, rng = index_tiles(cfg.data), np.random.default_rng(cfg.seed)
    if cfg.val_data:
        val = index_tiles(cfg.val_data)
    else:
        counts = np.bincount(tiles.slide, minlength=len(tiles.dirs))
        slides, held = rng.permutation(np.flatnonzero(counts)), np.zeros(len(tiles), bool)
        if len(slides) >= 2:
            k = int(np.searchsorted(np.cumsum(counts[slides]), cfg.max_val)) + 1  # slides whose tiles reach max_val
            k = min(max(k, 2 if len(slides) >= 10 else 1), len(slides) - 1)  # and at least one slide to train on
            held = np.isin(tiles.slide, slides[:k])
        if 0 < held.sum() <= len(tiles) / 4:
            print0(f"validation: held out {k} of {len(slides)} slides ({int(held.sum())} tiles, not trained on)")
        else:  # one slide, or a few big folders (e.g. PCam's class folders 0/ 1/): hold out tiles, and say so
            why = "only one slide in --data" if len(slides) < 2 else \
                f"held-out folders would take {int(held.sum())} of {len(tiles)} tiles from training"
            n = max(1, round(cfg.val_frac * len(tiles)))
            print0(f"note: {why}; holding out {n} tiles (--val-frac) for validation (tiles of one slide may then be on "
                   "both sides; --val-data avoids that)")
            held = np.zeros(len(tiles), bool)
            held[rng.choice(len(tiles), n, replace=False)] = True
        tiles, val = tiles.subset(~held), tiles.subset(held)
    if 0 < len(val) < 32:  # the CKA of 2 tiles is 1: held out, so few give no result (and are not trained on)
        print0(f"note: {len(val)} validation tiles are too few for agreement figures (< 32)" + (
            ": they mean little" if cfg.val_data else "; none reported"))
        val = val if cfg.val_data else val.subset([])
    return tiles, val.subset(np.sort(rng.choice(len(val), min(cfg.max_val, len(val)), replace=False)))

def check_readable(tiles, flag, tries=50):
    """Decode up to `tries` tiles spread over the Tiles: if none can be read, stop now with the first error,
    rather than skip every tile during training (one unreadable tile here and there is skipped and counted)."""
    errors = []
    for i in range(0, len(tiles), max(1, len(tiles) // tries))[:tries]:
        p = tiles.path(i)
        try:
            load_tile(p, 8)
            return
        except Exception as e:  # corrupt / truncated / not an image
            errors.append(f"{p}: {one_line(e, 100)}")
    if errors:
        raise SystemExit(f"error: none of {len(errors)} tiles tried in {flag} could be read (e.g. {errors[0]}); "
                         "re-make the tiles (prep_tiles.py) or point at the right folder")

def load_data(cfg):
    """Training and validation Tiles, checked readable."""
    tiles, val_tiles = split_data(cfg) if not cfg.synthetic else ([], [])
    check_readable(tiles, "--data")
    check_readable(val_tiles, "--val-data (or the held-out slides)")
    return tiles, val_tiles

def slide_weights(slide):
    """Per-tile weights making each slide equally likely, whatever its tile count (--balance); slide: Tiles.slide."""
    return torch.from_numpy(1.0 / np.bincount(slide)[slide])

class InfiniteSampler(torch.utils.data.Sampler):
    """Seeded epoch permutations (or slide-balanced draws), sliced per rank, starting at any position:
    resuming at sample k continues exactly where an uninterrupted run would be."""
    def __init__(self, n, weights, global_batch, seed, start=0):
        self.n, self.global_batch, self.seed, self.start = n, global_batch, seed, start
        self.cdf = None if weights is None else torch.cumsum(weights.double(), 0)  # weights: slide_weights or None
    def order(self, epoch):
        g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        if self.cdf is not None:  # inverse-CDF draws: torch.multinomial refuses more than 2^24 tiles
            u = torch.rand(self.n, generator=g, dtype=torch.float64) * self.cdf[-1]
            return torch.searchsorted(self.cdf, u, right=True).clamp_(max=self.n - 1)
        return torch.randperm(self.n, generator=g)
    def __iter__(self):
        per_epoch = self.n // self.global_batch * self.global_batch  # whole global batches per epoch
        rank, world = rank_world()
        pos, b = self.start, self.global_batch // world
        while True:
            epoch, off = divmod(pos, per_epoch)
            order = self.order(epoch)
            for s in range(off, per_epoch, self.global_batch):
                yield from order[s + rank * b: s + (rank + 1) * b].tolist()
            pos = (epoch + 1) * per_epoch

def make_batches(cfg, tiles, start, device):
    """An endless iterator of (uint8 tiles, skipped) for this rank, starting at sample `start` of the run."""
    if cfg.synthetic:  # the same step on random tensors: no I/O
        pin = (lambda t: t.pin_memory()) if device.type == "cuda" else (lambda t: t)  # as the DataLoader's are
        shape = (cfg.batch_size, 3, cfg.load_size, cfg.load_size)
        return iter(lambda: (pin(torch.randint(0, 256, shape, dtype=torch.uint8)),
                             torch.zeros(cfg.batch_size, dtype=torch.long)), None)
    weights = slide_weights(tiles.slide) if cfg.balance else None
    sampler = InfiniteSampler(len(tiles), weights, cfg.batch_size * rank_world()[1], cfg.seed, start)
    if cfg.workers:  # the workers fork now: frozen objects are never scanned by gc, so no gc pass copies their pages
        gc.collect()
        gc.freeze()
    return iter(torch.utils.data.DataLoader(
        TileDataset(tiles, cfg.load_size), batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
        num_workers=cfg.workers, pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0,
        prefetch_factor=4 if cfg.workers else None, worker_init_fn=quiet_worker,
        generator=torch.Generator().manual_seed(cfg.seed)))

# ----------------------------------------------------------------------------- views (augmentation on the device)
# the paper's photometric augmentations (eval.py bench-data builds the same ones in torchvision from these numbers)
AUG = dict(jitter=(0.15, 0.15, 0.1, 0.05),  # colour jitter strengths: brightness, contrast, saturation, hue
           p_jitter=0.5, blur_px=9, sigma=(0.1, 2.0), p_blur=0.1)  # a Gaussian blur's kernel side and sigma range

DRAWS = {  # name -> its random parameters for n images, from uniform draws u(*shape)
    "crop": lambda n, u: u(n, 2),
    "hflip": lambda n, u: u(n) < 0.5,
    "vflip": lambda n, u: u(n) < 0.5,
    "jitter": lambda n, u: u(n) < AUG["p_jitter"],
    "bcsh": lambda n, u: u(n, 4) * 2 - 1,  # brightness, contrast, saturation, hue factors in [-1, 1]
    "blur": lambda n, u: u(n) < AUG["p_blur"],
    "sigma": lambda n, u: AUG["sigma"][0] + (AUG["sigma"][1] - AUG["sigma"][0]) * u(n),
}

def aug_params(n, seed, step, micro):
    """Random parameters for one global batch, each draw from its own generator keyed by (seed, step, micro-step,
    name): independent of the number of ranks and of resumption, so 1 x B and 2 x B/2 processes see identical
    views, and a draw added to DRAWS changes no other."""
    def uniform(name):
        key = hashlib.sha256(f"{seed},{step},{micro},{name}".encode()).digest()  # Python's hash() is not stable
        g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
        return lambda *shape: torch.rand(*shape, generator=g)
    return {name: draw(n, uniform(name)) for name, draw in DRAWS.items()}

def crop_flip(x, p, size):
    """Per-sample random crop to size and h/v flips of a uint8/float batch [B,3,H,W]."""
    B, _, H, W = x.shape
    if H > size or W > size:
        oy = (p["crop"][:, 0] * (H - size + 1)).long().clamp(max=H - size)
        ox = (p["crop"][:, 1] * (W - size + 1)).long().clamp(max=W - size)
        ar = torch.arange(size, device=x.device)
        rows, cols = (oy[:, None] + ar)[:, None, :, None], (ox[:, None] + ar)[:, None, None, :]
        ar_b, ar_c = torch.arange(B, device=x.device), torch.arange(3, device=x.device)
        x = x[ar_b[:, None, None, None], ar_c[None, :, None, None], rows, cols]
    x = torch.where(p["hflip"][:, None, None, None], x.flip(-1), x)
    return torch.where(p["vflip"][:, None, None, None], x.flip(-2), x)

GRAY = (0.299, 0.587, 0.114)
YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
YIQ_INV = tuple(map(tuple, torch.linalg.inv(torch.tensor(YIQ)).tolist()))  # fp32 values: tolist keeps them exact
def colour_blur(x, p):
    """The paper's photometric augmentations (AUG) on a float [0,1] batch, per sample: colour jitter, Gaussian blur."""
    B = x.shape[0]
    on = p["jitter"].view(B, 1, 1, 1)
    b, c, s, h = (p["bcsh"] * constant(AUG["jitter"], x.device)).unbind(1)
    gray = lambda t: (t * constant(GRAY, t.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    y = (x * (1 + b).view(B, 1, 1, 1)).clamp(0, 1)
    m = gray(y).mean((2, 3), keepdim=True)
    y = ((y - m) * (1 + c).view(B, 1, 1, 1) + m).clamp(0, 1)
    g = gray(y)
    y = ((y - g) * (1 + s).view(B, 1, 1, 1) + g).clamp(0, 1)
    # hue: rotate chroma in YIQ space by 2*pi*h (a linear, batched stand-in for an HSV hue shift)
    cos, sin = torch.cos(2 * math.pi * h), torch.sin(2 * math.pi * h)
    rot = torch.zeros(B, 3, 3, device=x.device)
    rot[:, 0, 0], rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = 1, cos, -sin, sin, cos
    M = constant(YIQ_INV, x.device) @ rot @ constant(YIQ, x.device)
    y = torch.einsum("bij,bjhw->bihw", M, y).clamp(0, 1)
    x = torch.where(on, y, x)
    idx = p["blur"].nonzero().flatten()  # make_views keeps this mask on the host: no device-to-host sync here
    idx = idx.to(x.device, non_blocking=True)
    if len(idx):  # a separable Gaussian, one sigma per image, as a grouped convolution
        r = AUG["blur_px"] // 2
        t = torch.arange(2 * r + 1, device=x.device) - float(r)
        k = torch.exp(-t[None] ** 2 / (2 * p["sigma"][idx, None] ** 2))
        k = (k / k.sum(1, keepdim=True)).repeat_interleave(3, 0)
        z = x[idx].reshape(1, -1, *x.shape[2:])
        z = F.conv2d(F.pad(z, (r, r, 0, 0), mode="reflect"), k[:, None, None, :], groups=z.shape[1])
        z = F.conv2d(F.pad(z, (0, 0, r, r), mode="reflect"), k[:, None, :, None], groups=z.shape[1])
        x = x.index_copy(0, idx, z.view(len(idx), 3, *x.shape[2:]))
    return x

def make_views(x, cfg, step, micro, device):
    """uint8 tiles -> (teacher view, student view), float [0,1] on the device. G2L: the same view (--views same)."""
    n, (rank, world) = x.shape[0], rank_world()
    mine = lambda seed: to_device({k: v[rank * n:(rank + 1) * n]  # this rank's slice of the global batch
                                   for k, v in aug_params(n * world, seed, step, micro).items()}, device)
    p = mine(cfg.seed)
    if not cfg.augment:  # the random crop (when --load-size > --img-size) stays; flips, colour and blur go
        p["hflip"], p["vflip"] = torch.zeros_like(p["hflip"]), torch.zeros_like(p["vflip"])
    x = crop_flip(x.to(device, non_blocking=True), p, cfg.img_size).float() / 255
    if not cfg.augment:
        return x, x
    xt = colour_blur(x, p)
    return xt, colour_blur(x, mine(cfg.seed + 7919)) if cfg.views == "independent" else xt

def student_view(x, cfg):
    """The teacher's view at the student's input size (the same patch grid)."""
    if cfg.student_img_size == cfg.img_size:
        return x
    return F.interpolate(x, size=cfg.student_img_size, mode="bilinear", antialias=True, align_corners=False)

# ----------------------------------------------------------------------------- models
BIOPTIMUS = dict(mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517))
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
HIBOU = dict(mean=(0.7068, 0.5755, 0.7220), std=(0.1950, 0.2316, 0.1816))
SWIGLU = dict(mlp_layer="swiglu_packed", act_layer="silu")
MLP_LAYERS = {"swiglu_packed": timm.layers.SwiGLUPacked}  # a JSON-able mlp_layer (timm reads act_layer names itself)

def swiglu(dim, ratio=4):
    """timm kwargs for DINOv2's SwiGLU MLP: its hidden size is 2/3 of dim*ratio rounded up to a multiple of 8, and
    timm's SwiGLUPacked packs gate + value into one fc1 of twice that width (+0.5: int() must not round down)."""
    hidden = (int(dim * ratio * 2 / 3) + 7) // 8 * 8
    return dict(mlp_ratio=(2 * hidden + 0.5) / dim, **SWIGLU)

def preset(repo, arch, norm, embed="pool", hf=False, **kwargs):
    """resolve's dict for a hub checkpoint, built offline at 224 px (every preset's); hf: in transformers' DINOv2."""
    return dict(load="hf-hub:" + repo, pretrained=True, hf="hf-hub:" + repo if hf else None, arch=arch,
                kwargs=dict(img_size=224, **kwargs), embed=embed, **norm)

PRESETS = {  # embed cls+mean: the CLS token and the mean patch token, concatenated (Virchow2's own embedding)
    "h-optimus-0": preset("bioptimus/H-optimus-0", "vit_giant_patch14_reg4_dinov2", BIOPTIMUS),
    "h-optimus-1": preset("bioptimus/H-optimus-1", "vit_giant_patch14_reg4_dinov2", BIOPTIMUS),
    "h0-mini": preset("bioptimus/H0-mini", "vit_base_patch14_reg4_dinov2", BIOPTIMUS, mlp_ratio=5.33334, **SWIGLU),
    "uni": preset("MahmoodLab/UNI", "vit_large_patch16_224", IMAGENET, init_values=1e-5, dynamic_img_size=True),
    "uni2-h": preset("MahmoodLab/UNI2-h", "vit_giant_patch14_224", IMAGENET, depth=24, num_heads=24, embed_dim=1536,
                     init_values=1e-5, mlp_ratio=5.33334, no_embed_class=True, reg_tokens=8, dynamic_img_size=True,
                     **SWIGLU),
    "virchow2": preset("paige-ai/Virchow2", "vit_huge_patch14_224", IMAGENET, "cls+mean", init_values=1e-5,
                       mlp_ratio=5.3375, reg_tokens=4, global_pool="", dynamic_img_size=True, **SWIGLU),
    "prov-gigapath": preset("prov-gigapath/prov-gigapath", "vit_giant_patch14_dinov2", IMAGENET, patch_size=16,
                            embed_dim=1536, depth=40, num_heads=24, mlp_ratio=5.33334),
    "hibou-l": preset("histai/hibou-L", "vit_large_patch14_reg4_dinov2", HIBOU, hf=True, **swiglu(1024)),
    "hibou-b": preset("histai/hibou-b", "vit_base_patch14_reg4_dinov2", HIBOU, hf=True, **swiglu(768)),
    "phikon-v2": preset("owkin/phikon-v2", "vit_large_patch14_dinov2", IMAGENET, hf=True, patch_size=16),
}

def resolve(name):
    """What a model name tells, as a dict: load (the name timm loads it by), pretrained, arch (its bare timm
    architecture), kwargs, embed and, where known, mean, std, size, hf. See README 'Models and offline weights'."""
    p = Path(name)
    if (p / "student" / "config.json").is_file():  # a g2l run folder
        p = p / "student"
    if (p / "config.json").is_file() and not name.startswith(("hf-hub:", "local-dir:")):
        name = f"local-dir:{p}"
    where = name.removeprefix("local-dir:")
    if name.startswith(("hf-hub:", "local-dir:")) and (hf := dinov2_spec(where)):
        return dict(hf, load=name, pretrained=True)  # Hibou, Phikon-v2: a timm ViT, weights converted on load
    if name.startswith("local-dir:"):  # timm's own format, as g2l exports a student
        conf = Path(where) / "config.json"
        cfg = json.loads(conf.read_text()) if conf.is_file() else {}
        if "architecture" not in cfg:  # no config.json, or a g2l run's own: a run that exported no student/ yet
            raise UsageError(f"error: {where} {'has no timm config.json' if Path(where).exists() else 'does not exist'}"
                             " (a local-dir, a g2l run folder or its student/ needs config.json + model.safetensors)")
        pc, g = cfg.get("pretrained_cfg", cfg), cfg.get("g2l", {})  # g: a g2l export's own record, honest in results
        return dict(load=name, pretrained=True, arch=cfg["architecture"], kwargs=cfg.get("model_args", {}),
                    embed=g.get("embed", "pool"), mean=pc.get("mean"), std=pc.get("std"),
                    size=pc.get("input_size", [3, 0, 0])[-1], source=g and f"g2l student of {g.get('teacher')} "
                    f"(from {g.get('start', 'an unrecorded start')}), {name}")
    if name in PRESETS:
        return dict(PRESETS[name])
    if "/" in name and not name.startswith("hf-hub:"):  # a path, not a name
        return resolve("local-dir:" + name)  # says what is missing
    if not name.startswith("hf-hub:") and not timm.is_model(name.split(".")[0]):
        raise UsageError(f"error: unknown model {name!r}: use a preset ({', '.join(PRESETS)}), a timm name "
                         "(timm.list_models()), hf-hub:ORG/NAME, local-dir:PATH or a g2l run folder")
    return dict(load=name, pretrained="." in name or name.startswith("hf-hub:"), arch=name.split("hf-hub:")[-1],
                kwargs={}, embed="pool")

@dataclasses.dataclass(frozen=True)
class Spec:
    """What a loaded model needs besides its weights; built in one place (load_model)."""
    arch: str           # timm architecture
    kwargs: dict        # architecture kwargs (JSON-able), as built
    source: str         # where the weights came from, in words
    mean: tuple         # its own normalisation
    std: tuple
    size: int           # input px it was built for
    patch: int          # patch size (0: not a ViT)
    embed: str          # global feature: pool (the pooled pre-logits output) | cls+mean (Virchow2)
    width: int          # token width (model.num_features)
    @property
    def dim(self):  # global feature width
        return self.width * (2 if self.embed == "cls+mean" else 1)

def load_model(name, weights="", kwargs="", img_size=0, device="cpu", meta=False):
    """Build a model by the naming rules and return (model, Spec)."""
    info = resolve(name)
    extra = json_kwargs(kwargs, "--*-kwargs")
    kw = {**info["kwargs"], **extra}
    bare = bool(weights or extra or meta)  # own weights ("random": none) or another shape: the bare architecture
    weights = "" if weights == "random" else weights
    converted = info.get("hf") and not bare  # transformers DINOv2 weights: fetched here, converted by load_weights
    if converted:  # for a preset too, the checkpoint's own config.json decides the architecture
        kw = dict((dinov2_spec(info["hf"]) or info)["kwargs"])
        weights = hf_file(info["hf"], "model.safetensors") or hf_file(info["hf"], "pytorch_model.bin")
        if not weights:
            raise SystemExit(f"error: could not get the weights of {name} ({info['hf']}: model.safetensors or "
                             f"pytorch_model.bin). {offline_help(info)}")
    target, pretrained = (info["arch"], False) if bare or converted else (info["load"], info["pretrained"])
    source = (f"pretrained {info['hf']} (transformers DINOv2, converted to timm)" if converted else
              f"weights file {weights}" if weights else "pretrained " + target if pretrained else "random init")
    build = {k: MLP_LAYERS.get(v, v) if k == "mlp_layer" else v for k, v in kw.items()}
    build.update({"img_size": img_size} if img_size else {})
    create = functools.partial(timm.create_model, target, pretrained=pretrained, num_classes=0)
    try:
        with torch.device("meta") if meta else contextlib.nullcontext():
            try:
                model = create(**build)
            except TypeError as e:  # a convolutional net takes any input size and no img_size argument
                if "img_size" not in str(e):
                    raise
                model = create(**{k: v for k, v in build.items() if k != "img_size"})
    except (OSError, RuntimeError, ValueError, TypeError, AssertionError) as e:
        if isinstance(e, OSError) or target.startswith("hf-hub:") or re.search("hub|huggingface", str(e), re.I):
            raise SystemExit(f"error: could not load {name} from the Hugging Face hub ({one_line(e)}). "
                             + offline_help(info))
        raise SystemExit(f"error: cannot build {name} with kwargs {kw}: {one_line(e)}")
    if weights:
        load_weights(model, weights, name)
    pc, pe = model.pretrained_cfg, getattr(model, "patch_embed", None)
    spec = Spec(arch=pc.get("architecture") or info["arch"], kwargs=kw, source=info.get("source") or source,
                mean=tuple(info.get("mean") or pc.get("mean", IMAGENET["mean"])),
                std=tuple(info.get("std") or pc.get("std", IMAGENET["std"])),
                # the size it was built for: a kwargs img_size beats the pretrained config (DINOv2's is 518 px)
                size=img_size or kw.get("img_size") or info.get("size") or pc.get("input_size", (3, 224, 224))[-1],
                patch=int(pe.patch_size[0]) if pe is not None else 0, embed=info["embed"], width=model.num_features)
    return model if meta else model.to(device), spec

def load_models(cfg, device):
    """Teacher and student as named, and the teacher kwargs used: the demo falls back to a random-init teacher."""
    try:
        teacher, spec_t = load_model(cfg.teacher, cfg.teacher_weights, cfg.teacher_kwargs, cfg.img_size, device)
        teacher_kwargs = cfg.teacher_kwargs
    except SystemExit:
        if not (cfg.teacher == DEMO["teacher"] and cfg.data == DEMO["data"]):
            raise
        print0("note: the demo teacher's pretrained weights are not reachable; continuing with a random-init "
               "teacher that pools its patch tokens (a random ViT's CLS token barely depends on the image)")
        teacher_kwargs = json.dumps({**json_kwargs(cfg.teacher_kwargs, "--teacher-kwargs"), "global_pool": "avg"})
        teacher, spec_t = load_model(cfg.teacher.split(".")[0], "", teacher_kwargs, cfg.img_size, device)
    student, spec_s = load_model(cfg.student, cfg.student_weights, cfg.student_kwargs, 0, device)
    return teacher, spec_t, student, spec_s, teacher_kwargs

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # --precision

def autocast(cfg, device):
    return torch.autocast(device.type, dtype=DTYPES[cfg.precision], enabled=cfg.precision != "fp32")

class Features(NamedTuple):
    global_: torch.Tensor            # [B, D] the global feature (after the projection head, for the student)
    tokens: Optional[torch.Tensor]   # [B, C, h, w] the patch-token map; None: a student without a local head

def encode(model, spec, x):
    """Features of a float [0,1] batch, in the model's own mean/std: tokens are its own [B, width, h, w]."""
    mean, std = (constant(tuple(v), x.device).view(1, 3, 1, 1) for v in (spec.mean, spec.std))
    feats = model.forward_features((x - mean) / std)
    if feats.ndim == 2:  # one vector per image: no tokens (train it with --w-local 0)
        return Features(global_=feats, tokens=None)
    if feats.ndim == 4:  # convolutional: [B, C, h, w]
        return Features(global_=model.forward_head(feats, pre_logits=True), tokens=feats)
    patches = feats[:, model.num_prefix_tokens:]  # after CLS + registers, never a hard-coded [:, 1:]
    h, w = x.shape[-2] // spec.patch, x.shape[-1] // spec.patch
    tokens = patches.transpose(1, 2).reshape(feats.shape[0], -1, h, w)
    if spec.embed == "cls+mean":  # Virchow2: CLS concatenated with the mean patch token
        g = torch.cat([feats[:, 0], patches.mean(1)], 1)
    else:  # the model's pooled pre-logits output (CLS for DINOv2-style models)
        g = model.forward_head(feats, pre_logits=True)
    return Features(global_=g, tokens=tokens)

class Teacher(NamedTuple):  # a frozen teacher as the run uses it, set up in one place: frozen_teacher
    model: nn.Module
    spec: Spec
    encode: Callable  # x -> its Features: encode, compiled under --compile (forward_features is not `forward`)
    flops: float      # forward FLOPs per image at --img-size, for the MFU

def frozen_teacher(cfg, model, spec, device):
    """Frozen (in no optimizer or checkpoint), in the autocast dtype on a GPU (no optimizer state), FLOPs counted."""
    model.eval().requires_grad_(False)
    if device.type == "cuda" and cfg.precision != "fp32":
        model.to(DTYPES[cfg.precision])
    run = functools.partial(torch.compile(encode) if cfg.compile == "on" else encode, model, spec)
    return Teacher(model=model, spec=spec, encode=run, flops=forward_flops(model, cfg.img_size))

def target(cfg, teachers, x):
    """What the student learns to predict: the teachers' mean Features, each run on --teacher-chunk images at a time."""
    outs = [[t.encode(c)._asdict() for c in x.split(cfg.teacher_chunk or len(x))] for t in teachers]  # [teacher][chunk]
    return Features(**{k: torch.stack([torch.cat([c[k] for c in o]) for o in outs]).mean(0) for k in outs[0][0]})

def projection(kind, d_in, d_out):
    """A projection head: linear, or an MLP (hidden 2x d_out) that absorbs the mismatch so the backbone need not."""
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    return nn.Sequential(nn.Linear(d_in, 2 * d_out), nn.GELU(), nn.Linear(2 * d_out, d_out))

class Student(nn.Module):
    """The trainable part: the student backbone (a timm model) + projection heads into the teacher's space (teacher: its
    Spec), the one module in the optimizer, DDP and checkpoint. A head exists if its loss weighs > 0 (global: always)"""
    def __init__(self, cfg, backbone, spec, teacher):
        super().__init__()
        self.backbone, self.spec, self.grid = backbone, spec, (cfg.img_size // teacher.patch,) * 2
        self.global_head = projection(cfg.head, spec.dim, teacher.dim)
        self.local_head = projection(cfg.head, spec.width, teacher.width) if loss_weights(cfg)["l_local"] > 0 else None
    def forward(self, x):
        """encode's Features with the heads applied (any other field passes through as it is)."""
        f, tokens = encode(self.backbone, self.spec, x), None
        if self.local_head is not None:
            B, _, h, w = f.tokens.shape
            tokens = self.local_head(f.tokens.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(B, -1, h, w)
            if (h, w) != self.grid:  # grids differ: resize the student's token map
                tokens = F.interpolate(tokens, size=self.grid, mode="bilinear", align_corners=False)
        return f._replace(global_=self.global_head(f.global_), tokens=tokens)

def build_student(cfg, teacher, backbone, spec_s, device):
    """The trainable Student at the resolved sizes; shapes checked once against the teacher (a Teacher), loudly."""
    if spec_s.patch and hasattr(backbone, "set_input_size"):
        backbone.set_input_size(img_size=cfg.student_img_size)
    student, spec_t = Student(cfg, backbone, spec_s, teacher.spec).to(device), teacher.spec
    if cfg.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    with torch.no_grad(), autocast(cfg, device):
        t = encode(teacher.model, spec_t, torch.rand(2, 3, cfg.img_size, cfg.img_size, device=device))
        s = student(torch.rand(2, 3, cfg.student_img_size, cfg.student_img_size, device=device))
    assert s.global_.shape == t.global_.shape, f"global shapes: {tuple(s.global_.shape)} vs {tuple(t.global_.shape)}"
    assert s.tokens is None or s.tokens.shape == t.tokens.shape, f"token maps: {s.tokens.shape} vs {t.tokens.shape}"
    n = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    print0(f"teacher {cfg.teacher} ({spec_t.source}): {n(teacher.model):.1f}M params, {cfg.img_size}px, "
           f"grid {student.grid[0]}x{student.grid[1]}, dim {spec_t.dim}")
    print0(f"student {cfg.student} ({spec_s.source}): {n(backbone):.1f}M params, {cfg.student_img_size}px, "
           f"patch {spec_s.patch or '-'}, dim {spec_s.dim}")
    return student

# ----------------------------------------------------------------------------- losses
# Every loss ends in a sum over the global batch (all_sum over ranks): each rank then holds the same loss, so a
# non-finite one skips the update on every rank alike, and with DDP's gradient averaging each step gets exactly the
# gradient of the global-batch loss, as one process would. A new term must end in all_sum too.
def all_sum(x):
    """Sum over ranks, differentiable: AllSum (plumbing) sums the gradients in backward too."""
    return AllSum.apply(x) if rank_world()[1] > 1 else x

def batchnorm(z, eps=1e-5):
    """BatchNorm1d(affine=False) in training mode over the global batch (synchronised across ranks)."""
    n = float(z.shape[0] * rank_world()[1])  # every rank holds as many rows (drop_last, a fixed batch size)
    mean = all_sum(z.sum(0)) / n
    var = all_sum(((z - mean) ** 2).sum(0)) / n
    return (z - mean) / torch.sqrt(var + eps)

PER_SAMPLE = {  # the other losses: a mean over samples (and tokens) of a per-sample distance
    "cosine": lambda s, t: 1 - F.cosine_similarity(s, t, dim=-1),
    "smoothl1": lambda s, t: F.smooth_l1_loss(s, t, reduction="none").mean(-1),
    "mse": lambda s, t: F.mse_loss(s, t, reduction="none").mean(-1),
    "cosine-smoothl1": lambda s, t: 0.9 * PER_SAMPLE["cosine"](s, t) + 0.1 * PER_SAMPLE["smoothl1"](s, t),  # RADIO
}

def pair_loss(kind, zs, zt, alpha=4.0):
    """Loss between [N, D] student and teacher features (fp32), over the global batch (all ranks)."""
    zs, zt = zs.float(), zt.float()
    if kind == "logsum":  # G2L / Miles & Mikolajczyk: log( sum_{b,j} |BN(W z_s) - BN(z_t)|^alpha ), one log
        return torch.log(all_sum((batchnorm(zs) - batchnorm(zt)).abs().pow(alpha).sum()))
    per_sample = PER_SAMPLE[kind](zs, zt)
    return all_sum(per_sample.sum()) / float(per_sample.numel() * rank_world()[1])  # as many on every rank

def loss_weights(cfg):
    """{term l_NAME: its weight, the config's w_NAME}; --local-loss none is weight 0 (no local head)."""
    w = {"l_" + f.name[2:]: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name.startswith("w_")}
    return dict(w, l_local=0.0 if cfg.local_loss == "none" else w["l_local"])

def loss_terms(cfg, s, t):
    """{term: value} between the student's and the teacher's Features."""
    tokens = lambda f: f.tokens.flatten(2).transpose(1, 2).flatten(0, 1)  # [B*h*w, C]
    terms = {"l_global": pair_loss(cfg.global_loss, s.global_, t.global_, cfg.alpha)}
    if s.tokens is not None:
        terms["l_local"] = pair_loss(cfg.local_loss, tokens(s), tokens(t), cfg.alpha)
    return terms

def linear_cka(a, b):
    """Linear CKA between feature matrices [N, D1], [N, D2] (Kornblith et al. 2019)."""
    a, b = a.double() - a.double().mean(0), b.double() - b.double().mean(0)
    return float((a.T @ b).norm() ** 2 / ((a.T @ a).norm() * (b.T @ b).norm()))

def centred_cosine(a, b):
    """Mean cosine after centring each side: raw cosine rewards predicting the teacher's mean vector."""
    return float(F.cosine_similarity(a - a.mean(0), b - b.mean(0), dim=1).mean())

# ----------------------------------------------------------------------------- the distillation step
def lr_factor(step, cfg):
    """Linear warm-up, then cosine decay to min_lr_frac (used for both lr and weight decay)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

def make_optimizer(cfg, student, device):
    """AdamW (fused on CUDA); each group carries its own lr and weight-decay multipliers (lr_mult, wd_mult), which
    distil_step's schedule applies: no weight decay on biases, norms, tokens and position embeddings."""
    groups = {}
    for n, p in student.named_parameters():
        groups.setdefault((1.0, float(p.ndim >= 2 and "pos_embed" not in n and "token" not in n)), []).append(p)
    opt = torch.optim.AdamW([dict(params=ps, lr_mult=lr, wd_mult=wd) for (lr, wd), ps in sorted(groups.items())[::-1]],
                            lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    return dict(opt=opt, scaler=torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16"))  # bf16: none

@dataclasses.dataclass
class Progress:
    """Where the run is, as the checkpoint keeps it."""
    step: int = 0
    samples: int = 0     # tiles drawn over all ranks: where a resumed sampler starts
    first: dict = dataclasses.field(default_factory=dict)  # the first logged loss and the figures before training

@dataclasses.dataclass(kw_only=True)
class Trainer:
    """What a step needs, and the run's state in one place: save_checkpoint, resume and export iterate over state()."""
    device: torch.device
    teachers: list          # Teacher (frozen_teacher): the target is their mean
    student: Student        # saved, evaluated and exported
    wrapped: nn.Module      # the same student under DDP and/or torch.compile: the step's forward and backward
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    progress: Progress = dataclasses.field(default_factory=Progress)
    extra: dict = dataclasses.field(default_factory=dict)  # an extension's state by name (an EMA); a Student: exported
    def state(self):
        return dict(student=self.student, optimizer=self.opt, scaler=self.scaler, **self.extra)
    def state_dict(self):  # ckpt.pt: each piece's state, the progress, torch's global RNG (init; the views have theirs)
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return dict({k: v.state_dict() for k, v in self.state().items()}, **dataclasses.asdict(self.progress),
                    rng=dict(torch=torch.get_rng_state(), cuda=cuda))
    def load_state_dict(self, sd):
        mults = [(g["lr_mult"], g["wd_mult"]) for g in self.opt.param_groups]  # the config's, not the checkpoint's
        for k, v in self.state().items():
            v.load_state_dict(sd[k])
        for i, g in enumerate(self.opt.param_groups):
            g["lr_mult"], g["wd_mult"] = mults[i]
        self.progress = Progress(**{f.name: sd[f.name] for f in dataclasses.fields(Progress)})
        torch.set_rng_state(sd["rng"]["torch"])
        if self.device.type == "cuda" and sd["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(sd["rng"]["cuda"], self.device)

def distil_step(cfg, tr, step, batches):
    """One optimizer step over --grad-accum micro-batches: views -> teacher -> student -> losses -> update.
    Returns ({term: value, "loss": total}, grad norm or None when the loss was not finite and the update skipped,
    tiles this rank skipped as unreadable)."""
    decay = lr_factor(step, cfg)
    for g in tr.opt.param_groups:  # lr and weight decay decay together, each group by its own multipliers
        g["lr"], g["weight_decay"] = cfg.lr * decay * g["lr_mult"], cfg.weight_decay * decay * g["wd_mult"]
    weights, logged, n_bad = loss_weights(cfg), {}, 0
    for micro in range(cfg.grad_accum):
        x, skipped = next(batches)
        n_bad += int((skipped > 0).sum())
        xt, xs = make_views(x, cfg, step, micro, tr.device)  # G2L: the same augmented view for both models
        xs = student_view(xs, cfg)
        last = rank_world()[1] == 1 or micro == cfg.grad_accum - 1
        sync = contextlib.nullcontext if last else tr.wrapped.no_sync  # DDP: all-reduce at the last micro-step only
        with autocast(cfg, tr.device), sync():
            with torch.no_grad():  # not inference_mode: these tensors enter the loss
                t = target(cfg, tr.teachers, xt)
            s = tr.wrapped(xs)
        terms = loss_terms(cfg, s, t)  # in fp32
        terms["loss"] = sum(weights[k] * v for k, v in terms.items())
        with sync():
            tr.scaler.scale(terms["loss"] / cfg.grad_accum).backward()
        for k, v in terms.items():
            logged[k] = logged.get(k, 0) + v.detach() / cfg.grad_accum
    tr.scaler.unscale_(tr.opt)
    gnorm = torch.nn.utils.clip_grad_norm_(tr.wrapped.parameters(), cfg.clip_grad or math.inf)
    # the step's one host sync: skipping a non-finite update needs the loss on the host; the grad norm comes along
    gnorm, *values = torch.stack([gnorm.float(), *logged.values()]).tolist()
    logged = dict(zip(logged, values))  # the same on every rank: the loss is global
    finite = math.isfinite(logged["loss"])
    if finite:  # else skip this update (the loop stops after three in a row)
        tr.scaler.step(tr.opt)
    tr.scaler.update()  # fp16: after a skipped step this ends its unscale_ and lowers the scale
    tr.opt.zero_grad(set_to_none=True)
    return logged, gnorm if finite else None, n_bad

# ----------------------------------------------------------------------------- the loop
def extract_features(loader, encoders, device, amp, desc=None):
    """Features of every tile a loader of uint8 tiles yields: one [N, D] fp32 CPU tensor per encoder (a function of
    the float [0,1] batch on the device), and per tile how many unreadable tiles TileDataset skipped to reach it."""
    outs, skipped = [[] for _ in encoders], []
    with torch.no_grad():
        for x, k in tqdm(loader, total=len(loader), desc=desc, disable=desc is None, **BAR):
            x = x.to(device, non_blocking=True).float() / 255  # CUDA: no stream sync per batch
            with amp():
                for out, fn in zip(outs, encoders):
                    out.append(fn(x).float().cpu())
            skipped.append(k)
    return [torch.cat(o) for o in outs], torch.cat(skipped)

def evaluate(cfg, tr, val):
    """Agreement on validation tiles: centred cosine and linear CKA of projected student vs teacher globals."""
    s = tr.student.eval()
    student = lambda x: s.global_head(encode(s.backbone, s.spec, student_view(x, cfg)).global_)  # no local head
    teacher = lambda x: torch.stack([encode(t.model, t.spec, x).global_ for t in tr.teachers]).mean(0)  # as target
    (zs, zt), _ = extract_features(val, [student, teacher], tr.device, lambda: autocast(cfg, tr.device))
    s.train()
    return dict(val_cos=round(centred_cosine(zs, zt), 4), val_cka=round(linear_cka(zs, zt), 4),
                val_cos_raw=round(float(F.cosine_similarity(zs, zt).mean()), 4))

def train_loop(cfg, tr, batches, val, metrics, stop):
    """Steps until --steps, a stop signal, G2L's early stop or too many bad steps/tiles: (reason, exit code, last)."""
    (rank, world), at = rank_world(), tr.progress
    tiles_per_step = cfg.batch_size * world * cfg.grad_accum  # all ranks' tiles
    n_bad = seen = 0  # unreadable tiles and tiles drawn, this session
    bad_steps = above = 0  # non-finite steps in a row; steps in a row above the running mean (--early-stop)
    recent, last, start = deque(maxlen=100), {}, at.step  # the last 100 losses; the last metrics row; resumed at
    if val is not None and at.step == 0:
        at.first = evaluate(cfg, tr, val)
        print0(f"step {at.step:06d} | val cos {at.first['val_cos']:.4f} (raw {at.first['val_cos_raw']:.4f}) | "
               f"cka {at.first['val_cka']:.4f}")
    speed = Speed(cfg, tr, tiles_per_step)
    # not on a terminal (disable=None) the log lines alone say where the run is: no bar redrawn after each of them
    with tqdm(total=cfg.steps, initial=at.step, disable=rank != 0 or None, desc="distil", **BAR) as bar:
        while at.step < cfg.steps:
            terms, gnorm, skipped = distil_step(cfg, tr, at.step, batches)
            at.samples, seen, n_bad = at.samples + tiles_per_step, seen + tiles_per_step, n_bad + skipped
            if gnorm is None:  # three non-finite losses in a row means the run has diverged
                bad_steps += 1
                print0(f"warning: non-finite loss at step {at.step} ({bad_steps} in a row); update skipped")
                if bad_steps == 3:
                    return "stopped: 3 non-finite losses in a row; the weights are the last finite ones " \
                        "(lower --lr?)", 1, last
                continue
            bad_steps, at.step = 0, at.step + 1
            speed.steps += 1
            bar.update(1)
            if cfg.early_stop:  # G2L's rule, read as: more than 10 steps in a row above the mean of the last 100
                above = above + 1 if len(recent) == 100 and terms["loss"] > sum(recent) / 100 else 0
                recent.append(terms["loss"])
                if above > 10:
                    return f"early stop at step {at.step}: loss above its last-100 running mean {above} steps " \
                        "in a row", 0, last
            evaluating = val is not None and (at.step % cfg.eval_every == 0 or at.step == cfg.steps)
            if at.step % cfg.log_every == 0 or at.step == cfg.steps or evaluating:
                bad = int(all_sum(torch.tensor(float(n_bad), device=tr.device)))
                if bad > cfg.max_bad_frac * seen and bad > 10:
                    return f"stopped: {bad} of {seen} tiles were unreadable (over --max-bad-frac); " \
                        "see the warnings", 1, last
                last = dict(step=at.step, **log_row(cfg, at.step, terms, gnorm, speed.measure(), bad)) | (
                    {"resumed_from": start} if start and not last else {})  # the curves mark a resume
                last.update(evaluate(cfg, tr, val) if evaluating else {})
                at.first.setdefault("loss", last["loss"])
                log(last, metrics)
                speed.restart()  # evaluation and logging are not training time
            if at.step % cfg.ckpt_every == 0 and at.step < cfg.steps:
                save_checkpoint(cfg, tr)
            if world > 1 and all_sum(torch.tensor(float(bool(stop)), device=tr.device)) > 0:
                stop.setdefault("by", signal.SIGTERM)  # signals reach ranks at different steps: stop together
            if stop:
                return f"stopped by {stop['by'].name} at step {at.step}; continue with --resume auto", \
                    128 + stop["by"], last
    return "done", 0, last

def log_row(cfg, step, terms, gnorm, speed, bad):
    """A metrics row: the total loss and each term (rounded), the step's base lr, grad norm, speed, bad tiles."""
    return dict({"loss": round(terms["loss"], 5)}, **{k: round(v, 5) for k, v in terms.items() if k != "loss"},
                lr=cfg.lr * lr_factor(step - 1, cfg), grad_norm=round(gnorm, 4), **speed, bad_tiles=bad)

def log(row, metrics):
    """One metrics.jsonl row and one log line (rank 0)."""
    if rank_world()[0] != 0:
        return
    metrics.write(json.dumps(row) + "\n")
    metrics.flush()
    terms = " ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith("l_"))
    tqdm.write(f"step {row['step']:06d} | loss {row['loss']:.4f} ({terms}) | lr {row['lr']:.2e} | "
               f"gnorm {row['grad_norm']:.2f} | {row['img_per_s']:.1f} img/s | mfu {pct(row['mfu'])} | "
               f"{row['mem_gb']:.2f} GB" + (f" | val cos {row['val_cos']:.4f} cka {row['val_cka']:.4f}"
                                            if "val_cos" in row else ""))

def summary(cfg, reason, first, last, out):
    parts = [f"{k.replace('_', ' ')} {first[k]:.4f} -> {last[k]:.4f}" for k in ("loss", "val_cos", "val_cka")
             if k in first and k in last]
    print0(" | ".join([reason, *parts, f"{last.get('img_per_s', 0):.1f} img/s", f"mfu {pct(last.get('mfu'))}",
                       f"bad tiles {last.get('bad_tiles', 0)}"]))
    if not cfg.synthetic:
        # the demo's hint must work as printed, offline: the student on the 200 labelled PCam tiles bundled in examples/
        labels = os.path.relpath(Path(__file__).resolve().parent / "examples" / "pcam" / "labels.csv")
        # eval.py runs the teacher with this run's size, kwargs and weights (from OUT/config.json)
        evaluate = (f"python eval.py probe --model {out} --data {labels} --out {out / 'eval'}" if cfg.demo else
                    f"python eval.py probe --model {shlex.quote(cfg.teacher)} --model {shlex.quote(str(out))} "
                    "--data LABELS.csv  # LABELS.csv: yours, with columns path,label")
        print0(f"student: {out / 'student'}  ->  timm.create_model('local-dir:{out / 'student'}', pretrained=True)\n"
               f"evaluate: {evaluate}\n"
               f"a real run: python g2l.py --teacher h-optimus-0 --student uni --data tiles/ --out runs/NAME")

# ----------------------------------------------------------------------------- main
def main(argv=None):
    """config -> data -> models -> optimizer -> resume -> loop -> checkpoint and export."""
    cfg = parse_args(argv)
    check_args(cfg)
    with run_lock(cfg) as end, contextlib.ExitStack() as cleanup:
        device = set_up(cfg)
        tiles, val_tiles = load_data(cfg)  # a bad --data fails before any model
        teacher, spec_t, backbone, spec_s, teacher_kwargs = load_models(cfg, device)
        cfg = final_config(cfg, device, spec_t, spec_s, len(tiles), teacher_kwargs)  # never changed after
        teachers = [frozen_teacher(cfg, teacher, spec_t, device)]
        student = build_student(cfg, teachers[0], backbone, spec_s, device)
        ddp = lambda m: nn.parallel.DistributedDataParallel(m, device_ids=[device] if device.type == "cuda" else None)
        wrapped = ddp(student) if rank_world()[1] > 1 else student  # the student only: the teacher has no gradients
        tr = Trainer(device=device, teachers=teachers, student=student, **make_optimizer(cfg, student, device),
                     wrapped=torch.compile(wrapped) if cfg.compile == "on" else wrapped)
        resume(cfg, tr)
        end["at"] = tr.progress  # the run started: run_lock writes how it ends
        metrics = start_run_folder(cfg, spec_t, spec_s, len(tiles), len(val_tiles), tr.progress.step)
        stop, handlers = catch_stop_signals()  # SIGINT / SIGTERM: finish the step, save, export, exit cleanly
        batches = make_batches(cfg, tiles, tr.progress.samples, device)
        # its workers ignore SIGTERM (quiet_worker), so a terminate() at exit would not end them: stop them ourselves
        cleanup.callback(getattr(batches, "_shutdown_workers", lambda: None))
        val = None if rank_world()[0] != 0 or not val_tiles else torch.utils.data.DataLoader(
            TileDataset(val_tiles, cfg.img_size), batch_size=cfg.batch_size, num_workers=min(cfg.workers, 2),
            worker_init_fn=quiet_worker, pin_memory=device.type == "cuda")
        reason, code, last = end["ending"] = train_loop(cfg, tr, batches, val, metrics, stop)
        save_checkpoint(cfg, tr)
        if rank_world()[0] == 0:
            metrics.close()
            if not cfg.synthetic:
                export(cfg, tr.state())
        for s, h in handlers.items():  # only now: a signal during the last save or export must not cut it short
            signal.signal(s, h)
        if dist.is_initialized():
            dist.barrier()
            cleanup.callback(dist.destroy_process_group)  # after the summary: print0 asks torch.distributed its rank
        summary(cfg, reason, tr.progress.first, last, Path(cfg.out))
        if code:  # the job was not done: a scheduler or script must see it (after saving and exporting)
            raise SystemExit(code)
        return last

def set_up(cfg):
    """One process, or one per GPU under torchrun (NCCL on GPU, gloo on CPU), and seeds: the device."""
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(cfg.seed)
    return device

# ============================================================================= plumbing: skip on a first read
class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # the docstring as written, and a default only where there is one to show
        none = action.default in (None, "", []) or "default:" in (action.help or "")
        return action.help if none else super()._get_help_string(action)

# ----------------------------------------------------------------------------- tile listing at scale
MANIFEST = "tiles.csv"  # prep_tiles.py lists every tile it wrote here: a folder with one is read, never walked

def group_tiles(pairs):
    """Tiles from (folder, file name) pairs, in their order: one slide per folder."""
    dirs, pairs = {}, list(pairs)
    slide = np.array([dirs.setdefault(d, len(dirs)) for d, _ in pairs], dtype=np.int32)
    names = np.array([os.fsencode(n) for _, n in pairs], dtype="S")
    return Tiles(np.array([os.fsencode(d) for d in dirs], dtype="S"), slide, names)

def concat_tiles(parts):
    off = np.cumsum([0] + [len(t.dirs) for t in parts])
    return Tiles(np.concatenate([t.dirs for t in parts]), np.concatenate([t.slide + o for t, o in zip(parts, off)]),
                 np.concatenate([t.names for t in parts]))

def walk_images(folder):
    """[(folder, image name)] relative to `folder`, entering each real folder once (symlinks followed, no loops); not
    .hidden entries nor prep_tiles.py's QC pictures (a masks/ beside its slides.csv or tiles.csv), wherever they are."""
    pairs, seen = [], set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        rel = os.path.relpath(top, folder) if top != folder else ""
        dirs[:] = [d for d in dirs if d[0] != "." and (d != "masks" or {MANIFEST, "slides.csv"}.isdisjoint(files))]
        pairs += [(rel, n) for n in files if not n.startswith(".") and n.lower().endswith(IMG_EXTS)]
    return pairs

def read_manifest(path):
    """(folder, file name) pairs relative to the CSV's folder, from its path column (tiles.csv, a labels CSV)."""
    try:
        with open(path, newline="") as f:
            rows = csv.reader(f)
            col = [c.strip() for c in next(rows, [])].index("path")  # ValueError: no path column
            return [os.path.split(r[col].strip()) for r in rows]
    except (UnicodeDecodeError, csv.Error, ValueError, IndexError) as e:
        raise UsageError(f"error: --data {path} is neither a tile folder nor a CSV with a 'path' column "
                         f"({one_line(e, 80)}); give folders of tiles or such a CSV (paths relative to it)")

def index_folder(folder):
    """One --data folder: its manifest (written by prep_tiles.py) if it has one, else a walk; or a CSV."""
    if not os.path.exists(folder):
        raise UsageError(f"error: data folder {folder} does not exist; pass --data with folders of tiles "
                         "(e.g. the --out of prep_tiles.py), or add --demo to use the bundled demo tiles")
    csv_file = folder if os.path.isfile(folder) else os.path.join(folder, MANIFEST)
    tiles = group_tiles(sorted(read_manifest(csv_file) if os.path.isfile(csv_file) else walk_images(folder)))
    folder = os.path.dirname(csv_file)  # the tiles' paths are relative to the CSV
    if not len(tiles):
        raise UsageError(f"error: no images ({', '.join(IMG_EXTS)}) under {folder}; "
                         "make tiles with: python prep_tiles.py SLIDES --out " + folder)
    dirs = np.array([os.fsencode(os.path.join(folder, os.fsdecode(d))) for d in tiles.dirs], dtype="S")
    return Tiles(dirs, tiles.slide, tiles.names)

# ----------------------------------------------------------------------------- weight files and the DINOv2 conversion
HF_DINOV2 = [  # transformers DINOv2 key -> timm ViT key (legacy names as on the hub, and newer ones); mask_token and
    # register_tokens keep the original DINOv2 names, which timm's own converter handles (see dinov2_to_timm)
    (r"^(dinov2\w*|model)\.", ""), (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^embeddings\.position_embeddings", "pos_embed"), (r"^embeddings\.", ""), (r"^encoder\.layer\.", "blocks."),
    (r"attention\.attention\.query|attention\.q_proj", "attn.query"),
    (r"attention\.attention\.key|attention\.k_proj", "attn.key"),
    (r"attention\.attention\.value|attention\.v_proj", "attn.value"),
    (r"attention\.output\.dense|attention\.o_proj", "attn.proj"), (r"layer_scale(\d)\.lambda1", r"ls\1.gamma"),
    (r"mlp\.weights_in", "mlp.fc1"), (r"mlp\.weights_out|mlp\.down_proj", "mlp.fc2"), (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),  # a task head: dropped with timm's
]

def dinov2_to_timm(sd):
    """transformers DINOv2 state dict -> timm ViT's, less what timm's checkpoint_filter_fn then converts from the
    original DINOv2 layout (it drops mask_token and, with registers, folds the CLS position into the CLS token)."""
    out = {functools.reduce(lambda k, rule: re.sub(*rule, k), HF_DINOV2, k): v for k, v in sd.items()}  # rules in turn
    for k in [k for k in out if re.search(r"attn\.query\.(weight|bias)$", k)]:  # timm packs q, k, v in one Linear
        out[k.replace("query", "qkv")] = torch.cat([out.pop(k.replace("query", x)) for x in ("query", "key", "value")])
    for k in [k for k in out if re.search(r"mlp\.gate_proj\.(weight|bias)$", k)]:  # SwiGLU, newer transformers
        out[k.replace("gate_proj", "fc1")] = torch.cat([out.pop(k), out.pop(k.replace("gate_proj", "up_proj"))])
    return out

def load_weights(model, path, name):
    """Weights from .safetensors / .pth / .bin (timm unwraps state_dict/model and DDP/compile prefixes), converted
    from transformers' DINOv2 or timm's older ViT layouts, loaded strictly."""
    try:  # (a missing file stopped in check_model)
        sd = timm.models.load_state_dict(path)
    except Exception as e:  # a truncated or foreign file: one line, not a traceback
        raise SystemExit(f"error: cannot read weights file {path} ({one_line(e)}); "
                         "expected .safetensors, .pth or .bin holding a state dict (re-download it if it is truncated)")
    how = {}
    if any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in sd):  # transformers DINOv2 format
        sd = dinov2_to_timm(sd)
        how = dict(antialias="register_tokens" in sd)  # resample positions as transformers does (antialias: registers)
    try:
        if isinstance(model, VisionTransformer):  # timm's ViT converter: resamples position embeddings, legacy keys
            sd = checkpoint_filter_fn(sd, model, **how)
        model.load_state_dict({k: v for k, v in sd.items() if not k.startswith("head.")})  # classifier: unused
    except (RuntimeError, ValueError, KeyError, IndexError) as e:
        raise SystemExit(f"error: weights file {path} does not fit {name} ({one_line(e, 400)}); "
                         "pass the matching architecture/preset or fix --*-kwargs")

def offline_help(info):
    return (f"Offline: set HF_HUB_OFFLINE=1 (cached weights then load at once), or pass local weights for "
            f"architecture {info['arch']} (g2l.py --teacher-weights/--student-weights FILE, eval.py --model-weights "
            "FILE) or a local-dir:PATH. Gated model: accept its terms on huggingface.co and run `hf auth login`.")

def hf_file(where, fname):
    """Path of FILE in a Hugging Face checkpoint (a local folder, or hf-hub:ORG/NAME via the hub cache), or None."""
    if not where.startswith("hf-hub:"):
        return str(Path(where) / fname) if (Path(where) / fname).is_file() else None
    from huggingface_hub import hf_hub_download
    with contextlib.suppress(Exception):  # missing, offline, gated: None, and the caller says what to do
        return hf_hub_download(where.removeprefix("hf-hub:"), fname)

def dinov2_spec(where):
    """A transformers-format DINOv2 checkpoint (local folder or hf-hub:ORG/NAME) -> the spec of the matching timm
    ViT, from its config.json (field names of transformers' Dinov2Config / Dinov2WithRegistersConfig); else None."""
    path = hf_file(where, "config.json")
    c = json.loads(Path(path).read_text()) if path else {}
    if "dinov2" not in (str(c.get("model_type")) + str(c.get("architectures"))).lower() or "hidden_size" not in c:
        return None
    if c.get("layer_norm_eps", 1e-6) != 1e-6 or (c.get("hidden_act", "gelu") != "gelu" and not c.get("use_swiglu_ffn")):
        raise SystemExit(f"error: {where}/config.json: layer_norm_eps {c.get('layer_norm_eps')} / hidden_act "
                         f"{c.get('hidden_act')!r} not supported (g2l converts DINOv2 with eps 1e-6, GELU or SwiGLU)")
    one = lambda v: v[0] if isinstance(v, (list, tuple)) else v  # sizes may be given as [h, w]
    dim, ratio, reg = c["hidden_size"], c.get("mlp_ratio", 4), c.get("num_register_tokens", 0)
    kw = dict(img_size=one(c.get("image_size", 224)), patch_size=one(c.get("patch_size", 14)), embed_dim=dim,
              depth=c["num_hidden_layers"], num_heads=c["num_attention_heads"], mlp_ratio=ratio,
              init_values=c.get("layerscale_value", 1.0), qkv_bias=c.get("qkv_bias", True),
              reg_tokens=reg, no_embed_class=reg > 0)  # registers: positions for the patches only (as timm's DINOv2)
    if c.get("use_swiglu_ffn"):
        kw.update(swiglu(dim, ratio))
    pre = hf_file(where, "preprocessor_config.json")  # the checkpoint's own normalisation
    pre = json.loads(Path(pre).read_text()) if pre else {}
    return dict(hf=where, arch="vit_base_patch14_dinov2", kwargs=kw, embed="pool",
                mean=tuple(pre.get("image_mean", IMAGENET["mean"])), std=tuple(pre.get("image_std", IMAGENET["std"])))

# ----------------------------------------------------------------------------- checkpoint I/O
@contextlib.contextmanager
def atomic_open(path, mode="w", **kw):
    """open() for writing, to path.tmp, renamed over path once the block is done: a reader never sees half a file."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, mode, **kw) as f:
            yield f
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # a failed write leaves no temp file behind
            os.remove(tmp)

def save_checkpoint(cfg, tr):
    """ckpt.pt: Trainer.state_dict() and the config, whole or not at all (temp file, fsync, rename); not --synthetic."""
    if rank_world()[0] != 0 or cfg.synthetic:
        return
    path = Path(cfg.out) / "ckpt.pt"
    try:
        with atomic_open(path, "wb") as f:
            torch.save(dict(tr.state_dict(), config=dataclasses.asdict(cfg)), f)
            f.flush()
            os.fsync(f.fileno())
        for name in ("config.json", "metrics.jsonl"):  # held back by start_run_folder over an earlier run
            if (path.parent / f"{name}.new").exists():
                os.replace(path.parent / f"{name}.new", path.parent / name)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        raise SystemExit(f"error: cannot write {path} ({one_line(e)}); free space or fix the folder's permissions, "
                         "then --resume auto (the last good copy is kept)")

def resume(cfg, tr):
    """The trainer's state (Trainer.load_state_dict); the data position and augmentations follow from the step."""
    path = Path(cfg.out) / "ckpt.pt" if cfg.resume in ("auto", "") else Path(cfg.resume)
    if not (cfg.resume and path.is_file()):  # (a --resume PATH that does not exist stopped in check_args)
        if holds_run(cfg.out):  # --overwrite (or the demo): never a silent loss
            print0(f"note: starting over in {cfg.out}: the run there is replaced at the first checkpoint")
        return
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        step = ck["step"]  # KeyError, TypeError: not a g2l checkpoint
    except Exception as e:  # truncated, not a zip, unpicklable, something else
        raise SystemExit(f"error: checkpoint {path} cannot be read as a g2l checkpoint ({one_line(e)}); resume from an "
                         f"earlier copy (--resume PATH), or move {path} away to start afresh")
    check_same_run(cfg, ck.get("config", {}), path, step)
    try:
        tr.load_state_dict(ck)
    except (KeyError, RuntimeError, ValueError) as e:
        raise SystemExit(f"error: checkpoint {path} does not fit this run's models ({one_line(e)}); resume "
                         "with the --teacher/--student/--*-kwargs/--local-loss it was made with, or use a new --out")
    print0(f"resumed from {path} at step {tr.progress.step}")

# what a resume may not change, or it would be another run (the first five as given, the others derived)
SAME_RUN = "teacher student teacher_weights student_weights student_kwargs teacher_kwargs img_size student_img_size " \
           "load_size"

def check_model(name, weights, flag):
    """A model name that resolves and a weights file that exists, or an argument error (no model is built)."""
    resolve(name)
    if weights not in ("", "random") and not os.path.isfile(weights):
        raise UsageError(f"error: {flag} {weights} does not exist; pass a .safetensors/.pth/.bin file of {name}")

def check_names(cfg):
    """The models and weight files named; --resume PATH exists, and its checkpoint names the same models."""
    for role in ("teacher", "student"):
        check_model(getattr(cfg, role), getattr(cfg, role + "_weights"), f"--{role}-weights")
    path = Path(cfg.out) / "ckpt.pt" if cfg.resume == "auto" else Path(cfg.resume)
    if cfg.resume not in ("", "auto") and not path.is_file():
        raise UsageError(f"error: --resume {cfg.resume}: no such checkpoint; pass a ckpt.pt, auto, or nothing")
    with contextlib.suppress(Exception):  # cheap: mmap reads no tensor (and one that cannot be read: resume says so)
        check_same_run(cfg, torch.load(path, map_location="cpu", weights_only=False, mmap=True)["config"], path)

def check_same_run(cfg, saved, path, step=None):
    """A resume continues its checkpoint's run (saved: its config): other models or sizes are refused (step None, before
    any model is built: the names as given), a finished run is left as it is, a changed setting is said."""
    bad = [k for k in SAME_RUN.split()[:5 if step is None else None] if k in saved and saved[k] != getattr(cfg, k)]
    if bad:
        raise UsageError(f"error: --{bad[0].replace('_', '-')} {getattr(cfg, bad[0])!r}, but {path} was made with "
                         f"{saved[bad[0]]!r}: resume with that, or start over with --overwrite (or another --out)")
    if step is not None and step >= cfg.steps:
        print0(f"{cfg.out}: the run is finished (step {step} of {cfg.steps}); nothing to do (--steps N trains on)")
        raise SystemExit(0)
    old = dataclasses.replace(cfg, **{k: v for k, v in saved.items() if k in Config.__dataclass_fields__})
    changed = [f"{k} {getattr(old, k)} -> {v}" for k, v in vars(cfg).items() if v != getattr(old, k) and k not in
               ("resume", "overwrite", "out")]
    if step is not None and changed:
        print0(f"note: resuming with {', '.join(changed)}: the schedule now ends at step {cfg.steps}, and the lr "
               f"at step {step} is {cfg.lr * lr_factor(step, cfg):.2g} (was {old.lr * lr_factor(step, old):.2g})")

def open_metrics(path, step):
    """metrics.jsonl for appending; a resumed run keeps the rows up to its checkpoint, rewritten atomically
    (a kill at any moment leaves the old file or the new one), and skips lines it cannot parse."""
    keep, bad = [], 0
    for line in (path.read_text().splitlines() if step and path.exists() else []):
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            bad += 1
    if bad:
        print0(f"warning: {path}: skipped {bad} line(s) that are not metrics rows (a damaged file?)")
    with atomic_open(path) as f:
        f.write("".join(keep))
    return open(path, "a")

def start_run_folder(cfg, spec_t, spec_s, n_train, n_val, step):
    """config.json (every resolved option) and metrics.jsonl, opened for appending (rank 0 only)."""
    if rank_world()[0] != 0:
        return None
    out = Path(cfg.out)  # made by run_lock
    for name in ("config.json.new", "metrics.jsonl.new", "status.json.new"):  # left by an --overwrite run stopped
        (out / name).unlink(missing_ok=True)  # before its first checkpoint
    # over an earlier run (--overwrite), its config and metrics stay until the first checkpoint renames these over them
    new = ".new" if not step and holds_run(out) else ""
    conf = dict(dataclasses.asdict(cfg), world_size=rank_world()[1], torch=torch.__version__, timm=timm.__version__,
                teacher_source=spec_t.source, student_source=spec_s.source, n_train=n_train, n_val=n_val)
    with atomic_open(out / f"config.json{new}") as f:
        f.write(json.dumps(conf, indent=2))
    print0(f"config: {out / 'config.json'} | {n_train} train, {n_val} validation tiles | {cfg.steps} steps")
    return open_metrics(out / f"metrics.jsonl{new}", step)

def timm_args(model, spec):
    """(architecture, model_args) that plain timm rebuilds from JSON. A layer class cannot go in JSON, so a SwiGLU
    student is written as timm's SwiGLU ViT (vit_giant_patch14_dinov2) with its own shape spelled out."""
    kw = dict(spec.kwargs)
    if kw.pop("mlp_layer", None) != "swiglu_packed":
        return spec.arch, spec.kwargs
    kw.pop("act_layer", None)  # SiLU, from the entrypoint
    b = model.blocks[0]
    return "vit_giant_patch14_dinov2", dict(
        kw, img_size=model.patch_embed.img_size[0], patch_size=model.patch_embed.patch_size[0],
        embed_dim=model.embed_dim, depth=len(model.blocks),
        num_heads=b.attn.num_heads, mlp_ratio=(b.mlp.fc1.out_features + 0.5) / model.embed_dim,
        init_values=None if isinstance(b.ls1, nn.Identity) else kw.get("init_values") or 1e-5,  # weights follow
        qkv_bias=b.attn.qkv.bias is not None, class_token=model.cls_token is not None,
        reg_tokens=model.num_reg_tokens, no_embed_class=model.no_embed_class, global_pool=model.global_pool)

def export(cfg, state):
    """Each Student of Trainer.state() as student/, a timm local-dir (config.json + model.safetensors), and its heads:
    the student's in OUT, another's (an EMA) in OUT/NAME. Atomic: a full disk gives one line, the last good is kept."""
    from safetensors.torch import save
    for name, student in ((n, s) for n, s in state.items() if isinstance(s, Student)):
        spec, out, size = student.spec, Path(cfg.out, "" if name == "student" else name), cfg.student_img_size
        sd = {k: v.detach().float().cpu().contiguous() for k, v in student.state_dict().items()}
        arch, args = timm_args(student.backbone, spec)
        conf = dict(architecture=arch, num_classes=0, num_features=spec.width,
                    model_args={**args, **({"img_size": size} if spec.patch else {})},
                    pretrained_cfg=dict(mean=list(spec.mean), std=list(spec.std), num_classes=0,
                                        input_size=[3, size, size], crop_pct=1.0, interpolation="bilinear"),
                    g2l=dict(embed=spec.embed, teacher=cfg.teacher, student=cfg.student, start=spec.source,
                             licence="a distilled student inherits its teacher's licence terms"))
        link = out / "student"  # a link to student.a or student.b: one rename switches it, where a folder takes two
        try:
            if link.is_dir() and not link.is_symlink():  # an earlier g2l's folder (the one rename with a gap)
                os.replace(link, out / "student.b")
            new = out / ("student.b" if link.is_symlink() and os.readlink(link) == "student.a" else "student.a")
            new.mkdir(parents=True, exist_ok=True)  # what a killed export left there is overwritten
            backbone = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
            (new / "model.safetensors").write_bytes(save(backbone))  # not save_file: mode 600, ignoring the umask
            (new / "config.json").write_text(json.dumps(conf, indent=2))
            (out / "student.next").unlink(missing_ok=True)
            (out / "student.next").symlink_to(new.name)
            os.replace(out / "student.next", link)  # a kill at any instant leaves the old copy or the new
            for p in map(out.joinpath, ("student.a", "student.b", "student.old", "student.tmp")):  # the copy before,
                if p != new and p.exists():  # and what a killed export left (here, or an earlier g2l's)
                    shutil.rmtree(p)
            with atomic_open(out / "heads.safetensors", "wb") as f:
                f.write(save({k: v for k, v in sd.items() if not k.startswith("backbone.")}))
        except OSError as e:
            raise SystemExit(f"error: cannot write {link} ({one_line(e)}); free space or fix the folder's "
                             "permissions, then --resume auto (the last good copy is kept)")

# ----------------------------------------------------------------------------- the run lock, signals, collectives
class AllSum(torch.autograd.Function):  # all_sum: every rank's loss holds every rank's x, so x's gradient is their sum
    # over a copy (autograd's inputs and gradients are never changed in place); all_reduce returns None
    forward = backward = staticmethod(lambda ctx, x: dist.all_reduce(y := x.clone()) or y)

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}

def write_status(out, end):
    """OUT/status.json, how the run ended (main's ending, or an error): reason, step, exit status, how to go on."""
    e, (reason, code, _) = end.get("error"), end.get("ending", (None, 0, None))
    said = getattr(e, "code", None)  # SystemExit's exit status or message
    if e is not None and said != code:  # an error, not main's own exit
        code = said if isinstance(said, int) else 130 if isinstance(e, KeyboardInterrupt) else 1
        reason = said if isinstance(said, str) else one_line(e)
    world = os.environ.get("WORLD_SIZE", "1")  # (torch.distributed is closed by now) a last --resume wins
    launcher = "python" if world == "1" else f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', world)}"
    again = f"{launcher} {shlex.join(sys.argv).removesuffix(' --resume auto')} --resume auto" if code else None
    held = (out / "config.json.new").exists()  # an --overwrite run before its first checkpoint: the old run's stays
    with atomic_open(out / f"status.json{'.new' * held}") as f:
        f.write(json.dumps(dict(reason=reason, step=end["at"].step, exit_status=code, continue_with=again), indent=2))

# a bar that is not on a terminal (a log file, a pipe) redraws at most every 30 s, not ten times a second
BAR = dict(dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30)

def quiet_worker(_):
    """DataLoader workers ignore SIGINT/SIGTERM sent to the group: the main process stops them after saving."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)

def catch_stop_signals():
    """({"by": the signal} once one came, the previous handlers): the loop stops at the end of its step."""
    stop = {}
    handlers = {s: signal.signal(s, lambda sig, frame: stop.setdefault("by", signal.Signals(sig)))
                for s in STOP_SIGNALS}
    return stop, handlers

@contextlib.contextmanager
def run_lock(cfg):
    """One run per --out at a time, or checkpoints, config and metrics would mix: rank 0 holds an flock, which dies
    with the process (a killed run blocks no one). A folder it made and nothing wrote to (a failed start) goes again."""
    end = {}  # main's: the Progress once the run started, and how the loop ended
    if int(os.environ.get("RANK", 0)) != 0:
        yield end
        return
    out, made = Path(cfg.out), not Path(cfg.out).exists()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"error: --out {cfg.out} is in use by another running g2l.py; wait for it, stop it, "
                             "or give another --out")
        except OSError as e:  # a file system without flock (Lustre mounted without it): the run goes on unlocked
            print(f"note: cannot lock {cfg.out} ({e.strerror}); make sure no other run uses this --out", flush=True)
        try:
            yield end
        except BaseException as e:
            end["error"] = e
            raise
        finally:
            if "at" in end:  # the run started
                write_status(out, end)
            if made and [p.name for p in out.iterdir()] == [".lock"]:
                shutil.rmtree(out, ignore_errors=True)

# ----------------------------------------------------------------------------- speed accounting
# dense TFLOPS (bf16/fp16 tensor cores, TF32) of the SXM parts, from NVIDIA's datasheets
PEAK_TFLOPS = {"H200": (989, 494), "H100": (989, 494), "B200": (2250, 1100), "A100": (312, 156), "L40S": (362, 183),
               "A6000": (155, 77)}

def peak_flops(device, precision):
    """Peak FLOP/s of the device; NaN (MFU n/a, rather than a wrong one) on CPU, for a GPU not in the table, and
    for the slower PCIe / NVL parts. A key must be a whole word of the name: an "NVIDIA L40" is no L40S."""
    words = set(re.split(r"[^A-Z0-9]+", torch.cuda.get_device_name(device).upper())) if device.type == "cuda" else set()
    peak = [PEAK_TFLOPS[w] for w in words & PEAK_TFLOPS.keys() if not {"PCIE", "NVL"} & words]
    return peak[0][precision not in ("bf16", "fp16")] * 1e12 if peak else float("nan")

def peak_memory_gb(device):
    """Peak memory of this process: allocated on the GPU, or the peak RSS on CPU (ru_maxrss is in KB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6

def pct(v):
    return "n/a" if v is None else f"{v:.1f}%"

def forward_flops(model, img):
    """Forward FLOPs per image at img px: 2 x tokens x (linear weights) + attention (QK^T and AV) + the patch
    embedding; NaN for a model without patch tokens."""
    if not hasattr(model, "patch_embed"):
        return float("nan")
    patches = (img // model.patch_embed.patch_size[0]) ** 2
    tokens = patches + model.num_prefix_tokens
    lin = sum(m.weight.numel() for m in model.blocks.modules() if isinstance(m, nn.Linear))
    attn = 4 * len(model.blocks) * tokens ** 2 * model.embed_dim
    return 2 * tokens * lin + attn + 2 * model.patch_embed.proj.weight.numel() * patches

CONSTANTS = {}
def constant(values, device):
    """A small fp32 constant on the device, made once: on CUDA each torch.tensor(..., device=) is a copy that waits
    for the stream. A compiled graph holds its constants itself, so there it is made in the graph."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, device=device)
    if (values, device) not in CONSTANTS:
        CONSTANTS[values, device] = torch.tensor(values, device=device)
    return CONSTANTS[values, device]

def to_device(p, device):
    """The draws on the device in one pinned, non-blocking copy (fp32 holds the flags exactly), but the blur mask,
    which stays on the host: colour_blur takes its indices, and on the device that would be a sync."""
    moved = {k: v for k, v in p.items() if k != "blur"}
    if torch.device(device).type != "cuda":
        return dict({k: v.to(device) for k, v in moved.items()}, blur=p["blur"])  # a no-op on the CPU
    flat = torch.cat([v.float().flatten() for v in moved.values()]).pin_memory().to(device, non_blocking=True)
    parts = flat.split([v.numel() for v in moved.values()])
    return dict({k: part.view(v.shape).to(v.dtype) for (k, v), part in zip(moved.items(), parts)}, blur=p["blur"])

class Speed:
    """Images/s, MFU and peak memory over the steps since the last restart()."""
    def __init__(self, cfg, tr, tiles_per_step):
        student = forward_flops(tr.student.backbone, cfg.student_img_size)  # forward + backward = 3 forwards
        self.flops = (sum(t.flops for t in tr.teachers) + 3 * student) * tiles_per_step  # every teacher's forward
        self.peak = peak_flops(tr.device, cfg.precision) * rank_world()[1]
        self.device, self.tiles_per_step = tr.device, tiles_per_step
        if tr.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(tr.device)
        self.restart()
    def restart(self):
        self.steps, self.t0 = 0, time.perf_counter()
    def measure(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - self.t0
        mfu = 100 * (self.flops * self.steps / dt) / self.peak  # NaN: the peak or the FLOP count is unknown
        return dict(img_per_s=round(self.steps * self.tiles_per_step / dt, 2),
                    mfu=round(mfu, 2) if math.isfinite(mfu) else None, mem_gb=round(peak_memory_gb(self.device), 2))

class Unbroken:
    """stdout/stderr whose writes never fail: once the reader is gone (a `tee` killed with the job), the stream is
    pointed at /dev/null, as Python's docs advise for SIGPIPE, and the run goes on, saves and exits as usual."""
    def __init__(self, stream):
        self.stream = stream
    def __getattr__(self, name):
        return getattr(self.stream, name)
    def write(self, text):
        return self.quiet(self.stream.write, text) or len(text)
    def flush(self):
        self.quiet(self.stream.flush)
    def quiet(self, fn, *a):
        try:
            return fn(*a)
        except OSError:  # EPIPE, or EIO from a closed terminal
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())

if __name__ == "__main__":
    sys.stdout, sys.stderr = Unbroken(sys.stdout), Unbroken(sys.stderr)
    warnings.showwarning = lambda msg, kind, path, lineno, file=None, line=None: tqdm.write(  # above the progress bar
        warnings.formatwarning(msg, kind, path, lineno, line).rstrip(), file=sys.stderr)
    try:
        main()
    except UsageError as e:  # the one line without a traceback, and argparse's exit status
        print(e, file=sys.stderr)
        sys.exit(2)
