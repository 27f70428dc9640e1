"""g2l.py: distil a frozen giga-scale pathology ViT (teacher) into a smaller student, in one file.

Recipe: G2L (Cho et al., arXiv 2510.11176): teacher and student see the same augmented tile, a
projection head maps the student's global feature into the teacher's space, and the loss is the
log-sum of |BN(student) - BN(teacher)|^4 (Miles & Mikolajczyk, AAAI 2024). g2l adds an optional
local loss on patch tokens (RADIO / GPFM style: 0.9 cosine + 0.1 smooth-L1).

    python g2l.py                                    # demo: bundled CC0 tiles, small ViTs, < 5 min on CPU
    python g2l.py --demo --steps 5                   # the demo's settings, any option changed
    python g2l.py --teacher h-optimus-0 --student uni --data tiles/ --out runs/luad
    python g2l.py --teacher h-optimus-0 --student hibou-l --w-local 0 --data tiles/   # the paper's pair and loss
    torchrun --standalone --nproc_per_node=8 g2l.py --teacher h-optimus-0 --student uni --data tiles/
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        g2l.py --teacher h-optimus-0 --student uni --data tiles/       # run the same line on both nodes
    python g2l.py --teacher h-optimus-0 --teacher-weights h0.safetensors \\
        --student vit_large_patch16_224 --data tiles/                  # offline weights
    python g2l.py --synthetic --steps 20 ...         # step speed without I/O (loader speed: eval.py bench-data)

The student lands in OUT/student/ as a timm local-dir:
    timm.create_model("local-dir:runs/NAME/student", pretrained=True)
"""
import argparse, contextlib, csv, dataclasses, functools, gc, inspect, json, math, os, random, re, resource, shutil
import errno, fcntl, hashlib, signal, socket, sys, time, types
from collections import deque
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import timm
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)  # frozen: derived values come from resolve_config, never by assignment
class Config:
    teacher: str = "h-optimus-0"        # preset, timm name, hf-hub:ORG/NAME, local-dir:PATH or a g2l run folder
    student: str = "uni"                # the same naming rules as --teacher
    teacher_weights: str = ""           # local .safetensors/.pth/.bin for the teacher's architecture ("random": none)
    student_weights: str = ""           # local weights for the student's architecture ("random": random init)
    teacher_kwargs: str = ""            # JSON architecture kwargs, e.g. '{"depth": 2}'
    student_kwargs: str = ""            # JSON architecture kwargs for the student
    data: list = dataclasses.field(default_factory=lambda: ["tiles"])  # tile folders (recursive; parent folder = slide)
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
    global_loss: str = "logsum"         # logsum | cosine | smoothl1 | mse
    local_loss: str = "cosine-smoothl1" # cosine-smoothl1 | logsum | mse | none
    w_global: float = 1.0               # weight of the global loss
    w_local: float = 1.0                # weight of the local loss (0 = the paper's global-only recipe)
    alpha: float = 4.0                  # exponent of the logsum loss
    head: str = "linear"                # linear | mlp (Linear-GELU-Linear): the projection heads, dropped at export
    augment: bool = True                # the paper's flips, colour jitter and blur
    views: str = "same"                 # same | independent (independent colour/blur per model; same crop and flips)
    precision: str = "auto"             # auto | bf16 | fp16 | fp32
    compile: str = "auto"               # auto (on for CUDA) | on | off
    grad_checkpointing: bool = False    # recompute the student's activations in backward (memory)
    teacher_chunk: int = 0              # teacher forward in micro-batches of this size (memory)
    workers: int = 4                    # DataLoader processes decoding tiles
    seed: int = 0                       # data order, augmentations and init
    log_every: int = 10                 # steps between log lines / metrics.jsonl rows
    eval_every: int = 100               # steps between validation agreement checks
    ckpt_every: int = 500               # steps between checkpoints (and one at the end)
    resume: str = ""                    # "" | auto | path to ckpt.pt
    early_stop: bool = False            # G2L: stop when loss > mean of last 100 steps more than 10 times in a row
    max_bad_frac: float = 0.01          # stop when more than this fraction of tiles cannot be read
    synthetic: bool = False             # random tensors instead of tiles: measures the step alone
    demo: bool = False                  # start from the demo's settings (what `python g2l.py` alone runs)

# the no-argument demo: real CC0 tiles shipped in examples/, a small real teacher when the hub is reachable
DEMO = dict(teacher="vit_small_patch14_dinov2.lvd142m", student="vit_tiny_patch16_224",
            data=[str(Path(__file__).resolve().parent / "examples" / "tiles")], out="runs/demo",
            img_size=112, batch_size=16, steps=120, warmup_steps=10, lr=5e-4, eval_every=40, log_every=10,
            ckpt_every=60, workers=2, val_frac=0.15, max_val=64)

CHOICES = dict(global_loss=["logsum", "cosine", "smoothl1", "mse"],
               local_loss=["cosine-smoothl1", "logsum", "mse", "none"],
               head=["linear", "mlp"], views=["same", "independent"], precision=["auto", "bf16", "fp16", "fp32"],
               compile=["auto", "on", "off"])

def parse_args(argv=None):
    """The command line is the Config: same names (dashes for underscores), its comments are the --help."""
    argv = sys.argv[1:] if argv is None else argv
    helps = dict(re.findall(r"^    (\w+): .*?# (.*)$", inspect.getsource(Config), re.M))
    fmt = type("Fmt", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {})
    p = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    demo = not argv or "--demo" in argv  # no arguments at all is the demo too
    for f in dataclasses.fields(Config):
        name, kw = "--" + f.name.replace("_", "-"), dict(help=helps.get(f.name, " "), choices=CHOICES.get(f.name))
        if f.type is bool:
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, help=kw["help"])
        elif f.type is list:
            p.add_argument(name, nargs="+", default=f.default_factory(), **kw)
        else:
            p.add_argument(name, type=f.type, default=f.default, **kw)
    if demo:  # the demo's values become the defaults, so any flag given still wins
        p.set_defaults(**DEMO, demo=True)
    return Config(**vars(p.parse_args(argv)))

# ----------------------------------------------------------------------------- compute init
def rank_world():
    """(rank, world size) from torch.distributed itself: (0, 1) for a single process."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

def print0(*a, **k):
    if rank_world()[0] == 0:
        print(*a, **k, flush=True)

def one_line(e, limit=200):
    """An exception in one short line, for the one-line errors: its type and its message (whitespace collapsed)."""
    msg = " ".join(str(e).split())[:limit]
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__

def all_sum(x):
    """Sum over ranks, differentiable: torch's autograd all_reduce sums the gradients in backward too (as SyncBatchNorm
    does). Every loss ends in a global sum, so with DDP's gradient averaging each step gets exactly the gradient of the
    global-batch loss, the same as one process with the same global batch."""
    return dist_nn.all_reduce(x) if rank_world()[1] > 1 else x

# ----------------------------------------------------------------------------- data
IMG_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp")
MANIFEST = "tiles.csv"  # prep_tiles.py lists every tile it wrote here: a folder with one is read, never walked
CACHE_MIN = 50_000      # a walked folder with at least this many tiles keeps its listing in ~/.cache/g2l

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

def group_tiles(groups):
    """Tiles from [(folder, [file names])], sorted by folder then name: a slide's tiles are contiguous."""
    groups = sorted((d, sorted(ns)) for d, ns in groups if ns)
    return Tiles(np.array([os.fsencode(d) for d, _ in groups], dtype="S"),
                 np.repeat(np.arange(len(groups), dtype=np.int32), [len(ns) for _, ns in groups]),
                 np.array([os.fsencode(n) for _, ns in groups for n in ns], dtype="S"))

def tiles_from_paths(paths):
    """Tiles from a list of paths, in the given order (eval.py's labels follow it)."""
    dirs, slide = {}, [0] * len(paths)
    for i, p in enumerate(paths):
        slide[i] = dirs.setdefault(os.path.dirname(p), len(dirs))
    return Tiles(np.array([os.fsencode(d) for d in dirs], dtype="S"), np.array(slide, dtype=np.int32),
                 np.array([os.fsencode(os.path.basename(p)) for p in paths], dtype="S"))

def concat_tiles(parts):
    off = np.cumsum([0] + [len(t.dirs) for t in parts])
    return Tiles(np.concatenate([t.dirs for t in parts]), np.concatenate([t.slide + o for t, o in zip(parts, off)]),
                 np.concatenate([t.names for t in parts]))

def walk_images(folder):
    """([(folder, [image names])], [(folder, mtime_ns)] of every folder entered), relative to `folder`.
    Follows symlinks but enters each real folder once (no loops, no tile counted twice); skips .hidden
    entries and the masks/ folder at the top (prep_tiles.py's QC pictures)."""
    groups, stamps, seen, todo = [], [], set(), [""]
    while todo:
        rel = todo.pop()
        st = os.stat(os.path.join(folder, rel))
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        stamps.append((rel, st.st_mtime_ns))
        names = []
        with os.scandir(os.path.join(folder, rel)) as entries:
            for e in entries:
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    if rel or e.name != "masks":
                        todo.append(os.path.join(rel, e.name))
                elif e.name.lower().endswith(IMG_EXTS):
                    names.append(e.name)
        groups.append((rel, names))
    return groups, stamps

def cache_file(folder):
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "g2l" / f"tiles-{hashlib.sha1(os.fsencode(os.path.realpath(folder))).hexdigest()[:16]}.npz"

def read_manifest(folder):
    """[(folder, [file names])] relative to `folder`, from its tiles.csv (path column)."""
    path, groups = os.path.join(folder, MANIFEST), {}
    with open(path, newline="") as f:
        rows = csv.reader(f)
        header = next(rows, [])
        if "path" not in header:
            raise SystemExit(f"error: {path} has no 'path' column; delete it (the folder is then scanned) or "
                             "re-run prep_tiles.py")
        col = header.index("path")
        for r in rows:
            d, n = os.path.split(r[col])
            groups.setdefault(d, []).append(n)
    return list(groups.items())

def walk_cached(folder):
    """Tiles relative to `folder`: the cached listing while no folder in the tree changed (entries added or
    removed change a folder's mtime), else a walk, cached when large (small trees walk in milliseconds)."""
    cache = cache_file(folder)
    with contextlib.suppress(Exception):  # no cache, a stale one or an unreadable one: walk
        z = np.load(cache)
        stamp = lambda d: os.stat(os.path.join(folder, os.fsdecode(d))).st_mtime_ns
        if all(stamp(d) == m for d, m in zip(z["walked"], z["mtimes"])):
            return Tiles(z["dirs"], z["slide"], z["names"])
    groups, stamps = walk_images(folder)
    tiles = group_tiles(groups)
    if len(tiles) >= CACHE_MIN:
        with contextlib.suppress(OSError):  # a read-only home only means no cache
            cache.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(cache, "wb") as f:
                np.savez(f, dirs=tiles.dirs, slide=tiles.slide, names=tiles.names, mtimes=[m for _, m in stamps],
                         walked=np.array([os.fsencode(d) for d, _ in stamps], dtype="S"))
    return tiles

def index_folder(folder):
    """One --data folder: its manifest (written by prep_tiles.py) if it has one, else a (cached) walk."""
    if not os.path.isdir(folder):
        raise SystemExit(f"error: data folder {folder} does not exist; pass --data with folders of tiles "
                         "(e.g. the --out of prep_tiles.py), or add --demo to use the bundled demo tiles")
    has_manifest = os.path.isfile(os.path.join(folder, MANIFEST))
    tiles = group_tiles(read_manifest(folder)) if has_manifest else walk_cached(folder)
    if not len(tiles):
        raise SystemExit(f"error: no images ({', '.join(IMG_EXTS)}) under {folder}; "
                         "make tiles with: python prep_tiles.py SLIDES --out " + folder)
    dirs = np.array([os.fsencode(os.path.join(folder, os.fsdecode(d))) for d in tiles.dirs], dtype="S")
    return Tiles(dirs, tiles.slide, tiles.names)

def index_tiles(folders):
    """All tiles under the folders. Only rank 0 touches the disk; the other ranks receive the arrays."""
    box, (rank, world) = [None], rank_world()
    if rank == 0:
        try:
            box = [concat_tiles([index_folder(f) for f in folders])]
        except SystemExit as e:  # every rank stops with rank 0's message instead of waiting for the broadcast
            box = [str(e)]
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise SystemExit(box[0])
    return box[0]

def find_images(folders):
    """All images under the folders (recursive), sorted; the parent folder is the slide id."""
    tiles = index_tiles(folders)
    return [tiles.path(i) for i in range(len(tiles))]

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
        self.tiles = tiles if isinstance(tiles, Tiles) else tiles_from_paths(list(tiles))
        self.size = size
    def __len__(self):
        return len(self.tiles)
    def __getitem__(self, i):
        for k in range(len(self.tiles)):
            path = self.tiles.path((i + k) % len(self.tiles))
            try:
                x = load_tile(path, self.size)
                return x, k
            except Exception as e:  # corrupt / truncated / not an image
                print(f"warning: skipping unreadable tile {path}: {one_line(e)}", flush=True)
        raise RuntimeError("no readable tile in the dataset")

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}

def quiet_worker(_):
    """DataLoader workers ignore SIGINT/SIGTERM: a scheduler signals the whole process group, and the main process,
    not its workers, decides when to stop (after saving). They start with both blocked (held_signals), so one sent
    while torch installs its own worker handlers stays pending, and is dropped once ignored here."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

@contextlib.contextmanager
def held_signals():
    """Block SIGINT/SIGTERM while DataLoader workers start (they inherit the mask); delivered right after."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)

class InfiniteSampler(torch.utils.data.Sampler):
    """Seeded epoch permutations (or slide-balanced draws), sliced per rank, starting at any position:
    resuming at sample k continues exactly where an uninterrupted run would be."""
    def __init__(self, n, weights, global_batch, seed, start=0):
        self.n, self.weights, self.global_batch, self.seed, self.start = n, weights, global_batch, seed, start
        self.cdf = None if weights is None else torch.cumsum(weights.double(), 0)
    def order(self, epoch):
        g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        if self.weights is not None:  # inverse-CDF draws: torch.multinomial refuses more than 2^24 tiles
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

# the paper's photometric augmentations (eval.py bench-data builds the same ones in torchvision from these numbers)
AUG = dict(jitter=(0.15, 0.15, 0.1, 0.05),  # colour jitter strengths: brightness, contrast, saturation, hue
           p_jitter=0.5, blur_px=9, sigma=(0.1, 2.0), p_blur=0.1)  # a Gaussian blur's kernel side and sigma range

def aug_params(n, seed, step, micro):
    """Random parameters for one global batch, drawn from (seed, step, micro-step) alone: independent of
    the number of ranks and of resumption, so 1 x B and 2 x B/2 processes see identical views."""
    key = hashlib.sha256(f"{seed},{step},{micro}".encode()).digest()  # stable: Python's hash() is not promised to be
    g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
    u = lambda *s: torch.rand(*s, generator=g)
    return dict(crop=u(n, 2), hflip=u(n) < 0.5, vflip=u(n) < 0.5,
                jitter=u(n) < AUG["p_jitter"], bcsh=u(n, 4) * 2 - 1,  # brightness, contrast, saturation, hue: [-1, 1]
                blur=u(n) < AUG["p_blur"], sigma=AUG["sigma"][0] + (AUG["sigma"][1] - AUG["sigma"][0]) * u(n))

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

GRAY = torch.tensor([0.299, 0.587, 0.114])
YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
YIQ_INV = torch.linalg.inv(YIQ)
def colour_blur(x, p):
    """The paper's photometric augmentations (AUG) on a float [0,1] batch, per sample: colour jitter, Gaussian blur."""
    B = x.shape[0]
    on = p["jitter"].view(B, 1, 1, 1)
    b, c, s, h = (p["bcsh"] * torch.tensor(AUG["jitter"], device=x.device)).unbind(1)
    gray = lambda t: (t * GRAY.to(t.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    y = (x * (1 + b).view(B, 1, 1, 1)).clamp(0, 1)
    m = gray(y).mean((2, 3), keepdim=True)
    y = ((y - m) * (1 + c).view(B, 1, 1, 1) + m).clamp(0, 1)
    g = gray(y)
    y = ((y - g) * (1 + s).view(B, 1, 1, 1) + g).clamp(0, 1)
    # hue: rotate chroma in YIQ space by 2*pi*h (a linear, batched stand-in for an HSV hue shift)
    cos, sin = torch.cos(2 * math.pi * h), torch.sin(2 * math.pi * h)
    rot = torch.zeros(B, 3, 3, device=x.device)
    rot[:, 0, 0], rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = 1, cos, -sin, sin, cos
    M = YIQ_INV.to(x.device) @ rot @ YIQ.to(x.device)
    y = torch.einsum("bij,bjhw->bihw", M, y).clamp(0, 1)
    x = torch.where(on, y, x)
    idx = p["blur"].nonzero().flatten()
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
    mine = lambda seed: {k: v[rank * n:(rank + 1) * n].to(device)  # this rank's slice of the global batch
                         for k, v in aug_params(n * world, seed, step, micro).items()}
    p = mine(cfg.seed)
    if not cfg.augment:  # the random crop (when --load-size > --img-size) stays; flips, colour and blur go
        p["hflip"], p["vflip"] = torch.zeros_like(p["hflip"]), torch.zeros_like(p["vflip"])
    x = crop_flip(x.to(device, non_blocking=True), p, cfg.img_size).float() / 255
    if not cfg.augment:
        return x, x
    xt = colour_blur(x, p)
    return xt, colour_blur(x, mine(cfg.seed + 7919)) if cfg.views == "independent" else xt

# ----------------------------------------------------------------------------- models
BIOPTIMUS = dict(mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517))  # Bioptimus' stats
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))                     # ImageNet
HIBOU = dict(mean=(0.7068, 0.5755, 0.7220), std=(0.1950, 0.2316, 0.1816))  # histai/hibou-* preprocessor_config
SWIGLU = dict(mlp_layer="swiglu_packed", act_layer="silu")

def swiglu_ratio(dim, ratio=4):
    """timm mlp_ratio of DINOv2's SwiGLU: its hidden size is 2/3 of dim*ratio rounded up to a multiple of 8, and
    timm's SwiGLUPacked packs gate + value into one fc1 of twice that width (+0.5: int() must not round down)."""
    hidden = (int(dim * ratio * 2 / 3) + 7) // 8 * 8
    return (2 * hidden + 0.5) / dim

PRESETS = {  # hub name, bare timm architecture + kwargs (builds offline), normalisation, native px, embedding
    # Sources: each model card's timm.create_model call and its hub config.json (architecture + model_args).
    # H-optimus-0/1 cards: init_values=1e-5, dynamic_img_size=False, Bioptimus' mean/std.
    "h-optimus-0": dict(hub="hf-hub:bioptimus/H-optimus-0", arch="vit_giant_patch14_reg4_dinov2",
                        kwargs=dict(init_values=1e-5, dynamic_img_size=False), size=224, embed="pool", **BIOPTIMUS),
    "h-optimus-1": dict(hub="hf-hub:bioptimus/H-optimus-1", arch="vit_giant_patch14_reg4_dinov2",
                        kwargs=dict(init_values=1e-5, dynamic_img_size=False), size=224, embed="pool", **BIOPTIMUS),
    # H0-mini card: mlp_layer=SwiGLUPacked, act_layer=SiLU; its MLP width lives in the (gated) hub config and was
    # not checked here: 5.33334 is DINOv2's SwiGLU width for ViT-B (2048, packed 4096 = swiglu_ratio(768)).
    "h0-mini": dict(hub="hf-hub:bioptimus/H0-mini", arch="vit_base_patch14_reg4_dinov2",
                    kwargs=dict(init_values=1e-5, mlp_ratio=5.33334, **SWIGLU), size=224, embed="pool", **BIOPTIMUS),
    # UNI card: init_values=1e-5, dynamic_img_size=True. UNI2-h card: the kwargs below (SwiGLU, 8 registers).
    "uni": dict(hub="hf-hub:MahmoodLab/UNI", arch="vit_large_patch16_224",
                kwargs=dict(init_values=1e-5, dynamic_img_size=True), size=224, embed="pool", **IMAGENET),
    "uni2-h": dict(hub="hf-hub:MahmoodLab/UNI2-h", arch="vit_giant_patch14_224",
                   kwargs=dict(depth=24, num_heads=24, embed_dim=1536, init_values=1e-5, mlp_ratio=5.33334,
                               no_embed_class=True, reg_tokens=8, dynamic_img_size=True, **SWIGLU),
                   size=224, embed="pool", **IMAGENET),
    # Virchow2 card: mlp_ratio=5.3375, SwiGLU, 4 registers; embedding = CLS concatenated with the mean patch token.
    # Prov-GigaPath hub config: vit_giant_patch14_dinov2 (SwiGLU from timm's entrypoint) with /16 patches.
    "virchow2": dict(hub="hf-hub:paige-ai/Virchow2", arch="vit_huge_patch14_224",
                     kwargs=dict(init_values=1e-5, mlp_ratio=5.3375, reg_tokens=4, global_pool="",
                                 dynamic_img_size=True, **SWIGLU), size=224, embed="cls+mean", **IMAGENET),
    "prov-gigapath": dict(hub="hf-hub:prov-gigapath/prov-gigapath", arch="vit_giant_patch14_dinov2",
                          kwargs=dict(patch_size=16, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5,
                                      mlp_ratio=5.33334), size=224, embed="pool", **IMAGENET),
    # Published in the transformers DINOv2 format (config.json + model.safetensors); `hf` marks them for
    # conversion to timm on load. Hibou (Nechaev et al., arXiv 2406.05074; github.com/HistAI/hibou build_model):
    # ViT/14, 4 registers, SwiGLU FFN, layer scale 1e-5, 224 px; feature = pooler_output = the final-norm CLS;
    # mean/std from its preprocessor config. Hibou-L's own config.json was not checked offline: a checkpoint that
    # differs fails to load with a key/shape list; `hf-hub:histai/hibou-L` builds from its config.json instead.
    "hibou-l": dict(hub="hf-hub:histai/hibou-L", hf="hf-hub:histai/hibou-L", arch="vit_large_patch14_reg4_dinov2",
                    kwargs=dict(img_size=224, mlp_ratio=swiglu_ratio(1024), **SWIGLU), size=224, embed="pool", **HIBOU),
    "hibou-b": dict(hub="hf-hub:histai/hibou-b", hf="hf-hub:histai/hibou-b", arch="vit_base_patch14_reg4_dinov2",
                    kwargs=dict(img_size=224, mlp_ratio=swiglu_ratio(768), **SWIGLU), size=224, embed="pool", **HIBOU),
    # Phikon-v2 (Filiot et al., arXiv 2409.09173; owkin/phikon-v2 model card): DINOv2 ViT-L/16, no registers,
    # plain GELU MLP, ImageNet mean/std; feature = last_hidden_state[:, 0] (the final-norm CLS). Not checked
    # against its config.json offline (same fallback as Hibou: `hf-hub:owkin/phikon-v2`).
    "phikon-v2": dict(hub="hf-hub:owkin/phikon-v2", hf="hf-hub:owkin/phikon-v2", arch="vit_large_patch14_dinov2",
                      kwargs=dict(patch_size=16, img_size=224), size=224, embed="pool", **IMAGENET),
}
LAYERS = {"swiglu_packed": timm.layers.SwiGLUPacked, "silu": nn.SiLU}  # JSON-able names for layer kwargs

@functools.lru_cache(maxsize=None)
def hub_reachable(timeout=3.0):
    """Asked once per process. Without the hub, switch huggingface_hub to offline mode, so a download fails in a
    second (cached files still load) instead of after minutes of retries."""
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        import huggingface_hub.constants
        huggingface_hub.constants.HF_HUB_OFFLINE = True
        print0("note: the Hugging Face hub is not reachable; only cached or local weights can be used")
        return False

def read_state_dict(path):
    """Weights from .safetensors / .pth / .bin, without DDP/compile prefixes."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: weights file {path} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: one line, not a traceback
        raise SystemExit(f"error: cannot read weights file {path} ({one_line(e)}); "
                         "expected .safetensors, .pth or .bin with a state dict (re-download it if it is truncated)")
    for key in ("state_dict", "model", "student"):  # common wrappers
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SystemExit(f"error: weights file {path} holds a {type(sd).__name__}, not a state dict of tensors; "
                         "save model.state_dict() (torch.save or safetensors) and pass that file")
    return timm.models.clean_state_dict(sd)  # without DDP's module. / torch.compile's _orig_mod. prefixes

HF_DINOV2 = [  # transformers DINOv2 key -> timm VisionTransformer key (legacy names as on the hub, and newer ones)
    (r"^(dinov2|model)\.", ""), (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^embeddings\.cls_token", "cls_token"), (r"^embeddings\.register_tokens", "reg_token"),
    (r"^embeddings\.position_embeddings", "pos_embed"), (r"^encoder\.layer\.", "blocks."),
    (r"attention\.attention\.query|attention\.q_proj", "attn.query"),
    (r"attention\.attention\.key|attention\.k_proj", "attn.key"),
    (r"attention\.attention\.value|attention\.v_proj", "attn.value"),
    (r"attention\.output\.dense|attention\.o_proj", "attn.proj"), (r"layer_scale(\d)\.lambda1", r"ls\1.gamma"),
    (r"mlp\.weights_in", "mlp.fc1"), (r"mlp\.weights_out|mlp\.down_proj", "mlp.fc2"), (r"^layernorm\.", "norm."),
]

def dinov2_to_timm(sd, model):
    """transformers DINOv2 (with or without registers) state dict -> timm ViT's (tests: identical tokens)."""
    out = {}
    for k, v in sd.items():
        for pattern, new in HF_DINOV2:
            k = re.sub(pattern, new, k)
        if "mask_token" not in k and not k.startswith("classifier."):  # masked pre-training / a task head: unused
            out[k] = v
    for k in [k for k in out if re.search(r"attn\.query\.(weight|bias)$", k)]:  # timm packs q, k, v in one Linear
        out[k.replace("query", "qkv")] = torch.cat([out.pop(k.replace("query", x)) for x in ("query", "key", "value")])
    for k in [k for k in out if re.search(r"mlp\.gate_proj\.(weight|bias)$", k)]:  # SwiGLU, newer transformers
        out[k.replace("gate_proj", "fc1")] = torch.cat([out.pop(k), out.pop(k.replace("gate_proj", "up_proj"))])
    if getattr(model, "no_embed_class", False) and "pos_embed" in out:  # registers: timm's CLS carries no position
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]   # so fold it in (as timm's own DINOv2 converter)
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return out

def load_weights(model, path, name):
    sd, how = read_state_dict(path), {}
    if any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in sd):  # transformers DINOv2 format
        sd = dinov2_to_timm(sd, model)
        how = dict(antialias="reg_token" in sd)  # resample positions as transformers does (antialias: registers)
    fix = "pass the matching architecture/preset or fix --*-kwargs"
    if isinstance(model, VisionTransformer):  # timm's ViT converter: resamples position embeddings, legacy keys
        try:
            sd = checkpoint_filter_fn(sd, model, **how)
        except (RuntimeError, ValueError, KeyError, IndexError) as e:
            raise SystemExit(f"error: weights file {path} does not fit {name}: timm's ViT converter failed "
                             f"({one_line(e)}); {fix}")
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}  # classifier heads are not used
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise SystemExit(f"error: weights file {path} does not fit {name}: "
                         f"{len(missing)} missing (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
                         f"{len(wrong)} wrong shapes (e.g. {wrong[:2]}); {fix}")
    model.load_state_dict(sd)

def hf_file(where, fname):
    """Path of FILE in a Hugging Face checkpoint (a local folder, or hf-hub:ORG/NAME via the hub cache), or None."""
    if not where.startswith("hf-hub:"):
        return str(Path(where) / fname) if (Path(where) / fname).is_file() else None
    from huggingface_hub import hf_hub_download
    hub_reachable()
    try:
        return hf_hub_download(where[len("hf-hub:"):], fname)
    except Exception:  # missing, offline, gated: the caller says what to do
        return None

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
              reg_tokens=reg, no_embed_class=reg > 0)  # registers: positions for the patches only (see dinov2_to_timm)
    if c.get("use_swiglu_ffn"):
        kw.update(mlp_ratio=swiglu_ratio(dim, ratio), **SWIGLU)
    pre = hf_file(where, "preprocessor_config.json")  # the checkpoint's own normalisation
    pre = json.loads(Path(pre).read_text()) if pre else {}
    return dict(hf=where, arch="vit_base_patch14_dinov2", kwargs=kw, embed="pool", size=kw["img_size"],
                mean=tuple(pre.get("image_mean", IMAGENET["mean"])), std=tuple(pre.get("image_std", IMAGENET["std"])))

def resolve(name):
    """What a model name tells, as a dict: load (the name timm loads it by), pretrained, arch (its bare timm
    architecture), kwargs, embed and, where known, mean, std, size, hf. See README 'Models and offline weights'."""
    p = Path(name)
    if (p / "student" / "config.json").is_file():  # a g2l run folder
        p = p / "student"
    local = (p / "config.json").is_file() and not name.startswith(("hf-hub:", "local-dir:"))
    hf = dinov2_spec(str(p) if local else name) if local or name.startswith("hf-hub:") else None
    if hf:  # a transformers DINOv2 (Hibou, Phikon-v2, facebook/dinov2-*): built in timm, weights converted on load
        return dict(hf, load=name, pretrained=True)
    if local:
        name = f"local-dir:{p}"
    if name.startswith("local-dir:"):
        path = Path(name[len("local-dir:"):])
        if not (path / "config.json").is_file():
            raise SystemExit(f"error: {path} has no config.json; "
                             "a local-dir model needs config.json + model.safetensors")
        cfg = json.loads((path / "config.json").read_text())
        pc = cfg.get("pretrained_cfg", cfg)
        return dict(load=name, pretrained=True, arch=cfg["architecture"], kwargs=cfg.get("model_args", {}),
                    embed=cfg.get("g2l", {}).get("embed", "pool"), mean=pc.get("mean"), std=pc.get("std"),
                    size=pc.get("input_size", [3, 0, 0])[-1])
    if name in PRESETS:
        return dict(PRESETS[name], load=PRESETS[name]["hub"], pretrained=True)
    if not name.startswith("hf-hub:") and not timm.is_model(name.split(".")[0]):
        raise SystemExit(f"error: unknown model {name!r}: use a preset ({', '.join(PRESETS)}), a timm name "
                         "(timm.list_models()), hf-hub:ORG/NAME, local-dir:PATH or a g2l run folder")
    return dict(load=name, pretrained="." in name or name.startswith("hf-hub:"), arch=name.split("hf-hub:")[-1],
                kwargs={}, embed="pool")

def offline_help(info):
    return (f"Offline: pass local weights for architecture {info['arch']} (g2l.py --teacher-weights/"
            f"--student-weights FILE, eval.py --model-weights FILE) or a local-dir:PATH. "
            "Gated model: accept its terms on huggingface.co and run `hf auth login`.")

@dataclasses.dataclass(frozen=True)
class Spec:
    """What a loaded model needs besides its weights; built in one place (load_model)."""
    name: str           # as given: preset, timm name, hf-hub:, local-dir: or run folder
    arch: str           # timm architecture
    kwargs: dict        # architecture kwargs (JSON-able), as built
    source: str         # where the weights came from, in words
    mean: tuple         # its own normalisation
    std: tuple
    size: int           # input px it was built for
    patch: int          # patch size (0: not a ViT)
    embed: str          # global feature: pool (the pooled pre-logits output) | cls+mean (Virchow2)
    width: int          # token width (model.num_features)
    dim: int            # global feature width (2 x width for cls+mean)

def load_model(name, weights="", kwargs="", img_size=0, device="cpu", meta=False):
    """Build a model by the naming rules and return (model, Spec)."""
    info = resolve(name)
    extra = json.loads(kwargs) if kwargs else {}
    if extra and not isinstance(extra, dict):
        raise SystemExit(f"error: --*-kwargs must be a JSON object, got {kwargs!r}")
    kw = {**info["kwargs"], **extra}
    bare = bool(weights or extra or meta)  # own weights ("random": none) or another shape: the bare architecture
    weights = "" if weights == "random" else weights
    converted = info.get("hf") and not bare
    if converted:  # transformers DINOv2 weights: fetched here, converted by load_weights
        own = dinov2_spec(info["hf"])  # for a preset too, the checkpoint's own config.json decides the architecture
        kw = dict(own["kwargs"]) if own else kw
        weights = hf_file(info["hf"], "model.safetensors") or hf_file(info["hf"], "pytorch_model.bin")
        if not weights:
            raise SystemExit(f"error: could not get the weights of {name} ({info['hf']}: model.safetensors or "
                             f"pytorch_model.bin). {offline_help(info)}")
    build = {k: LAYERS.get(v, v) if k in ("mlp_layer", "act_layer") else v for k, v in kw.items()}
    build.update({"img_size": img_size} if img_size else {})
    target, pretrained = (info["arch"], False) if bare or converted else (info["load"], info["pretrained"])
    if pretrained and not target.startswith("local-dir:"):
        hub_reachable()  # weights come from the hub (or its cache)
    source = (f"pretrained {info['hf']} (transformers DINOv2, converted to timm)" if converted else
              f"weights file {weights}" if weights else "pretrained " + target if pretrained else "random init")
    def create(**args):
        with torch.device("meta") if meta else contextlib.nullcontext():
            return timm.create_model(target, pretrained=pretrained, num_classes=0, **args)
    try:
        try:
            model = create(**build)
        except TypeError as e:  # a convolutional net takes any input size and no img_size argument
            if "img_size" not in str(e):
                raise
            model = create(**{k: v for k, v in build.items() if k != "img_size"})
    except (OSError, RuntimeError, ValueError, TypeError, AssertionError) as e:
        from_hub = target.startswith("hf-hub:") or any(w in str(e).lower() for w in ("huggingface", "hub"))
        if from_hub or isinstance(e, OSError):
            raise SystemExit(f"error: could not load {name} from the Hugging Face hub ({one_line(e)}). "
                             + offline_help(info))
        raise SystemExit(f"error: cannot build {name} with kwargs {kw}: {one_line(e)}")
    if weights:
        load_weights(model, weights, name)
    pc, pe = model.pretrained_cfg, getattr(model, "patch_embed", None)
    spec = Spec(name=name, arch=pc.get("architecture") or info["arch"], kwargs=kw, source=source,
                mean=tuple(info.get("mean") or pc.get("mean", IMAGENET["mean"])),
                std=tuple(info.get("std") or pc.get("std", IMAGENET["std"])),
                # the size it was built for: a kwargs img_size beats the pretrained config (DINOv2's is 518 px)
                size=img_size or kw.get("img_size") or info.get("size") or pc.get("input_size", (3, 224, 224))[-1],
                patch=int(pe.patch_size[0]) if pe is not None else 0, embed=info["embed"], width=model.num_features,
                dim=model.num_features * (2 if info["embed"] == "cls+mean" else 1))
    return model.to(device) if not meta else model, spec

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # --precision

def encode(model, spec, x):
    """(global feature [B, dim], patch-token map [B, width, h, w]) of a float [0,1] batch, in its own mean/std."""
    mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
    feats = model.forward_features((x - mean) / std)
    if feats.ndim == 4:  # convolutional: [B, C, h, w]
        return model.forward_head(feats, pre_logits=True), feats
    npt = model.num_prefix_tokens  # CLS + registers, never a hard-coded [:, 1:]
    patches = feats[:, npt:]
    h, w = x.shape[-2] // spec.patch, x.shape[-1] // spec.patch
    pmap = patches.transpose(1, 2).reshape(feats.shape[0], -1, h, w)
    if spec.embed == "cls+mean":  # Virchow2: CLS concatenated with the mean patch token
        g = torch.cat([feats[:, 0], patches.mean(1)], 1)
    else:  # the model's pooled pre-logits output (CLS for DINOv2-style models)
        g = model.forward_head(feats, pre_logits=True)
    return g, pmap

def projection(kind, d_in, d_out):
    """A projection head: linear, or a small MLP (hidden 2x d_out) that absorbs the mismatch so the backbone
    does not have to; either way it is discarded when the student is exported."""
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    return nn.Sequential(nn.Linear(d_in, 2 * d_out), nn.GELU(), nn.Linear(2 * d_out, d_out))

class Student(nn.Module):
    """The trainable part: student + projection heads (the only module given to the optimizer and DDP)."""
    def __init__(self, backbone, spec, teacher_dim, teacher_width, local, head="linear"):
        super().__init__()
        self.backbone, self.spec = backbone, spec
        self.global_head = projection(head, spec.dim, teacher_dim)  # global feature -> the teacher's
        self.local_head = projection(head, spec.width, teacher_width) if local else None  # patch tokens -> teacher's
    def forward(self, x, grid):
        g, pmap = encode(self.backbone, self.spec, x)
        zl = None
        if self.local_head is not None:
            zl = self.local_head(pmap.flatten(2).transpose(1, 2))
            if tuple(pmap.shape[-2:]) != tuple(grid):  # grids differ: resize the student token map
                B, _, h, w = pmap.shape
                zl = F.interpolate(zl.transpose(1, 2).reshape(B, -1, h, w), size=grid, mode="bilinear",
                                   align_corners=False).flatten(2).transpose(1, 2)
        return self.global_head(g), zl

# ----------------------------------------------------------------------------- losses
def batchnorm(z, eps=1e-5):
    """BatchNorm1d(affine=False) in training mode over the global batch (synchronised across ranks)."""
    n = all_sum(torch.tensor(float(z.shape[0]), device=z.device))
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
    return all_sum(per_sample.sum()) / all_sum(torch.tensor(float(per_sample.numel()), device=zs.device))

def linear_cka(a, b):
    """Linear CKA between feature matrices [N, D1], [N, D2] (Kornblith et al. 2019)."""
    a, b = a.double() - a.double().mean(0), b.double() - b.double().mean(0)
    return float((a.T @ b).norm() ** 2 / ((a.T @ a).norm() * (b.T @ b).norm()))

def centred_cosine(a, b):
    """Mean cosine after centring each side: raw cosine rewards predicting the teacher's mean vector."""
    return float(F.cosine_similarity(a - a.mean(0), b - b.mean(0), dim=1).mean())

# ----------------------------------------------------------------------------- speed accounting
# dense TFLOPS (bf16/fp16 tensor cores, TF32) from NVIDIA's datasheets; keys are whole words of the device name
PEAK_TFLOPS = {"H200": (989, 494), "H200 NVL": (835, 418), "H100": (989, 494), "H100 PCIe": (756, 378),
               "H100 NVL": (835, 418), "A100": (312, 156), "L40S": (362, 183), "L40": (181, 90), "L4": (121, 60),
               "A10": (125, 62), "4090": (165, 82), "3090": (71, 35), "A6000": (155, 77), "V100": (125, 15)}

def gpu_peak(name, precision):
    """Peak FLOP/s of a GPU by name: the longest table key whose words all appear, in order, as whole words of the
    name ("NVIDIA L40" is not an L4; "NVIDIA H100 PCIe" is not the SXM part); NaN for a GPU not in the table."""
    words = " " + " ".join(re.split(r"[^a-z0-9]+", name.lower())) + " "
    found = [k for k in PEAK_TFLOPS if f" {k.lower()} " in words]
    if not found:
        return float("nan")
    half, single = PEAK_TFLOPS[max(found, key=lambda k: len(k.split()))]
    return (half if precision in ("bf16", "fp16") else single) * 1e12

def peak_flops(device, precision):
    """Peak of the device, or NaN (MFU unavailable): on CPU there is no honest peak to divide by (a matmul probe
    costs seconds and measures whatever else the cores are doing)."""
    return gpu_peak(torch.cuda.get_device_name(device), precision) if device.type == "cuda" else float("nan")

def mfu(flops_per_s, peak):
    """Model FLOPs utilisation in %, or None (JSON null) when the peak or the FLOP count is unknown."""
    v = 100 * flops_per_s / peak
    return round(v, 2) if math.isfinite(v) else None

def peak_memory_gb(device):
    """Peak memory of this process: allocated on the GPU, or the peak RSS on CPU (ru_maxrss is in KB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6

def pct(v):
    return "n/a" if v is None else f"{v:.1f}%"

def forward_flops(model, img):
    """Forward FLOPs per image at img px: 2 x tokens x (linear weights) + attention (QK^T and AV)."""
    tokens = (img // model.patch_embed.patch_size[0]) ** 2 + getattr(model, "num_prefix_tokens", 0) \
        if hasattr(model, "patch_embed") else 0
    if not tokens:
        return float("nan")
    lin = sum(m.weight.numel() for m in model.blocks.modules() if isinstance(m, nn.Linear))
    embed = model.patch_embed.proj.weight.numel() * (tokens - model.num_prefix_tokens)
    return 2 * tokens * lin + 4 * len(model.blocks) * tokens ** 2 * model.embed_dim + 2 * embed

# ----------------------------------------------------------------------------- checkpoints and export
def state_digest(obj, h=None):
    """SHA-256 over every tensor's bytes and every other value of a checkpoint: a zip with flipped bytes inside a
    tensor still loads, so the checkpoint carries this digest and a resume refuses one that does not match."""
    h = h or hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        h.update(obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, np.ndarray):
        h.update(obj.tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            state_digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            state_digest(v, h)
    else:
        h.update(repr(obj).encode())
    return h.hexdigest()

@contextlib.contextmanager
def writing(what, *tmps):
    """Around writes renamed over `what` once done: a full disk or a read-only folder gives one clear line, and no
    temp file or folder (atomic_open removes its own; `tmps` others) stays behind. The last good file is kept."""
    try:
        yield
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError ("iostream error")
        for tmp in tmps:
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp) if os.path.isdir(tmp) else os.remove(tmp)
        full = getattr(e, "errno", None) == errno.ENOSPC or "iostream" in str(e) or "failed writing" in str(e)
        raise SystemExit(f"error: cannot write {what} ({'disk full' if full else one_line(e)}); free space or fix "
                         "the folder's permissions, then --resume auto (the last good copy is kept)")

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

def atomic_save(obj, path):
    """torch.save to path.tmp with the state digest, flushed to disk, then renamed over path."""
    with writing(path), atomic_open(path, "wb") as f:
        torch.save(dict(obj, digest=state_digest(obj)), f)
        f.flush()
        os.fsync(f.fileno())

def load_checkpoint(path, raw, opt, scaler):
    """Load a checkpoint into the model, optimizer and scaler, or stop with one line if it is damaged or foreign."""
    fix = f"resume from an earlier copy (--resume PATH), or move {path} away to start afresh"
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated, not a zip, unpicklable
        raise SystemExit(f"error: checkpoint {path} cannot be read ({one_line(e)}); {fix}")
    if not isinstance(ck, dict) or "model" not in ck:
        raise SystemExit(f"error: {path} is not a g2l checkpoint (no model state); {fix}")
    if "digest" not in ck:
        print0(f"note: {path} has no checksum (written by an older g2l); loading it unverified")
    elif ck.pop("digest") != state_digest(ck):
        raise SystemExit(f"error: checkpoint {path} is damaged (its contents do not match their checksum); {fix}")
    try:
        raw.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise SystemExit(f"error: checkpoint {path} does not fit this run's models ({one_line(e)}); resume "
                         "with the --teacher/--student/--*-kwargs/--local-loss it was made with, or use a new --out")
    return ck

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
    with writing(path), atomic_open(path) as f:
        f.write("".join(keep))
    return open(path, "a")

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

def export(raw, spec, cfg, out):
    """student/ as a timm local-dir (config.json + model.safetensors) and heads.safetensors, atomically."""
    from safetensors.torch import save, save_file
    out, tmp = Path(out), Path(out) / "student.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().float().cpu().contiguous() for k, v in raw.backbone.state_dict().items()}
    save_file(sd, str(tmp / "model.safetensors"))
    arch, args = timm_args(raw.backbone, spec)
    conf = dict(architecture=arch, num_classes=0, num_features=spec.width,
                model_args={**args, **({"img_size": cfg.student_img_size} if spec.patch else {})},
                pretrained_cfg=dict(mean=list(spec.mean), std=list(spec.std), num_classes=0,
                                    input_size=[3, cfg.student_img_size, cfg.student_img_size], crop_pct=1.0,
                                    interpolation="bilinear"),
                g2l=dict(embed=spec.embed, teacher=cfg.teacher, student=cfg.student,
                         licence="a distilled student inherits its teacher's licence terms"))
    (tmp / "config.json").write_text(json.dumps(conf, indent=2))
    final = out / "student"
    if final.exists():
        os.replace(final, out / "student.old")
    os.replace(tmp, final)
    shutil.rmtree(out / "student.old", ignore_errors=True)
    heads = {k: v.detach().float().cpu().contiguous() for k, v in raw.state_dict().items()
             if not k.startswith("backbone.")}
    with atomic_open(out / "heads.safetensors", "wb") as f:
        f.write(save(heads))

# ----------------------------------------------------------------------------- training
def resolve_sizes(cfg, spec_t, spec_s):
    """Teacher px, the student px whose patch grid equals the teacher's (/14 at 224 -> 16x16 -> /16 at 256), load px."""
    img = cfg.img_size or spec_t.size
    if not spec_t.patch:
        raise SystemExit(f"error: the teacher {cfg.teacher} has no patch embedding; g2l distils from ViT teachers")
    if img % spec_t.patch:
        raise SystemExit(f"error: --img-size {img} is not a multiple of the teacher's patch size {spec_t.patch}")
    student = cfg.student_img_size or (img // spec_t.patch * spec_s.patch if spec_s.patch else img)
    if (cfg.load_size or img) < img:
        raise SystemExit(f"error: --load-size {cfg.load_size} is smaller than --img-size {img}")
    return dict(img_size=img, student_img_size=student, load_size=cfg.load_size or img)

def lr_factor(step, cfg):
    """Linear warm-up, then cosine decay to min_lr_frac (used for both lr and weight decay)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

def student_view(x, cfg):
    """The teacher's view at the student's input size (the same patch grid)."""
    if cfg.student_img_size == cfg.img_size:
        return x
    return F.interpolate(x, size=cfg.student_img_size, mode="bilinear", antialias=True, align_corners=False)

@torch.no_grad()
def extract_features(loader, encoders, device, amp, desc=None):
    """Features of every tile a loader of uint8 tiles yields: one [N, D] fp32 CPU tensor per encoder (a function of
    the float [0,1] batch on the device), and per tile how many unreadable tiles TileDataset skipped to reach it."""
    outs, skipped = [[] for _ in encoders], []
    with held_signals():  # its workers start here
        batches = iter(loader)
    for x, k in tqdm(batches, total=len(loader), desc=desc, disable=desc is None, dynamic_ncols=True):
        x = x.to(device).float() / 255
        with amp():
            for out, fn in zip(outs, encoders):
                out.append(fn(x).float().cpu())
        skipped.append(k)
    return [torch.cat(o) for o in outs], torch.cat(skipped)

def evaluate(raw, teacher, spec_t, val, cfg, device, amp):
    """Agreement on validation tiles: centred cosine and linear CKA of projected student vs teacher globals."""
    raw.eval()
    (zs, zt), _ = extract_features(val, [lambda x: raw(student_view(x, cfg), (1, 1))[0],
                                         lambda x: encode(teacher, spec_t, x)[0]], device, amp)
    raw.train()
    return dict(val_cos=round(centred_cosine(zs, zt), 4), val_cka=round(linear_cka(zs, zt), 4),
                val_cos_raw=round(float(F.cosine_similarity(zs, zt).mean()), 4))

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
            print0(f"note: {why}; holding out {cfg.val_frac:.0%} of its tiles for validation (tiles of one slide may "
                   "then be on both sides; --val-data avoids that)")
            held = np.zeros(len(tiles), bool)
            held[rng.choice(len(tiles), max(1, round(cfg.val_frac * len(tiles))), replace=False)] = True
        tiles, val = tiles.subset(~held), tiles.subset(held)
    return tiles, val.subset(np.sort(rng.choice(len(val), min(cfg.max_val, len(val)), replace=False)))

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
        teacher_kwargs = json.dumps({**json.loads(cfg.teacher_kwargs or "{}"), "global_pool": "avg"})
        teacher, spec_t = load_model(cfg.teacher.split(".")[0], "", teacher_kwargs, cfg.img_size, device)
    student, spec_s = load_model(cfg.student, cfg.student_weights, cfg.student_kwargs, 0, device)
    return teacher, spec_t, student, spec_s, teacher_kwargs

def resolve_config(cfg, device, spec_t, spec_s, n_train, teacher_kwargs):
    """cfg with every derived value set once (precision, workers, sizes, steps, demo teacher kwargs): config.json."""
    precision = cfg.precision  # one line of policy: bf16 autocast where supported, fp32 on CPU
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if cfg.workers > cores:  # more decoders than cores only adds contention and memory
        print0(f"note: --workers {cfg.workers} is more than the {cores} CPU cores available; using {cores}")
    return dataclasses.replace(cfg, precision=precision, workers=min(cfg.workers, cores), teacher_kwargs=teacher_kwargs,
                               steps=run_steps(cfg, n_train), **resolve_sizes(cfg, spec_t, spec_s))

def build_student(cfg, teacher, spec_t, student, spec_s, device, amp):
    """Frozen teacher, trainable student + heads at the resolved sizes; shapes checked once, loudly."""
    grid = (cfg.img_size // spec_t.patch,) * 2
    if spec_s.patch and hasattr(student, "set_input_size"):
        student.set_input_size(img_size=cfg.student_img_size)
    teacher.eval().requires_grad_(False)  # frozen: never trained, never in the optimizer or a checkpoint
    if device.type == "cuda" and cfg.precision != "fp32":
        teacher.to(DTYPES[cfg.precision])  # no optimizer state, so the weights can live in bf16/fp16 outright
    raw = Student(student, spec_s, spec_t.dim, spec_t.width, cfg.local_loss != "none" and cfg.w_local > 0, cfg.head)
    raw.to(device)
    if cfg.grad_checkpointing:
        student.set_grad_checkpointing(True)
    with torch.no_grad(), amp():
        gt, pt = encode(teacher, spec_t, torch.rand(2, 3, cfg.img_size, cfg.img_size, device=device))
        gs, ls = raw(torch.rand(2, 3, cfg.student_img_size, cfg.student_img_size, device=device), grid)
    assert gs.shape == gt.shape, f"global shapes differ: student {tuple(gs.shape)} vs teacher {tuple(gt.shape)}"
    assert tuple(pt.shape[-2:]) == grid and (ls is None or ls.shape[1] == grid[0] * grid[1])
    n = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    print0(f"teacher {cfg.teacher} ({spec_t.source}): {n(teacher):.1f}M params, {cfg.img_size}px, "
           f"grid {grid[0]}x{grid[1]}, dim {spec_t.dim}")
    print0(f"student {cfg.student} ({spec_s.source}): {n(student):.1f}M params, {cfg.student_img_size}px, "
           f"patch {spec_s.patch or '-'}, dim {spec_s.dim}")
    return raw, grid

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

def slide_weights(slide):
    """Per-tile weights making each slide equally likely, whatever its tile count (--balance); slide: Tiles.slide."""
    return torch.from_numpy(1.0 / np.bincount(slide)[slide])

def make_batches(cfg, tiles, start, device):
    """An endless iterator of (uint8 tiles, skipped) for this rank, starting at sample `start` of the run."""
    if cfg.synthetic:  # the same step on random tensors: no I/O
        return iter(lambda: (torch.randint(0, 256, (cfg.batch_size, 3, cfg.load_size, cfg.load_size),
                                           dtype=torch.uint8), torch.zeros(cfg.batch_size, dtype=torch.long)), None)
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

def check_args(cfg):
    """Every option checked before any model is built or any file written: one clear line per problem."""
    def json_object(text):
        try:
            return not text or isinstance(json.loads(text), dict)
        except ValueError:
            return False
    rules = [(("batch-size", "grad-accum", "log-every", "eval-every", "ckpt-every", "max-val"), lambda v: v >= 1,
              "must be >= 1"),
             (("steps", "warmup-steps", "workers", "img-size", "student-img-size", "load-size", "teacher-chunk"),
              lambda v: v >= 0, "must be >= 0"),
             (("lr", "alpha"), lambda v: 0 < v < math.inf, "must be a finite number > 0"),
             (("weight-decay", "clip-grad", "w-global", "w-local"), lambda v: 0 <= v < math.inf,
              "must be a finite number >= 0"),
             (("min-lr-frac", "max-bad-frac"), lambda v: 0 <= v <= 1, "must be in [0, 1]"),
             (("val-frac",), lambda v: 0 < v < 1, "must be in (0, 1)"),
             (("teacher-kwargs", "student-kwargs"), json_object, 'must be a JSON object, e.g. \'{"depth": 2}\''),
             (("epochs",), lambda v: cfg.steps or 0 < v < math.inf, "must be > 0 (or give --steps)"),
             (("w-global",), lambda v: v > 0 or (cfg.w_local > 0 and cfg.local_loss != "none"),
              "and --w-local leave no loss"),
             (("load-size",), lambda v: not (v and cfg.img_size) or v >= cfg.img_size, "must be >= --img-size")]
    for flags, ok, what in rules:
        for flag in flags:
            value = getattr(cfg, flag.replace("-", "_"))
            if not ok(value):
                raise SystemExit(f"error: --{flag} {value}: {what}")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {out} is a file; give a folder for the run (config, checkpoint, student)")
    try:  # rank 0 writes everything; creating the folder now finds a read-only place before any model is built
        out.mkdir(parents=True, exist_ok=True)
        if int(os.environ.get("RANK", 0)) == 0:  # alone: ranks sharing one test file would remove it under each other
            with open(out / ".write_test", "w"):
                pass
            os.remove(out / ".write_test")
    except OSError as e:
        raise SystemExit(f"error: --out {out} is not writable ({e.strerror}); choose a folder you can write to")
    if cfg.resume not in ("", "auto") and not os.path.isfile(cfg.resume):
        raise SystemExit(f"error: --resume {cfg.resume}: no such checkpoint; pass a ckpt.pt, auto, or nothing")

@contextlib.contextmanager
def run_lock(cfg):
    """One run per --out at a time (rank 0 holds an flock; the kernel releases it when the process dies, so a killed
    run never blocks the next one): two runs in one folder would mix checkpoints, config and metrics."""
    if int(os.environ.get("RANK", 0)) != 0:
        yield
        return
    fh = open(Path(cfg.out) / ".lock", "a")  # not "w": a refused run must not blank the holder's pid
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            fh.close()
            raise SystemExit(f"error: --out {cfg.out} is in use by another running g2l.py; wait for it, stop it, "
                             "or give another --out")
        print(f"note: cannot lock {cfg.out} ({e.strerror}); make sure no other run uses this --out", flush=True)
    else:
        fh.truncate(0)
        fh.write(f"{os.getpid()}\n")
        fh.flush()
    try:
        yield
    finally:
        fh.close()

def main(argv=None):
    """set up -> data -> models -> optimizer -> resume -> loop -> export."""
    cfg = parse_args(argv)
    check_args(cfg)
    with run_lock(cfg), contextlib.ExitStack() as cleanup:
        device = set_up(cfg)
        tiles, val_tiles = load_data(cfg)  # a bad --data fails before any model
        teacher, spec_t, student, spec_s, teacher_kwargs = load_models(cfg, device)
        cfg = resolve_config(cfg, device, spec_t, spec_s, len(tiles), teacher_kwargs)  # final: never changed after
        amp = lambda: torch.autocast(device.type, dtype=DTYPES[cfg.precision], enabled=cfg.precision != "fp32")
        raw, grid = build_student(cfg, teacher, spec_t, student, spec_s, device, amp)
        tiles_per_step = cfg.batch_size * rank_world()[1] * cfg.grad_accum  # all ranks' tiles
        opt, scaler = make_optimizer(cfg, raw, device)
        state = resume(cfg, raw, opt, scaler, device, tiles_per_step)
        metrics = start_run_folder(cfg, spec_t, spec_s, len(tiles), len(val_tiles), state["step"])
        model, teacher_fwd = wrap(cfg, raw, teacher, spec_t, device)
        stop = {}  # SIGINT / SIGTERM (a pre-empted cluster job): finish the step, save, export, exit cleanly
        handlers = {s: signal.signal(s, lambda sig, frame: stop.setdefault("by", signal.Signals(sig)))
                    for s in STOP_SIGNALS}  # before the loaders, so workers start with it
        with held_signals():
            batches = make_batches(cfg, tiles, state["samples"], device)
        # its workers ignore SIGTERM (quiet_worker), so a terminate() at exit would not end them: stop them ourselves
        cleanup.callback(getattr(batches, "_shutdown_workers", lambda: None))
        val = torch.utils.data.DataLoader(TileDataset(val_tiles, cfg.img_size), batch_size=cfg.batch_size,
                                          num_workers=min(cfg.workers, 2), worker_init_fn=quiet_worker) \
            if rank_world()[0] == 0 and val_tiles else None
        run = types.SimpleNamespace(cfg=cfg, device=device, amp=amp, teacher=teacher, spec_t=spec_t, raw=raw,
                                    model=model, teacher_fwd=teacher_fwd, opt=opt, scaler=scaler, grid=grid,
                                    tiles_per_step=tiles_per_step, batches=batches, val=val, metrics=metrics,
                                    stop=stop, **state)  # everything the loop reads, in one place
        reason, code, last = train_loop(run)
        save_checkpoint(run)
        if rank_world()[0] == 0:
            metrics.close()
            if not cfg.synthetic:
                out = Path(cfg.out)
                with writing(out / "student", out / "student.tmp"):
                    export(raw, spec_s, cfg, out)
        for s, h in handlers.items():  # only now: a signal during the last save or export must not cut it short
            signal.signal(s, h)
        if dist.is_initialized():
            dist.barrier()
            cleanup.callback(dist.destroy_process_group)  # after the summary: print0 asks torch.distributed its rank
        summary(cfg, reason, run.baseline, last, Path(cfg.out))
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
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    return device

def load_data(cfg):
    """Training and validation Tiles, checked readable."""
    tiles, val_tiles = split_data(cfg) if not cfg.synthetic else ([], [])
    check_readable(tiles, "--data")
    check_readable(val_tiles, "--val-data (or the held-out slides)")
    if 0 < len(val_tiles) < 64:
        print0(f"warning: only {len(val_tiles)} validation tiles; agreement (val cos, cka) on so few means little "
               "(give --val-data or more slides)")
    return tiles, val_tiles

def run_steps(cfg, n_train):
    """The run's length in optimizer steps (from --epochs when --steps is 0)."""
    per_batch = cfg.batch_size * rank_world()[1]
    if not cfg.synthetic and n_train < per_batch:
        raise SystemExit(f"error: {n_train} training tiles is fewer than one batch over all processes "
                         f"({per_batch}); lower --batch-size")
    steps = cfg.steps or max(1, int(cfg.epochs * n_train / (per_batch * cfg.grad_accum)))
    if cfg.warmup_steps > steps:
        print0(f"warning: --warmup-steps {cfg.warmup_steps} is more than the run's {steps} steps: the learning "
               f"rate never reaches --lr {cfg.lr:g} (it ends at {cfg.lr * steps / cfg.warmup_steps:.2g})")
    return steps

def make_optimizer(cfg, raw, device):
    """AdamW (fused on CUDA); no weight decay on biases, norms, tokens and position embeddings."""
    decays = lambda n, p: p.ndim >= 2 and "pos_embed" not in n and "token" not in n
    groups = [[p for n, p in raw.named_parameters() if decays(n, p) == d] for d in (True, False)]
    opt = torch.optim.AdamW([{"params": groups[0], "weight_decay": cfg.weight_decay},
                             {"params": groups[1], "weight_decay": 0.0}], lr=cfg.lr, fused=device.type == "cuda")
    return opt, torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")  # bf16 needs no scaler

def resume(cfg, raw, opt, scaler, device, tiles_per_step):
    """Weights, optimizer, scaler, RNG; the data position and augmentations follow from the step."""
    ckpt_path = Path(cfg.out) / "ckpt.pt" if cfg.resume in ("auto", "") else Path(cfg.resume)
    if not (cfg.resume and ckpt_path.is_file()):  # (a --resume PATH that does not exist stopped in check_args)
        if ckpt_path.is_file():  # not an error (a deliberate fresh start), but never a silent loss
            print0(f"note: starting afresh in {cfg.out}: its ckpt.pt will be replaced at the first checkpoint; "
                   "stop now and add --resume auto to continue that run instead")
        return dict(step=0, baseline={}, samples=0)
    ck = load_checkpoint(ckpt_path, raw, opt, scaler)
    torch.set_rng_state(ck["rng"]["torch"])
    np.random.set_state(ck["rng"]["numpy"])
    random.setstate(ck["rng"]["python"])
    if device.type == "cuda" and ck["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(ck["rng"]["cuda"])
    print0(f"resumed from {ckpt_path} at step {ck['step']}")
    return dict(step=ck["step"], baseline=ck["first"], samples=ck.get("samples", ck["step"] * tiles_per_step))

def start_run_folder(cfg, spec_t, spec_s, n_train, n_val, step):
    """config.json (every resolved option) and metrics.jsonl, opened for appending (rank 0 only)."""
    if rank_world()[0] != 0:
        return None
    out = Path(cfg.out)  # made by check_args
    conf = dict(dataclasses.asdict(cfg), world_size=rank_world()[1], torch=torch.__version__, timm=timm.__version__,
                teacher_source=spec_t.source, student_source=spec_s.source, n_train=n_train, n_val=n_val)
    with writing(out / "config.json"), atomic_open(out / "config.json") as f:
        f.write(json.dumps(conf, indent=2))
    print0(json.dumps(conf))
    return open_metrics(out / "metrics.jsonl", step)

def wrap(cfg, raw, teacher, spec_t, device):
    """Only student + heads go into DDP; raw stays uncompiled for saving and evaluation."""
    model = raw
    if rank_world()[1] > 1:
        model = nn.parallel.DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None)
    teacher_fwd = lambda x: encode(teacher, spec_t, x)  # compiled as a whole: forward_features is not `forward`
    if cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda"):
        model, teacher_fwd = torch.compile(model), torch.compile(teacher_fwd)
    return model, teacher_fwd

def save_checkpoint(run):
    if rank_world()[0] == 0 and not run.cfg.synthetic:  # a --synthetic run is a measurement: nothing worth keeping
        cuda = run.device.type == "cuda"
        rng = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                   cuda=torch.cuda.get_rng_state(run.device) if cuda else None)
        atomic_save(dict(model=run.raw.state_dict(), optimizer=run.opt.state_dict(), scaler=run.scaler.state_dict(),
                         step=run.step, first=run.baseline, samples=run.samples, config=dataclasses.asdict(run.cfg),
                         rng=rng), Path(run.cfg.out) / "ckpt.pt")

# ----------------------------------------------------------------------------- the distillation step
def distil_step(cfg, step, batches, model, teacher_fwd, opt, scaler, grid, device, amp):
    """One optimizer step over --grad-accum micro-batches: views -> teacher -> student -> losses -> update.
    Returns ([loss, l_global, l_local], grad norm or None when the loss was not finite and the update skipped,
    tiles this rank skipped as unreadable)."""
    decay = lr_factor(step, cfg)
    for group, wd in zip(opt.param_groups, (cfg.weight_decay * decay, 0.0)):  # lr and weight decay decay together
        group["lr"], group["weight_decay"] = cfg.lr * decay, wd
    parts, n_bad = torch.zeros(3, device=device), 0
    for micro in range(cfg.grad_accum):
        x, skipped = next(batches)
        n_bad += int((skipped > 0).sum())
        xt, xs = make_views(x, cfg, step, micro, device)  # G2L: the same augmented view for both models
        xs = student_view(xs, cfg)
        sync = contextlib.nullcontext if rank_world()[1] == 1 or micro == cfg.grad_accum - 1 else model.no_sync
        with amp(), sync():
            with torch.no_grad():  # not inference_mode: these tensors enter the loss
                outs = [teacher_fwd(c) for c in xt.split(cfg.teacher_chunk or len(xt))]
                gt, pt = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
            gs, ls = model(xs, grid)
        l_g = pair_loss(cfg.global_loss, gs, gt, cfg.alpha)  # losses in fp32
        l_l = torch.zeros((), device=device) if ls is None else \
            pair_loss(cfg.local_loss, ls.flatten(0, 1), pt.flatten(2).transpose(1, 2).flatten(0, 1), cfg.alpha)
        loss = cfg.w_global * l_g + cfg.w_local * l_l
        with sync():
            scaler.scale(loss / cfg.grad_accum).backward()
        parts += torch.stack([loss.detach(), l_g.detach(), l_l.detach()]) / cfg.grad_accum
    scaler.unscale_(opt)
    gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad or math.inf))
    parts = parts.tolist()  # the same on every rank: the loss is global
    finite = math.isfinite(parts[0])
    if finite:  # else skip this update (the caller stops after three in a row)
        scaler.step(opt)
    scaler.update()  # fp16: after a skipped step this ends its unscale_ and lowers the scale
    opt.zero_grad(set_to_none=True)
    return parts, gnorm if finite else None, n_bad

# ----------------------------------------------------------------------------- the loop
def train_loop(run):
    """Steps until --steps, a stop signal, G2L's early stop or too many bad steps/tiles: (reason, exit code, last)."""
    cfg, (rank, world) = run.cfg, rank_world()
    student_flops = forward_flops(run.raw.backbone, cfg.student_img_size)  # forward + backward = 3 forwards
    run.flops = (forward_flops(run.teacher, cfg.img_size) + 3 * student_flops) * run.tiles_per_step
    run.peak = peak_flops(run.device, cfg.precision) * world
    n_bad = seen = 0  # unreadable tiles and tiles drawn, this session
    bad_steps = above = 0  # non-finite steps in a row; steps in a row above the running mean (--early-stop)
    recent, last = deque(maxlen=100), {}  # the last 100 losses; the last metrics row
    if run.val is not None and run.step == 0:
        run.baseline = evaluate(run.raw, run.teacher, run.spec_t, run.val, cfg, run.device, run.amp)
        print0(f"step {run.step:06d} | val cos {run.baseline['val_cos']:.4f} (raw {run.baseline['val_cos_raw']:.4f}) | "
               f"cka {run.baseline['val_cka']:.4f}")
    t0, n_timed = time.perf_counter(), 0
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    with tqdm(total=cfg.steps, initial=run.step, disable=rank != 0, desc="distil", dynamic_ncols=True) as bar:
        while run.step < cfg.steps:
            parts, gnorm, skipped = distil_step(cfg, run.step, run.batches, run.model, run.teacher_fwd, run.opt,
                                                run.scaler, run.grid, run.device, run.amp)
            run.samples += run.tiles_per_step  # all ranks' tiles: where a resumed sampler starts
            seen, n_bad = seen + run.tiles_per_step, n_bad + skipped
            if gnorm is None:  # three non-finite losses in a row means the run has diverged
                bad_steps += 1
                print0(f"warning: non-finite loss at step {run.step} ({bad_steps} in a row); update skipped")
                if bad_steps == 3:
                    return "stopped: 3 non-finite losses in a row; the weights are the last finite ones " \
                        "(lower --lr?)", 1, last
                continue
            bad_steps, run.step, n_timed = 0, run.step + 1, n_timed + 1
            bar.update(1)
            if cfg.early_stop:  # G2L's rule, read as: more than 10 steps in a row above the mean of the last 100
                above = above + 1 if len(recent) == 100 and parts[0] > sum(recent) / 100 else 0
                recent.append(parts[0])
                if above > 10:
                    return f"early stop at step {run.step}: loss above its last-100 running mean {above} steps " \
                        "in a row", 0, last
            evaluating = run.val is not None and (run.step % cfg.eval_every == 0 or run.step == cfg.steps)
            if run.step % cfg.log_every == 0 or run.step == cfg.steps or evaluating:
                bad = int(all_sum(torch.tensor(float(n_bad), device=run.device)))
                if bad > cfg.max_bad_frac * seen and bad > 10:
                    return f"stopped: {bad} of {seen} tiles were unreadable (over --max-bad-frac); " \
                        "see the warnings", 1, last
                last = log_step(run, parts, gnorm, n_timed, t0, bad, evaluating)
                t0, n_timed = time.perf_counter(), 0
            if run.step % cfg.ckpt_every == 0 and run.step < cfg.steps:
                save_checkpoint(run)
            if world > 1 and all_sum(torch.tensor(float(bool(run.stop)), device=run.device)) > 0:
                run.stop.setdefault("by", signal.SIGTERM)  # signals reach ranks at different steps: stop together
            if run.stop:
                return f"stopped by {run.stop['by'].name} at step {run.step}; continue with --resume auto", \
                    128 + run.stop["by"], last
    return "done", 0, last

def log_step(run, parts, gnorm, n_timed, t0, bad, evaluating):
    """One metrics.jsonl row and one log line (rank 0); validation agreement at eval steps."""
    cfg, (loss, l_g, l_l) = run.cfg, parts
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    dt = time.perf_counter() - t0
    lr, mem = run.opt.param_groups[0]["lr"], peak_memory_gb(run.device)
    last = dict(step=run.step, loss=round(loss, 5), l_global=round(l_g, 5), l_local=round(l_l, 5), lr=lr,
                grad_norm=round(gnorm, 4), img_per_s=round(n_timed * run.tiles_per_step / dt, 2),
                mfu=mfu(run.flops * n_timed / dt, run.peak), mem_gb=round(mem, 2), bad_tiles=bad)
    if evaluating:
        last.update(evaluate(run.raw, run.teacher, run.spec_t, run.val, cfg, run.device, run.amp))
    run.baseline.setdefault("loss", last["loss"])
    if rank_world()[0] == 0:
        with writing(run.metrics.name):  # a full disk: one line; the checkpoint and export are untouched
            run.metrics.write(json.dumps(last) + "\n")
            run.metrics.flush()
        tqdm.write(f"step {run.step:06d} | loss {loss:.4f} (g {l_g:.4f} l {l_l:.4f}) | lr {lr:.2e} | "
                   f"gnorm {gnorm:.2f} | {last['img_per_s']:.1f} img/s | mfu {pct(last['mfu'])} | {mem:.2f} GB"
                   + (f" | val cos {last['val_cos']:.4f} cka {last['val_cka']:.4f}" if "val_cos" in last else ""))
    return last

def summary(cfg, reason, baseline, last, out):
    parts = [f"{name} {baseline[k]:.4f} -> {last[k]:.4f}" for k, name in (("loss", "loss"), ("val_cos", "val cos"),
             ("val_cka", "val cka")) if k in baseline and k in last]
    print0(" | ".join([reason, *parts, f"{last.get('img_per_s', 0):.1f} img/s", f"mfu {pct(last.get('mfu'))}"]))
    if not cfg.synthetic:
        # the demo's hint must work as printed, offline: the student on the 200 labelled PCam tiles bundled in examples/
        labels = os.path.relpath(Path(__file__).resolve().parent / "examples" / "pcam" / "labels.csv")
        evaluate = (f"python eval.py probe --model {out} --data {labels} --out {out / 'eval'}" if cfg.demo else
                    f"python eval.py probe --model {cfg.teacher} --model {out} --data LABELS.csv  (a CSV: path,label)")
        print0(f"student: {out / 'student'}  ->  timm.create_model('local-dir:{out / 'student'}', pretrained=True)\n"
               f"evaluate: {evaluate}\n"
               f"a real run: python g2l.py --teacher h-optimus-0 --student uni --data tiles/ --out runs/NAME")

if __name__ == "__main__":
    main()
