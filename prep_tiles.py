"""prep_tiles.py: whole-slide images -> tile folders for g2l.py, at a physical resolution, with QC pictures.

    python prep_tiles.py examples/CMU-1-Small-Region.svs --out examples/tiles --mpp 0.5 --format jpg --quality 90
    python prep_tiles.py /data/slides/ --out tiles/ --mpp 0.5 --tile-size 224 --workers 8   # folders: recursive
    python prep_tiles.py crop.svs --out tiles/ --mpp-override 0.25   # the header has no mpp: you say what it is

Writes tiles/slides.csv, tiles/tiles.csv (path, slide_id, x, y per tile: g2l.py reads it instead of walking the folder),
tiles/<slide_id>/<slide_id>_x<X>_y<Y>.jpg (X, Y: level-0 top-left pixel), tiles/masks/<slide_id>.png (QC: tissue green,
tiles blue). A slide folder appears only when complete: a killed run resumes, skipping finished slides unless
--overwrite. Exit status: 0 ok, 1 a slide failed, 2 an argument error (found before any work), 128+n stopped by signal
n (SIGTERM: 143).
"""
import argparse, contextlib, csv, json, math, os, random, re, shutil, signal, sys, tempfile, time
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, BrokenExecutor, Future, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np
import openslide
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

# ---------------------------------- constants: the mask works in physical units so it behaves the same on every scanner
SLIDE_EXTS = {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm"}
COLUMNS = "slide_id path status error n_tiles mpp_level0 mpp_source read_level read_mpp seconds".split()
TILE_NAME = re.compile(r"_x(\d+)_y(\d+)\.\w+$")  # <slide_id>_x<X>_y<Y>.<format>, X, Y = level-0 top-left pixel
MPP_RANGE = (0.05, 20.0)     # µm/px; outside it a header value is a placeholder (a 72-dpi TIFF says 352.8)
MASK_MPP = 4.0               # µm/px of the tissue-mask thumbnail (a 224-px tile at 0.5 µm/px spans 28 mask px)
SAT_FLOOR = 15               # Otsu never goes below this saturation (0-255), so a blank slide stays blank
MEDIAN_PX, CLOSE_PX = 5, 5   # at MASK_MPP: 20 µm median blur (noise), 20 µm close (gaps between cells)
MIN_COMPONENT_UM2 = 10_000   # drop specks under 0.01 mm² (dust, debris)
QC_MAX_PX = 2048             # longest side of the saved QC picture
CACHE_MB = 256               # tile cache per open slide (OpenSlide's 32 MB drops JPEG rows the next reads need)
CHUNK = 128                  # tiles per worker job: every worker takes a share of a large slide's tiles
BAR = dict(mininterval=0.1 if sys.stderr.isatty() else 30)  # not a terminal (a log): a redraw every 30 s at most

# ----------------------------------------------------------- resolution: from the slide's own mpp, never from "level N"
def slide_mpp(slide, override=None):
    """(level-0 µm/px, source). The header wins; override is used only where the header has no plausible value."""
    p, seen = slide.properties, []
    unit = {"centimeter": 1e4, "inch": 25400.0}.get(p.get("tiff.ResolutionUnit"), float("nan"))
    for source, get in [("openslide.mpp-x", lambda: (float(p["openslide.mpp-x"]), float(p["openslide.mpp-y"]))),
                        ("aperio.MPP", lambda: (float(p["aperio.MPP"]),) * 2),
                        ("tiff.XResolution", lambda: (unit / float(p["tiff.XResolution"]),
                                                      unit / float(p["tiff.YResolution"])))]:
        try:
            x, y = get()
        except (KeyError, ValueError, ZeroDivisionError):
            continue  # absent or unparsable: try the next place
        if MPP_RANGE[0] <= x <= MPP_RANGE[1] and abs(x / y - 1) <= 0.02:
            return (x + y) / 2, source
        seen.append(f"{source}={x:g}x{y:g}")
    if override:
        return override, "override"
    raise ValueError("no usable mpp in the header (looked for openslide.mpp-x/y, aperio.MPP, tiff.XResolution + "
                     f"ResolutionUnit{'; implausible: ' + ', '.join(seen) if seen else ''}); pass --mpp-override "
                     "UM_PER_PX if you know the scan resolution (e.g. 0.25 for 40x, 0.5 for 20x)")

def choose_level(mpp0, downsamples, target, tol):
    """(level, level_mpp, resize): the coarsest level with mpp <= target (within tol); resize only outside tol.
    Not get_best_level_for_downsample: at boundaries it picks a finer level than asked."""
    mpps = [mpp0 * d for d in downsamples]
    ok = [i for i, m in enumerate(mpps) if m <= target * (1 + tol)]
    if not ok:
        raise ValueError(f"finest level is {mpps[0]:.4g} µm/px, coarser than --mpp {target} and this script never "
                         f"upsamples; use --mpp {mpps[0] / (1 + tol):.3g} or coarser")
    level = max(ok, key=lambda i: mpps[i])
    return level, mpps[level], abs(mpps[level] / target - 1) > tol

def tile_grid(w0, h0, footprint0, stride0):
    """Level-0 top-left (x, y) of every whole tile that fits, row by row; float geometry, rounded corners."""
    n = lambda size: int(math.floor((size - footprint0) / stride0 + 1e-9)) + 1 if size >= footprint0 else 0
    return [(round(i * stride0), round(j * stride0)) for j in range(n(h0)) for i in range(n(w0))]

# -------------------------------------------------------------------- tissue: numpy + Pillow only (no OpenCV, no scipy)
def read_rgb(slide, loc, level, size):
    """read_region composited onto white: OpenSlide returns outside-the-scan as transparent, i.e. black in RGB."""
    region = slide.read_region(loc, level, size)
    alpha = region.getchannel("A")
    if alpha.getextrema() == (255, 255):  # all inside the scan (nearly every tile): no compositing to pay for
        return region.convert("RGB")
    rgb = Image.new("RGB", size, "white")
    rgb.paste(region, mask=alpha)
    return rgb

def thumbnail(slide, mpp0, mask_mpp):
    """The whole slide at mask_mpp µm/px, read in strips so single-level giant TIFFs stay in bounded memory."""
    level = max((i for i, d in enumerate(slide.level_downsamples) if mpp0 * d <= mask_mpp), default=0)
    ds, (lw, lh) = slide.level_downsamples[level], slide.level_dimensions[level]
    scale = mpp0 * ds / mask_mpp  # level px -> thumbnail px (<= 1)
    thumb = Image.new("RGB", (max(1, round(lw * scale)), max(1, round(lh * scale))), "white")
    step = max(2 ** 24 // lw, math.ceil(4 / scale))  # ~16 Mpx per strip
    for y in range(0, lh, step):
        y0, y1 = round(y * scale), round(min(y + step, lh) * scale)  # cumulative rounding: strips tile the rows
        if y1 > y0:
            strip = read_rgb(slide, (0, round(y * ds)), level, (lw, min(step, lh - y)))
            thumb.paste(strip.resize((thumb.width, y1 - y0), Image.Resampling.BOX), (0, y0))
    return thumb

def drop_small(mask, min_px):
    """Remove 8-connected components smaller than min_px: union-find over the horizontal runs of each row."""
    parent, size, runs, prev = [], [], [], (np.empty(0, int), np.empty(0, int), 0)
    def find(i):
        while parent[i] != i:
            parent[i] = i = parent[parent[i]]
        return i
    for r, row in enumerate(mask):
        d = np.diff(row.astype(np.int8), prepend=0, append=0)
        s, e = np.flatnonzero(d == 1), np.flatnonzero(d == -1)  # runs [s, e)
        base, (ps, pe, pbase) = len(runs), prev
        lo, hi = np.searchsorted(pe, s, "left"), np.searchsorted(ps, e, "right")  # runs above touching this one
        for k in range(len(s)):
            parent.append(base + k), size.append(int(e[k] - s[k])), runs.append((r, s[k], e[k]))
            for j in range(pbase + lo[k], pbase + hi[k]):
                a, b = find(base + k), find(j)
                if a != b:
                    parent[a], size[b] = b, size[b] + size[a]
        prev = (s, e, base)
    out = np.zeros(mask.shape, bool)
    for i, (r, a, b) in enumerate(runs):
        out[r, a:b] = size[find(i)] >= min_px
    return out

def tissue_mask(thumb, mask_mpp=MASK_MPP):
    """Tissue = saturated pixels: HSV saturation, median blur, Otsu with a floor, close, drop small components."""
    sat = thumb.convert("HSV").getchannel("S").filter(ImageFilter.MedianFilter(MEDIAN_PX))
    p = np.bincount(np.asarray(sat).ravel(), minlength=256) / (sat.width * sat.height)
    w, mu = np.cumsum(p), np.cumsum(p * np.arange(256))  # Otsu: maximise the between-class variance
    t = max(int(np.argmax((mu[-1] * w - mu) ** 2 / (w * (1 - w) + 1e-12))), SAT_FLOOR)
    return drop_small(close(np.asarray(sat) > t, CLOSE_PX), MIN_COMPONENT_UM2 / mask_mpp ** 2)

def close(mask, k):
    """Binary close (dilate, erode) with a k x k square, edges replicated: Pillow's Max- then MinFilter, 15x faster."""
    for op in (np.maximum, np.minimum):
        p = np.pad(mask, k // 2, mode="edge")
        p = op.reduce([p[:, i:i + mask.shape[1]] for i in range(k)])
        mask = op.reduce([p[i:i + mask.shape[0]] for i in range(k)])
    return mask

def tissue_fraction(mask, tiles, footprint0, dims):
    """Tissue fraction of each tile's level-0 footprint, read off the mask through an integral image."""
    ii = np.pad(mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    xy, (h, w) = np.asarray(tiles, float).reshape(-1, 2), mask.shape
    c0, r0 = [np.clip(np.round(xy[:, k] * n / dims[k]).astype(int), 0, n - 1) for k, n in [(0, w), (1, h)]]
    c1, r1 = [np.clip(np.round((xy[:, k] + footprint0) * n / dims[k]).astype(int), lo + 1, n)
              for k, n, lo in [(0, w, c0), (1, h, r0)]]
    return (ii[r1, c1] - ii[r0, c1] - ii[r1, c0] + ii[r0, c0]) / ((c1 - c0) * (r1 - r0))

def save_qc(thumb, mask, tiles, footprint0, dims, dest):
    """QC picture: the thumbnail with tissue tinted green and every kept tile outlined in blue."""
    green = Image.blend(thumb, Image.new("RGB", thumb.size, (0, 160, 0)), 0.35)
    img = Image.composite(green, thumb, Image.fromarray(mask.astype(np.uint8) * 255))
    draw, sx, sy = ImageDraw.Draw(img), thumb.width / dims[0], thumb.height / dims[1]
    for x, y in tiles:
        draw.rectangle([x * sx, y * sy, (x + footprint0) * sx, (y + footprint0) * sy], outline=(0, 0, 255))
    img.thumbnail((QC_MAX_PX, QC_MAX_PX))
    with atomic_open(dest, "wb") as f:
        img.save(f, format="PNG", compress_level=1)  # same pixels, 8x faster than the default level 6

# ---------------------------------------------------------------------------------------------- one slide -> one folder
def plan_slide(path, out, slide_id, mpp=0.5, tile_size=224, overlap=0, mpp_tolerance=0.05, min_tissue=0.5,
               max_tiles=0, seed=0, mpp_override=None):
    """Choose one slide's level, find its tissue tiles, save its QC picture: (row fields, tiles, cut_tiles' args)."""
    tmp = out / f".tmp_{slide_id}"
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a killed run
    try:
        slide = openslide.OpenSlide(str(path))
    except Exception as e:
        raise ValueError(f"cannot open ({type(e).__name__}: {e}); not a format OpenSlide reads, or a corrupt or "
                         "partial copy: re-copy or convert it") from None
    with slide:
        mpp0, source = slide_mpp(slide, mpp_override)
        level, lmpp, resize = choose_level(mpp0, slide.level_downsamples, mpp, mpp_tolerance)
        out_mpp, dims, mask_mpp = mpp if resize else lmpp, slide.dimensions, max(MASK_MPP, mpp0)
        fp0, st0 = tile_size * out_mpp / mpp0, (tile_size - overlap) * out_mpp / mpp0  # footprint, stride (lvl 0)
        thumb = thumbnail(slide, mpp0, mask_mpp)
        mask = tissue_mask(thumb, mask_mpp)
        grid = tile_grid(*dims, fp0, st0)
        tiles = [t for t, f in zip(grid, tissue_fraction(mask, grid, fp0, dims)) if f >= min_tissue]
        if max_tiles and len(tiles) > max_tiles:  # seeded per slide: the same sample whatever the worker order
            tiles = sorted(random.Random(f"{seed}:{slide_id}").sample(tiles, max_tiles), key=lambda t: t[::-1])
        if tiles:  # a slide without tissue gets no folder: its row and QC picture say so
            tmp.mkdir(parents=True)
        (out / "masks").mkdir(exist_ok=True)
        save_qc(thumb, mask, tiles, fp0, dims, out / "masks" / f"{slide_id}.png")
    empty = (f"no tile has >= {min_tissue:.0%} tissue (see masks/{slide_id}.png); lower --min-tissue if the stain is "
             "faint" if grid else f"slide {dims[0]}x{dims[1]} px is smaller than one {tile_size}-px tile at "
             f"{out_mpp:.3g} µm/px; use a smaller --tile-size or a coarser --mpp")
    row = dict(status="ok" if tiles else "no_tissue", error="" if tiles else empty, n_tiles=len(tiles),
               mpp_level0=f"{mpp0:.4f}", mpp_source=source, read_level=level, read_mpp=f"{out_mpp:.4f}")
    return row, tiles, dict(path=path, out=out, slide_id=slide_id, level=level, tile_size=tile_size, resize=resize,
                            read_px=round(tile_size * out_mpp / lmpp))  # tile side at the read level

def cut_tiles(tiles, path, out, slide_id, level, read_px, tile_size, resize, fmt="jpg", quality=90, progress=False):
    """Read and save tiles (a slide's, or one worker's share) into the slide's temp folder, one read_region a tile."""
    with openslide.OpenSlide(str(path)) as slide, \
            tqdm(tiles, desc=slide_id[:20], unit="tile", leave=False, disable=not progress, **BAR) as bar:
        with contextlib.suppress(AttributeError, openslide.OpenSlideError):  # OpenSlide < 4.0 keeps its own cache
            slide.set_cache(openslide.OpenSlideCache(CACHE_MB << 20))  # 6-12% more tiles/s cutting a 40x slide
        for x, y in bar:
            tile = read_rgb(slide, (x, y), level, (read_px, read_px))
            if resize:  # 40x -> 20x reads 448 px for 224: a box average in C (Image.reduce, ~15x cheaper than
                f = read_px // tile_size  # LANCZOS), any other factor a LANCZOS resize
                tile = tile.reduce(f) if f * tile_size == read_px else tile.resize((tile_size,) * 2, Image.LANCZOS)
            tile.save(out / f".tmp_{slide_id}" / f"{slide_id}_x{x}_y{y}.{fmt}", quality=quality)

def error_line(e):
    """A failed slide's error column: our own ValueErrors as they are, a read error with its fix, others by type."""
    if isinstance(e, openslide.OpenSlideError):
        e = ValueError(f"read failed ({e}); the file is corrupt or truncated: re-copy or re-export it")
    elif isinstance(e, BrokenExecutor):  # its worker died, e.g. a crash inside the C library
        e = RuntimeError(f"worker crashed ({type(e).__name__}: {e})")
    return (str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}").replace("\n", " ")

# ----------------------------------------------------------------------------------- many slides -> tiles/ + slides.csv
def find_slides(inputs):
    """[(slide_id, path)] from files and folders (recursive). A DICOM slide is a series of .dcm files: one per folder
    (OpenSlide opens the whole series from any of its files), named after the folder if the series is alone there."""
    found, dicom_dirs = [], set()
    for p in map(Path, inputs):
        for f in [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.suffix.lower() in SLIDE_EXTS):
            if f.suffix.lower() == ".dcm" and p.is_dir():
                if f.parent not in dicom_dirs:  # named after its folder when that holds this series alone
                    alone = all(g.suffix.lower() == ".dcm" for g in f.parent.iterdir() if g.is_file())
                    dicom_dirs.add(f.parent), found.append((f.parent.name if alone else f.stem, f))
            elif f.is_file():
                found.append((f.stem, f))
    return found

def run_here(fn, *args, **kw):
    """fn's result as a finished future: the pool's interface, run in this process."""
    fut = Future()
    try:
        fut.set_result(fn(*args, **kw))
    except Exception as e:
        fut.set_exception(e)
    return fut

def run_slides(todo, out, workers, plan_opts, cut_opts, record):
    """Slides here one after another (workers=1: simplest to debug, a per-tile progress bar), or over processes: one
    plans a slide while the others cut planned slides' tiles, CHUNK a job, planned slides first, so one large slide
    never leaves a core idle. record(row) returns True to stop (--fail-fast): new slides never start."""
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    submit, cap = (pool.submit, 2 * workers) if pool else (run_here, 1)
    pending, chunks, running, slides, stop = deque(todo), deque(), {}, {}, False
    with pool or contextlib.nullcontext():
        while running or chunks or (pending and not stop):
            while len(running) < cap and (chunks or (pending and not stop)):
                if chunks:
                    sid, share = chunks.popleft()
                    job = submit(cut_tiles, share, **slides[sid]["plan"], **cut_opts, progress=not pool)
                else:
                    sid, path = pending.popleft()
                    slides[sid] = dict(row=dict(slide_id=sid, path=str(path)), t_start=time.time())
                    job = submit(plan_slide, path, out, sid, **plan_opts)
                running[job] = sid
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for job in done:
                sid = running.pop(job)
                if (s := slides.get(sid)) is None:
                    continue  # a chunk of a slide that has already failed
                try:
                    result = job.result()  # a plan's, or None from a cut
                    if "plan" not in s:
                        fields, tiles, s["plan"] = result
                        s["row"] |= fields
                        n = CHUNK if pool else max(1, len(tiles))  # in this process: one job a slide
                        chunks.extend((sid, tiles[i:i + n]) for i in range(0, len(tiles), n))
                    if sid in running.values() or any(c[0] == sid for c in chunks):
                        continue  # more of its tiles to cut
                    if s["row"]["n_tiles"]:
                        shutil.rmtree(out / sid, ignore_errors=True)  # only with --overwrite (else finished = skipped)
                        os.replace(out / f".tmp_{sid}", out / sid)  # a slide folder appears only when complete
                except Exception as e:  # the slide failed (any stage), or its worker died: nothing of it is kept
                    shutil.rmtree(out / f".tmp_{sid}", ignore_errors=True)
                    (out / "masks" / f"{sid}.png").unlink(missing_ok=True)
                    s["row"] |= dict(status="failed", error=error_line(e), n_tiles=0)
                    chunks = deque(c for c in chunks if c[0] != sid)
                del slides[sid]
                stop = record(s["row"] | dict(seconds=f"{time.time() - s['t_start']:.2f}")) or stop

# --------------------------------------------------------------------------- the run's files: csv and json, atomically
@contextlib.contextmanager
def atomic_open(path, mode="w", **kw):
    """Write to path.tmp, renamed over path at the end: never half a file (g2l.py has one; importing it loads torch)."""
    try:
        with open(f"{path}.tmp", mode, **kw) as f:
            yield f
        os.replace(f"{path}.tmp", path)
    finally:
        Path(f"{path}.tmp").unlink(missing_ok=True)  # a failed write leaves no temp file behind

def write_csv(path, rows, columns=COLUMNS):
    with atomic_open(path, newline="") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore", lineterminator="\n")  # csv's default is \r\n
        w.writeheader(), w.writerows(rows)

def finished_slides(out):
    """The finished slide folders in out/: temp folders start with a dot, QC pictures live in masks/."""
    return sorted(e.name for e in os.scandir(out) if e.is_dir() and e.name[0] != "." and e.name != "masks")

def write_manifest(out):
    """tiles.csv, every tile of out/'s finished slides: g2l.py reads it instead of walking millions of files."""
    tiles = (dict(path=f"{sid}/{name}", slide_id=sid, x=m[1], y=m[2]) for sid in finished_slides(out)
             for name in sorted(os.listdir(out / sid)) if (m := TILE_NAME.search(name)))  # streamed, not held
    write_csv(out / "tiles.csv", tiles, ["path", "slide_id", "x", "y"])

def check_settings(ap, out, opts, resuming):
    """An argument error if out/ holds slides cut with other settings (out/prep_tiles.json), else writes them."""
    path = out / "prep_tiles.json"
    old = json.loads(path.read_text()) if resuming and path.exists() else opts
    if diff := [f"--{k.replace('_', '-').replace('fmt', 'format')} {old.get(k)} (now {opts.get(k)})"
                for k in sorted(set(old) | set(opts)) if old.get(k) != opts.get(k)]:
        ap.error(f"{out} holds slides tiled with other settings: {', '.join(diff)}; rerun with those settings to "
                 "resume, add --overwrite to redo every slide, or choose another --out")
    with atomic_open(path) as f:
        json.dump(opts, f, indent=1)

# ------------------------------------------------------------------------------------------------ options and the run
def parse_args(argv):
    """Options, checked: (parser, options, [(slide id, path)]); every problem is an argument error (exit 2)."""
    fmt = type("Fmt", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {})
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)  # the docstring as written, and defaults
    ap.add_argument("inputs", nargs="+", help="slide files and/or folders (searched recursively)")
    ap.add_argument("--out", default="tiles", help="output folder")
    ap.add_argument("--mpp", type=float, default=0.5, help="target µm/px (0.5 = the teachers' native 20x)")
    ap.add_argument("--tile-size", type=int, default=224, help="tile side, px at the target resolution")
    ap.add_argument("--overlap", type=int, default=0, help="overlap of neighbouring tiles, px at the target")
    ap.add_argument("--mpp-tolerance", type=float, default=0.05, help="use a level as is when this close (fraction)")
    ap.add_argument("--min-tissue", type=float, default=0.5, help="min tissue fraction of a tile's footprint")
    ap.add_argument("--max-tiles", type=int, default=0, help="max tiles per slide, random seeded sample (0 = all)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the --max-tiles sample")
    ap.add_argument("--format", choices=["jpg", "png"], default="jpg", help="tile file format")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality")
    ap.add_argument("--workers", type=int, default=1,
                    help=f"processes that plan slides and cut their tiles, {CHUNK} a job (one large slide uses all)")
    ap.add_argument("--mpp-override", type=float,
                    help="level-0 µm/px for slides whose header has no usable mpp (without it they fail)")
    ap.add_argument("--overwrite", action="store_true",
                    help="redo finished slides; without it they are skipped (resume, with the same settings only)")
    ap.add_argument("--fail-fast", action="store_true", help="stop at the first failed slide")
    a = ap.parse_args(argv)
    if a.tile_size < 1 or not 0 <= a.overlap < a.tile_size:
        ap.error(f"--overlap {a.overlap} must be >= 0 and < --tile-size {a.tile_size}, or tiles never advance")
    for flag, v in [("--mpp", a.mpp), ("--mpp-override", a.mpp_override)]:
        if v is not None and not MPP_RANGE[0] <= v <= MPP_RANGE[1]:
            ap.error(f"{flag} {v} µm/px is implausible; give a value in {MPP_RANGE[0]}-{MPP_RANGE[1]} µm/px")
    if a.workers < 1 or not 0 <= a.min_tissue <= 1:
        ap.error("--workers must be >= 1, and --min-tissue in [0, 1]")
    if missing := [p for p in a.inputs if not Path(p).exists()]:
        ap.error(f"input not found: {', '.join(missing)}")
    if other := [p for p in a.inputs if Path(p).is_file() and Path(p).suffix.lower() not in SLIDE_EXTS]:
        ap.error(f"{other[0]} is not a slide file (not {' '.join(sorted(SLIDE_EXTS))}); name slides or their folders")
    if not (slides := find_slides(a.inputs)):
        ap.error(f"no slides found in {' '.join(a.inputs)} (looked for {' '.join(sorted(SLIDE_EXTS))}); point at the "
                 "slide files or the folder holding them")
    ids = Counter(sid for sid, _ in slides)
    if dups := [f"{sid}: {p}" for sid, p in slides if ids[sid] > 1 or sid == "masks"]:
        ap.error(f"duplicate or reserved slide ids ({'; '.join(dups)}); rename the files or tile them into separate "
                 "--out folders")
    return ap, a, slides

def main(argv=None):
    ap, a, slides = parse_args(argv)
    out = Path(a.out)
    try:  # a file or read-only --out is an argument error: found before any slide is read
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        print(f"error: --out {out} is not a writable folder ({e.strerror}); choose a folder you can write to",
              file=sys.stderr)
        return 2
    plan_opts = dict(mpp=a.mpp, tile_size=a.tile_size, overlap=a.overlap, mpp_tolerance=a.mpp_tolerance,
                     seed=a.seed, min_tissue=a.min_tissue, max_tiles=a.max_tiles, mpp_override=a.mpp_override)
    cut_opts = dict(fmt=a.format, quality=a.quality)
    check_settings(ap, out, plan_opts | cut_opts, bool(finished_slides(out)) and not a.overwrite)
    old = (out / "slides.csv").read_text().splitlines() if (out / "slides.csv").exists() else []
    old = {r["slide_id"]: r for r in csv.DictReader(old)}  # a skipped slide's row keeps its mpp details
    rows = {sid: old.get(sid, {}) | dict(slide_id=sid, path=str(p), status="skipped", error="", seconds="0.00",
                                         n_tiles=len(os.listdir(out / sid)))
            for sid, p in slides if (out / sid).is_dir() and not a.overwrite}  # whole: renamed into place when done
    todo = [(sid, p) for sid, p in slides if sid not in rows]

    def record(row):  # rewrite slides.csv after every slide, so a killed run keeps what it finished
        bar.update()
        rows[row["slide_id"]] = row
        if row["status"] in ("failed", "no_tissue"):
            tqdm.write(f"{row['status']}: {row['path']}: {row['error']}", file=sys.stderr)
        write_csv(out / "slides.csv", [rows[sid] for sid, _ in slides if sid in rows])
        return a.fail_fast and row["status"] == "failed"

    write_csv(out / "slides.csv", [rows[sid] for sid, _ in slides if sid in rows])  # even when all are skipped
    (out / "tiles.csv").unlink(missing_ok=True)  # rewritten at the end: never stale while tiles change
    t0, default = time.time(), signal.signal(signal.SIGTERM, interrupt)
    try:
        with tqdm(total=len(todo), desc="slides", unit="slide", **BAR) as bar:
            run_slides(todo, out, a.workers, plan_opts, cut_opts, record)
    except KeyboardInterrupt as e:  # Ctrl-C, or a scheduler's SIGTERM through interrupt()
        n = e.args[0] if e.args else signal.SIGINT
        print(f"stopped by {signal.Signals(n).name}: finished slides are kept; rerun the same command to resume",
              file=sys.stderr)
        return 128 + n
    finally:
        signal.signal(signal.SIGTERM, default)
    write_manifest(out)
    dt, n = time.time() - t0, Counter(r["status"] for r in rows.values())
    made = sum(int(r["n_tiles"]) for r in rows.values() if r["status"] != "skipped")
    print(f"slides: {n['ok']} ok, {n['no_tissue']} no_tissue, {n['failed']} failed, {n['skipped']} skipped, "
          f"{len(slides) - len(rows)} not run | {made} tiles in {dt:.1f} s, {made / max(dt, 1e-9):.1f} tiles/s")
    return 1 if n["failed"] else 0

def interrupt(signum, frame):
    raise KeyboardInterrupt(signum)  # unwinds like Ctrl-C: the pool is shut down, slides.csv stays whole

if __name__ == "__main__":
    sys.exit(main())
