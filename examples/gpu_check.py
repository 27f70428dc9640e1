"""gpu_check.py: the first GPU hour, prepared. Proves g2l on a CUDA machine and measures the paper's pair.

    python examples/gpu_check.py                    # <= 8 min on one H100/H200: every section
    python examples/gpu_check.py --quick            # <= 3 min: correctness, the pair at batch 32 (eager), inference
    python examples/gpu_check.py --limit 300        # any other wall-clock limit, in seconds

It needs the repository and torch, timm, pillow, numpy, tqdm, safetensors (no openslide, no hub: every model is
a random-init architecture). It drives g2l.py and eval.py through their command lines, writes OUT/gpu_check.json
and prints one markdown table. Sections (each guarded: a failure is one row, and the next section still runs):
  correctness  small models on the bundled tiles: fp32 / bf16 / fp16 curves agree, compile on = off, SIGTERM saves
               and exports, --resume continues the same curve, torchrun runs, the export reloads in plain timm
  pair         H-optimus-0's architecture -> Hibou-L's, 224 px, bf16, compiled, --synthetic, batch 32
  split        the same step cut in two (teacher forward | student forward + backward + AdamW), timm's
               FeatureDistillationTask on the same pair, and the largest batch that fits
  data         the real loader's tiles/s per worker at 224 px (eval.py bench-data) against what the step needs
  inference    eval.py bench of both architectures in bf16: student / teacher images/s
  memory       the pair eager: plain, with --teacher-chunk 8, with --grad-checkpointing (speed and peak memory)
Whatever needs two GPUs is skipped with one line on one. On a machine without CUDA the same script runs at toy
size (tiny models, in one process) so the test suite keeps it working: its figures mean nothing there.
"""
import argparse, contextlib, functools, gc, io, json, math, os, shutil, signal, subprocess, sys, threading, time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
import g2l  # noqa: E402  (names used: load_model, encode, Student, pair_loss, forward_flops, peak_flops, main)

TILES = HERE / "tiles"  # 43 real CC0 tiles of 224 px (examples/LICENSE-data.md)
# Relative loss tolerances against the fp32 (or eager) run. Step 1 is before any update: the forward's rounding
# alone (bf16 keeps 8 mantissa bits, fp16 11). The whole curve also carries the updates' rounding, and fp16's
# GradScaler skips its first steps while it finds its scale (2^16 at the start): the curve then lags a step or two.
TOL_STEP1 = dict(bf16=1e-2, fp16=3e-3, compile=1e-2)  # a GPU's fp32 reference runs TF32 matmuls (g2l sets them)
TOL_CURVE = dict(bf16=0.03, fp16=0.03, compile=0.03, resume=1e-4)
SIZES = dict(  # what each section runs: on a GPU, and at toy size on CPU
    gpu=dict(small_t='{"depth": 2, "embed_dim": 192, "num_heads": 3, "global_pool": "avg"}',
             small_s='{"depth": 2}', small_px=112, small_bs=16, steps=30, more=5, workers=2,
             pair_t="", pair_s="", pair_px=224, pair_bs=32, pair_steps=30, cap=1024, iters=10),
    toy=dict(small_t='{"depth": 1, "embed_dim": 64, "num_heads": 2, "global_pool": "avg"}',
             small_s='{"depth": 1, "embed_dim": 48, "num_heads": 2}', small_px=28, small_bs=8, steps=4, more=2,
             workers=0,
             pair_t='{"depth": 1, "embed_dim": 96, "num_heads": 2}',
             pair_s='{"depth": 1, "embed_dim": 48, "num_heads": 2}',
             pair_px=28, pair_bs=4, pair_steps=4, cap=8, iters=2))
# seconds, at most, per section; a section starts only with 30 s left. A cold inductor cache dominates: ViT-g's
# forward and ViT-L's forward + backward compile in a minute or two, once (later processes hit the cache)
BUDGET = dict(correctness=150, pair=180, split=150, data=30, inference=60, memory=90)

# ----------------------------------------------------------------------------- running g2l / eval / torchrun
class Runner:
    """Commands as a user types them: a subprocess each on a GPU (own CUDA context, peak memory and timeout);
    in this process on CPU, where a Python start costs more than the toy run's whole budget."""
    def __init__(self, out, in_process, deadline):
        self.out, self.in_process, self.deadline = Path(out), in_process, deadline

    def start(self, tool, args, timeout):
        """A running command: (process or finished result, log file). tool: g2l | eval | torchrun."""
        log = self.out / f"log_{len(list(self.out.glob('log_*')))}_{tool}.txt"
        if self.in_process:
            return self._inline(tool, args, log), log
        cmd = {"g2l": [sys.executable, str(ROOT / "g2l.py")], "eval": [sys.executable, str(ROOT / "eval.py")],
               "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                            str(ROOT / "g2l.py")]}.get(tool)
        if tool == "torchrun2":  # two processes, one GPU each: DDP over NCCL
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   str(ROOT / "g2l.py")]
        fh = open(log, "w")
        p = subprocess.Popen(cmd + [str(a) for a in args], stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                             start_new_session=True)  # its own group: a timeout ends it and its loader workers
        p.timeout_at, p.fh = time.time() + min(timeout, self.deadline - time.time()), fh
        return p, log

    def _inline(self, tool, args, log):
        import eval as ev
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                {"g2l": g2l.main, "eval": ev.main}[tool]([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
            buf.write(f"{e.code}\n" if not isinstance(e.code, int) else "")
        log.write_text(buf.getvalue())
        return code

    def wait(self, started):
        """(exit code, log text); a command past its time is ended (exit code 'timeout')."""
        p, log = started
        if isinstance(p, int):
            return p, log.read_text()
        try:
            code = p.wait(timeout=max(1.0, p.timeout_at - time.time()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            code = "timeout"
        p.fh.close()
        return code, log.read_text()

    def run(self, tool, args, timeout):
        return self.wait(self.start(tool, args, timeout))

def last_line(log):
    lines = [l for l in log.splitlines() if l.strip() and not l.startswith(("distil", "\r"))]
    return lines[-1][:160] if lines else "(no output)"

def ok_or_raise(code, log, what):
    if code != 0:
        raise RuntimeError(f"{what}: exit {code}: {last_line(log)}")

def metrics(folder):
    """The rows of a run's metrics.jsonl so far (a line being written is not a row yet)."""
    path, rows = Path(folder) / "metrics.jsonl", []
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows

def max_rel_diff(a, b, steps=None):
    """Largest per-step relative difference of two loss curves (rows of metrics.jsonl), over the steps both have."""
    pairs = [(x["loss"], y["loss"]) for x, y in list(zip(a, b))[:steps]]
    if not pairs or any(not math.isfinite(x) or not math.isfinite(y) for x, y in pairs):
        return math.inf
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in pairs)

# ----------------------------------------------------------------------------- 1. correctness
def small_args(s, out, *extra):
    """A short run of small models on the bundled tiles. The learning rate is still warming up at every step these
    runs reach, so runs of different --steps follow one curve (the resume check needs that)."""
    return ["--teacher", "vit_small_patch14_dinov2", "--teacher-kwargs", s["small_t"], "--teacher-weights", "random",
            "--student", "vit_tiny_patch16_224", "--student-kwargs", s["small_s"], "--student-weights", "random",
            "--data", TILES, "--img-size", s["small_px"], "--batch-size", s["small_bs"], "--workers", s["workers"],
            "--warmup-steps", 100000, "--lr", 2, "--log-every", 1, "--eval-every", 100000, "--ckpt-every", 100000,
            "--seed", 0, "--out", out, *extra]

def killed_run(r, s, out, timeout):
    """A run stopped by SIGTERM (to its process group, as Slurm does) once it has logged a few steps."""
    args = small_args(s, out, "--precision", "bf16", "--compile", "off", "--steps", 100000)
    if r.in_process:  # the signal goes to this process, whose handler g2l.main has set while the run is going on
        done = threading.Event()
        def kill_later():  # only once the run has logged (so g2l's handler is set) and never after it returned
            end = time.time() + timeout
            while time.time() < end and not done.is_set() and len(metrics(out)) < 3:
                time.sleep(0.02)
            if not done.is_set() and len(metrics(out)) >= 3:
                os.kill(os.getpid(), signal.SIGTERM)
        threading.Thread(target=kill_later, daemon=True).start()
        try:
            return r.run("g2l", args, timeout)
        finally:
            done.set()
    p, log = started = r.start("g2l", args, timeout)
    while time.time() < p.timeout_at and len(metrics(out)) < 3 and p.poll() is None:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGTERM)
    return r.wait(started)

def check_precisions(r, s, out, budget, cuda):
    """fp32, bf16, fp16 and bf16 compiled, side by side (on a GPU as concurrent processes: only the losses matter)."""
    runs = {p: small_args(s, out / p, "--precision", p, "--compile", "off", "--steps", s["steps"])
            for p in ("fp32", "bf16", "fp16")}
    if cuda:  # inductor's CPU build takes minutes on two cores: compiled CPU steps are g2l's own test's job
        runs["compile"] = small_args(s, out / "compile", "--precision", "bf16", "--compile", "on",
                                     "--steps", s["steps"])
    started = {k: r.start("g2l", a, budget) for k, a in runs.items()}
    rows = []
    for k, st in started.items():
        code, log = r.wait(st)
        ok_or_raise(code, log, f"--precision {k}")
    for k in [k for k in runs if k != "fp32"]:
        ref = "bf16" if k == "compile" else "fp32"
        a, b = metrics(out / ref), metrics(out / k)
        d1, d = max_rel_diff(a, b, 1), max_rel_diff(a, b)
        skipped = sum(not math.isfinite(x["grad_norm"]) for x in b)  # fp16: updates the GradScaler skipped
        rows.append(row("correctness", f"{k} vs {ref}: loss curve", len(b) == s["steps"] and d1 <= TOL_STEP1[k]
                        and d <= TOL_CURVE[k], f"rel diff step 1 {d1:.1e} (tol {TOL_STEP1[k]:g}), any of "
                        f"{len(b)} steps {d:.1e} (tol {TOL_CURVE[k]:g})" + (f", {skipped} skipped" if skipped else ""),
                        step1=d1, curve=d, skipped=skipped))
    if not cuda:
        rows.append(row("correctness", "compile on vs off", None, "not run on CPU (inductor's C++ build: minutes)"))
    return rows

def check_stop_and_resume(r, s, out, budget):
    """SIGTERM saves and exports; --resume continues the curve of an uninterrupted run of the same length."""
    code, log = killed_run(r, s, out / "killed", budget)
    saved = (out / "killed" / "ckpt.pt").is_file() and (out / "killed" / "student" / "model.safetensors").is_file()
    k = metrics(out / "killed")[-1]["step"] if metrics(out / "killed") else 0
    rows = [row("correctness", "SIGTERM saves and exports", code == 143 and saved and "stopped by SIGTERM" in log,
                f"exit {code}, stopped at step {k}, ckpt + student/ {'written' if saved else 'MISSING'}")]
    n = s["more"]
    more = ["--precision", "bf16", "--compile", "off", "--steps", k + n]
    resumed = r.start("g2l", small_args(s, out / "killed", *more, "--resume", "auto"), budget)
    whole = r.start("g2l", small_args(s, out / "whole", *more), budget)
    for what, st in (("resume", resumed), ("whole", whole)):
        ok_or_raise(*r.wait(st), what)
    a, b = metrics(out / "killed")[k:], metrics(out / "whole")[k:]
    same = [x["loss"] for x in a] == [y["loss"] for y in b] and len(a) == n
    d = max_rel_diff(b, a)
    # bit-identical needs deterministic kernels; g2l does not ask for them (cuBLAS and SDPA's backward may reduce in
    # another order from run to run on a GPU), so on CUDA the check asks for close, and says which it got
    rows.append(row("correctness", "--resume continues the curve", len(a) == n and d <= TOL_CURVE["resume"],
                    f"steps {k + 1}-{k + n}: {'bit-identical' if same else f'max rel diff {d:.1e}'} vs an "
                    "uninterrupted run", bit_identical=same, rel_diff=d))
    return rows

def check_torchrun_and_export(r, s, out, budget, cuda):
    rows = []
    one = ["--precision", "bf16", "--compile", "off"]
    if cuda:  # WORLD_SIZE=1: g2l takes its one-process path (no process group), as a user's first torchrun does
        code, log = r.run("torchrun", small_args(s, out / "torchrun", *one, "--steps", 3), budget)
        n = len(metrics(out / "torchrun"))
        rows.append(row("correctness", "torchrun --nproc_per_node=1", code == 0 and n == 3,
                        f"exit {code}, {n} of 3 steps logged" + (f": {last_line(log)}" if code else "")))
    else:
        rows.append(row("correctness", "torchrun --nproc_per_node=1", None, "not run on CPU (a second Python start)"))
    if torch.cuda.device_count() < 2:
        rows.append(row("correctness", "DDP over NCCL, 2 processes", "skip",
                        f"needs 2 GPUs, this machine has {torch.cuda.device_count()}"))
    else:  # the same global batch over two ranks: g2l's losses are global, so the curve is the one-process one
        half = small_args(s, out / "ddp", *one, "--steps", s["steps"], "--batch-size", s["small_bs"] // 2)
        code, log = r.run("torchrun2", half, budget)
        d = max_rel_diff(metrics(out / "bf16"), metrics(out / "ddp")) if code == 0 else math.inf
        rows.append(row("correctness", "DDP over NCCL, 2 processes", d <= TOL_CURVE["bf16"],
                        f"exit {code}; vs one process, any of {s['steps']} steps {d:.1e} (tol {TOL_CURVE['bf16']:g})"))
    rows.append(reload_export(out / "killed" / "student", "cuda" if cuda else "cpu"))
    return rows

def reload_export(folder, device):
    """The exported student through plain timm on the device: same features as on CPU in fp32."""
    import timm
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    size = model.pretrained_cfg["input_size"][-1]
    x = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
        got = model.to(device)(x.to(device)).float().cpu()
    d = float((got - ref).abs().max() / ref.abs().max())
    return row("correctness", "export reloads in plain timm", d < 1e-3 and got.shape == ref.shape,
               f"{device} vs CPU features, max rel diff {d:.1e} (TF32 allowed)")

def correctness(r, s, out, budget, cuda):
    t_end = time.time() + budget
    rows = check_precisions(r, s, out, budget, cuda)
    rows += check_stop_and_resume(r, s, out, max(10, t_end - time.time()))
    return rows + check_torchrun_and_export(r, s, out, max(10, t_end - time.time()), cuda)

# ----------------------------------------------------------------------------- 2. the paper's pair through g2l.py
def pair_args(s, out, compile_, *extra):
    return ["--synthetic", "--teacher", "h-optimus-0", "--teacher-weights", "random",
            "--student", "hibou-l", "--student-weights", "random", "--w-local", 0, "--precision",
            "bf16" if torch.cuda.is_available() else "fp32", "--compile", compile_, "--img-size", s["pair_px"],
            "--batch-size", s["pair_bs"], "--steps", s["pair_steps"], "--warmup-steps", 1,
            "--log-every", max(1, s["pair_steps"] // 3), "--out", out, "--workers", 0, *extra,
            *(["--teacher-kwargs", s["pair_t"], "--student-kwargs", s["pair_s"]] if s["pair_t"] else [])]

def pair_figures(r, s, out, budget, compile_, *extra):
    """img/s, MFU and peak memory of g2l's own log, from its last row (the first rows carry the compile)."""
    code, log = r.run("g2l", pair_args(s, out, compile_, *extra), budget)
    ok_or_raise(code, log, "g2l.py --synthetic")
    last = metrics(out)[-1]
    return dict(img_per_s=last["img_per_s"], mfu=last["mfu"], mem_gb=last["mem_gb"], loss=last["loss"])

def fmt_speed(f):
    """img/s, MFU and peak memory in words (MFU n/a on CPU, or on a GPU missing from g2l's peak table)."""
    mfu = "n/a" if f.get("mfu") is None else f"{f['mfu']:.1f}%"
    mem = "n/a" if f.get("mem_gb") is None else f"{f['mem_gb']:.1f} GB"
    return f"{f['img_per_s']:.1f} img/s, MFU {mfu}, {mem}"

def pair(r, s, out, budget, quick):
    compile_ = "off" if quick or not torch.cuda.is_available() else "on"
    f = pair_figures(r, s, out, budget, compile_)
    goal = None if f["mfu"] is None else "met" if f["mfu"] >= 50 else "missed"
    return [row("pair", f"h-optimus-0 -> hibou-l, bs {s['pair_bs']}, compile {compile_}", goal,
                fmt_speed(f) + " (goal: MFU >= 50%)", **f)]

# ----------------------------------------------------------------------------- 3. split, timm, largest batch
def split(r, s, out, budget, measured):
    """In a child process on a GPU (its time can be bounded), here on CPU; rows stream into split.jsonl."""
    path = out / "split.jsonl"
    if r.in_process:
        split_worker(s, path, time.time() + budget)
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(path),
               "--worker-end", str(time.time() + budget - 5)]
        code, log = run_worker(cmd, out / "log_split.txt", budget)
    got = [json.loads(l) for l in path.read_text().splitlines()] if path.is_file() else []
    rows = [row("split", g["check"], g.get("ok"), g["note"], **g.get("figures", {})) for g in got]
    if not r.in_process and code != 0:  # what it measured before stopping is kept above
        rows.append(row("split", "(the rest)", "skip" if code == "timeout" else False,
                        f"not measured: the worker {'ran out of its time' if code == 'timeout' else f'exit {code}'}"
                        f" after {len(got)} of 3 measurements: {last_line(log)}"))
    timm_rate = next((g["figures"]["img_per_s"] for g in got if g["check"].startswith("timm")), None)
    if timm_rate and measured.get("img_per_s"):
        ratio = measured["img_per_s"] / timm_rate
        rows.append(row("split", "g2l.py step / timm's step", goal(ratio >= 1.0),
                        f"{ratio:.2f}x (g2l's whole step, augmentation included; goal >= 1.0)", ratio=ratio))
    return rows

def run_worker(cmd, log, budget):
    with open(log, "w") as fh:
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return p.wait(timeout=budget), log.read_text()
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return "timeout", log.read_text()

def timed(fn, iters, sync):
    fn()  # warm-up (and compilation)
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t) / iters

def emit(path, check, ok, note, **figures):
    with open(path, "a") as f:
        f.write(json.dumps(dict(check=check, ok=ok, note=note, figures=figures)) + "\n")

def build_pair(s, dev, cuda):
    """The paper's pair, random init, as g2l builds it: frozen teacher held in bf16, student + global head."""
    px = s["pair_px"]  # g2l's own set-up: the teacher frozen in bf16 (frozen_teacher), no local head (w_local 0)
    cfg = g2l.Config(img_size=px, student_img_size=px, w_local=0, precision="bf16" if cuda else "fp32", compile="off")
    teacher = g2l.frozen_teacher(cfg, *g2l.load_model("h-optimus-0", "random", s["pair_t"], px, dev), dev)
    backbone, ss = g2l.load_model("hibou-l", "random", s["pair_s"], px, dev)
    student = g2l.Student(cfg, backbone, ss, teacher.spec).to(dev)
    flops = teacher.flops + 3 * g2l.forward_flops(backbone, px)  # backward = 2 forwards
    return teacher.model, teacher.spec, student, flops

def step_fns(teacher, st, student, opt, x, amp, compiled):
    """(teacher forward, student forward + backward + AdamW given the teacher's output, the whole step) on x or
    on the batch given; compiled as g2l compiles them (the student module, the teacher's encode as a whole)."""
    t_fwd, s_fwd = (lambda v: g2l.encode(teacher, st, v)), student
    if compiled:
        t_fwd, s_fwd = torch.compile(t_fwd), torch.compile(student)
    def teacher_only(v=None):
        with torch.no_grad(), amp():
            return t_fwd(x if v is None else v).global_
    def student_only(gt, v=None):
        with amp():
            gs = s_fwd(x if v is None else v).global_
        g2l.pair_loss("logsum", gs, gt).backward()  # G2L's loss, in fp32
        opt.step()
        opt.zero_grad(set_to_none=True)
    return teacher_only, student_only, lambda v=None: student_only(teacher_only(v), v)

def split_worker(s, path, end):
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    amp = lambda: torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    peak = g2l.peak_flops(dev, "bf16" if cuda else "fp32")
    mfu = lambda rate: None if not math.isfinite(peak) else round(100 * rate * flops / peak, 1)
    teacher, st, student, flops = build_pair(s, dev, cuda)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=cuda)
    bs, px, it = s["pair_bs"], s["pair_px"], s["iters"]
    x = torch.rand(bs, 3, px, px, device=dev)
    t_only, s_only, whole = step_fns(teacher, st, student, opt, x, amp, cuda)
    gt = t_only()
    tt, ts, tw = timed(t_only, it, sync), timed(functools.partial(s_only, gt), it, sync), timed(whole, it, sync)
    emit(path, f"step split, bs {bs}{', compiled' if cuda else ''}", None,
         f"teacher fwd {tt * 1e3:.1f} ms ({100 * tt / tw:.0f}%) + student fwd/bwd/AdamW {ts * 1e3:.1f} ms "
         f"({100 * ts / tw:.0f}%) = {tw * 1e3:.1f} ms; " + fmt_speed(dict(img_per_s=bs / tw, mfu=mfu(bs / tw))),
         teacher_ms=tt * 1e3, student_ms=ts * 1e3, step_ms=tw * 1e3, img_per_s=bs / tw, mfu=mfu(bs / tw))
    if time.time() < end - 60:
        largest_batch(s, teacher, st, student, opt, amp, sync, path, end, mfu)
    del student, opt, t_only, s_only, whole  # timm's task gets the memory g2l's step had
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    if time.time() < end - 20:  # timm compiles its own graphs: its first step is the slow one
        rate, how = timm_rate(s, teacher, x, amp, sync, dev, cuda)
        emit(path, f"timm {how}, bs {bs}", None, f"{rate:.1f} img/s (same teacher, batch, precision, compile)",
             img_per_s=rate)

def timm_rate(s, teacher, x, amp, sync, dev, cuda):
    """Images/s of timm's own feature distillation (timm.task, else the plain loop it stands for): MSE between the
    teacher's pooled feature and the student's, projected; the same frozen teacher module."""
    import importlib.util
    student = g2l.load_model("hibou-l", "random", s["pair_s"], s["pair_px"], dev)[0]
    y = torch.zeros(len(x), dtype=torch.long, device=dev)
    if importlib.util.find_spec("timm.task"):
        from timm.task import FeatureDistillationTask
        task = FeatureDistillationTask(student, teacher, criterion=torch.nn.CrossEntropyLoss(), task_loss_weight=0.0,
                                       distill_loss_weight=1.0, device=dev, verbose=False)
        if cuda:
            task.compile()
        params, how, fwd = task.trainable_module.parameters(), "task.FeatureDistillationTask", lambda: task(x, y)
    else:
        proj = torch.nn.Linear(student.num_features, teacher.num_features, device=dev)
        s_fwd = torch.compile(student) if cuda else student
        def fwd():
            with torch.no_grad():
                t = teacher.forward_head(teacher.forward_features(x), pre_logits=True)
            return dict(loss=torch.nn.functional.mse_loss(proj(s_fwd(x)).float(), t.float()))
        params, how = [*student.parameters(), *proj.parameters()], "plain loop (no timm.task)"
    opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    def step():
        with amp():
            loss = fwd()["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return len(x) / timed(step, s["iters"], sync), how

def fits(step, bs, px, dev):
    """One eager step at this batch, or False when the GPU is out of memory (memory handed back for the next try)."""
    try:
        step(torch.rand(bs, 3, px, px, device=dev))
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    except RuntimeError as e:  # cuBLAS / cuDNN report a failed allocation in their own words
        if "CUBLAS_STATUS_ALLOC_FAILED" in str(e) or "out of memory" in str(e).lower():
            return False
        raise

def largest_batch(s, teacher, st, student, opt, amp, sync, path, end, mfu):
    """Double the batch from the paper's 32 until out of memory (or the cap), eager: no recompile per try."""
    dev, px, bs = next(student.parameters()).device, s["pair_px"], s["pair_bs"]
    step = step_fns(teacher, st, student, opt, None, amp, False)[2]
    best = bs
    while best * 2 <= s["cap"] and time.time() < end - 90:  # leave timm's compile its time
        ok = fits(step, best * 2, px, dev)
        opt.zero_grad(set_to_none=True)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if not ok:
            break
        best *= 2
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    x = torch.rand(best, 3, px, px, device=dev)
    rate = best / timed(lambda: step(x), s["iters"], sync)
    mem = torch.cuda.max_memory_allocated() / 1e9 if dev.type == "cuda" else None  # JSON has no NaN
    capped = " (the cap)" if best * 2 > s["cap"] else ""
    emit(path, f"largest batch, eager: {best}{capped}", None,
         fmt_speed(dict(img_per_s=rate, mfu=mfu(rate), mem_gb=mem)),
         batch=best, img_per_s=rate, mfu=mfu(rate), mem_gb=mem)

# ----------------------------------------------------------------------------- 4. data path, 5. inference, 6. memory
def tile_copies(out, n):
    """The bundled tiles n times over (hard links), so that a timed pass is many batches, not worker start-ups."""
    root = out / "tiles"
    for i, p in enumerate(sorted(TILES.rglob("*.jpg")) * n):
        (root / "s").mkdir(parents=True, exist_ok=True)
        dst = root / "s" / f"{i}_{p.name}"
        if not dst.exists():
            try:
                os.link(p, dst)
            except OSError:
                dst.write_bytes(p.read_bytes())
    return root

def data(r, s, out, budget, measured):
    cuda = torch.cuda.is_available()
    workers, load = (4, 256) if cuda else (0, s["pair_px"])  # g2l's default workers; the paper's 256 -> 224 crop
    args = ["bench-data", "--data", tile_copies(out, 30 if cuda else 1), "--img-size", s["pair_px"], "--load-size",
            load, "--batch-size", s["pair_bs"], "--workers", workers, "--batches", 20 if cuda else 2,
            "--out", out, "--device", "cuda" if cuda else "cpu"]
    code, log = r.run("eval", args, budget)
    ok_or_raise(code, log, "eval.py bench-data")
    got = {x["pipeline"]: x for x in json.loads((out / "bench-data.json").read_text())}
    loader = next(v for k, v in got.items() if "(g2l)" in k)
    device = next(v for k, v in got.items() if k.startswith("device augment"))
    need = measured.get("img_per_s")
    return [row("data", f"loader, {workers} workers, {load} px tiles -> {s['pair_px']} px",
                goal(loader["tiles_per_s"] >= need) if need else None,
                f"{loader['tiles_per_s']:.0f} tiles/s ({loader['per_worker']:.0f} per worker); the step needs "
                + (f"{need:.0f}" if need else "?"), tiles_per_s=loader["tiles_per_s"], per_worker=loader["per_worker"]),
            row("data", "augmentation on the device, batched", None, f"{device['tiles_per_s']:.0f} tiles/s",
                tiles_per_s=device["tiles_per_s"])]

def inference(r, s, out, budget):
    cuda = torch.cuda.is_available()
    kw = ["--model-kwargs", s["pair_t"], "--model-kwargs", s["pair_s"]] if s["pair_t"] else []
    args = ["bench", "--model", "h-optimus-0", "--model", "hibou-l", *kw, "--random-init", "--img-size", s["pair_px"],
            "--batch-sizes", s["pair_bs"], "--iters", s["iters"], "--dtype", "bf16" if cuda else "fp32",
            "--device", "cuda" if cuda else "cpu", "--out", out]
    code, log = r.run("eval", args, budget)
    ok_or_raise(code, log, "eval.py bench")
    teacher, student = json.loads((out / "bench.json").read_text())[:2]
    x = student["img_per_s"] / teacher["img_per_s"]
    return [row("inference", f"student / teacher, bs {s['pair_bs']}", goal(x >= 3.5),
                f"{x:.2f}x images/s (goal >= 3.5); teacher {teacher['img_per_s']:.1f} img/s "
                f"{teacher['peak_mem_gb']:.1f} GB, student {student['img_per_s']:.1f} img/s "
                f"{student['peak_mem_gb']:.1f} GB", ratio=x, teacher=teacher, student=student)]

def memory(r, s, out, budget):
    """The pair plain, with --teacher-chunk and with --grad-checkpointing, all eager: three compiles of ViT-g/ViT-L
    graphs would not fit the limit, and eager runs compare with one another."""
    rows, t_end, chunk = [], time.time() + budget, max(1, s["pair_bs"] // 4)
    for name, extra in (("plain", []), (f"teacher-chunk {chunk}", ["--teacher-chunk", chunk]),
                        ("grad-checkpointing", ["--grad-checkpointing"])):
        f = pair_figures(r, s, out / name.split()[0], max(10, t_end - time.time()), "off", *extra)
        base = rows[0]["figures"] if rows else f
        rows.append(row("memory", f"pair, eager, {'--' * bool(extra)}{name}", None, fmt_speed(f) + (
            f" ({f['img_per_s'] / base['img_per_s']:.2f}x the speed, {f['mem_gb'] / base['mem_gb']:.2f}x the "
            "memory of plain)" if extra else ""), **f))
    return rows

# ----------------------------------------------------------------------------- the table
def row(section, check, ok, note, **figures):
    """ok: True (ok) | False (FAIL: the exit code says so) | None (a figure) | "met" / "missed" (a goal) | "skip"."""
    status = {True: "ok", False: "FAIL", None: "-"}.get(ok, ok)
    return dict(section=section, check=check, status=status, note=note, figures=figures)

def goal(met):
    """A goal of the issue: met or missed on a GPU; on CPU only a figure."""
    return ("met" if met else "missed") if torch.cuda.is_available() else None

def table(rows):
    lines = ["| section | check | result | figures |", "|---|---|---|---|"]
    return "\n".join(lines + [f"| {r['section']} | {r['check']} | {r['status']} | {r['note']} |" for r in rows])

def environment(cuda):
    import timm
    gpu = torch.cuda.get_device_name() if cuda else "none (CPU toy run)"
    return dict(gpu=gpu, n_gpu=torch.cuda.device_count(), torch=torch.__version__, timm=timm.__version__,
                cuda=torch.version.cuda, python=sys.version.split()[0], date=time.strftime("%Y-%m-%d"))

def plan(r, s, out, quick, cuda):
    """(section, function of its time budget) in priority order: what matters most runs first."""
    measured = {}
    def pair_(b):
        rows = pair(r, s, out / "pair", b, quick)
        measured.update(rows[0]["figures"])
        return rows
    sections = [("correctness", lambda b: correctness(r, s, out / "correctness", b, cuda)), ("pair", pair_),
                ("split", lambda b: split(r, s, out, b, measured)), ("data", lambda b: data(r, s, out, b, measured)),
                ("inference", lambda b: inference(r, s, out, b)),
                ("memory", lambda b: memory(r, s, out / "memory", b))]
    return [x for x in sections if not quick or x[0] in ("correctness", "pair", "inference")]

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu_check", help="folder for gpu_check.json and the runs' folders")
    p.add_argument("--quick", action="store_true", help="correctness, the pair at batch 32 eager, inference (<= 3 min)")
    p.add_argument("--limit", type=float, default=0, help="wall-clock limit in seconds (default 470, --quick 175)")
    p.add_argument("--subprocess", action="store_true", help="on CPU too, one process per command, as on a GPU")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # the split section's child process
    p.add_argument("--worker-end", type=float, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    s = SIZES["gpu" if cuda else "toy"]
    if a.worker:
        return split_worker(s, Path(a.worker), a.worker_end)
    limit = a.limit or (175 if a.quick else 470)
    t0, out = time.time(), Path(a.out).resolve()  # commands run from the repository root
    work = out / "runs"
    shutil.rmtree(work, ignore_errors=True)  # a run folder left by an earlier check would be resumed or misread
    work.mkdir(parents=True)
    env = environment(cuda)
    toy = "" if cuda else "CPU toy run: tiny models, figures mean nothing here; run it on a CUDA machine"
    print(f"gpu_check: {env}" + (f"\n{toy}" if toy else ""), flush=True)
    r, rows = Runner(work, not (cuda or a.subprocess), t0 + limit), []
    result = dict(env=env, mode="quick" if a.quick else "full", limit_s=limit, note=toy or "figures from this GPU")
    save = lambda res, got, start: (out / "gpu_check.json").write_text(json.dumps(
        dict(res, elapsed_s=round(time.time() - start, 1), rows=got), indent=1))
    for name, fn in plan(r, s, work, a.quick, cuda):
        left = t0 + limit - time.time()
        if left < (30 if cuda else 0):
            rows.append(row(name, "(section)", "skip", f"not started: {max(0, left):.0f} s left of {limit:.0f} s"))
            print(f"{name}: skipped, over the time limit", flush=True)
            continue
        t = time.time()
        try:
            got = fn(min(BUDGET[name], left))
        except (Exception, SystemExit) as e:  # one failing section is one row; the next section still runs
            got = [row(name, "(section)", False, g2l.one_line(e))]
        for x in got:
            x["seconds"] = round(time.time() - t, 1)
        rows += got
        print(f"{name}: {', '.join(x['status'] for x in got)} ({time.time() - t:.0f} s)", flush=True)
        save(result, rows, t0)  # after each section: a kill keeps what was measured
    save(result, rows, t0)
    result = json.loads((out / "gpu_check.json").read_text())
    print(table(rows))
    print(f"{toy + '; ' if toy else ''}{len(rows)} checks in {time.time() - t0:.0f} s; wrote {out / 'gpu_check.json'}")
    failed = [x for x in rows if x["status"] == "FAIL"]
    if failed:  # the job was not done: a script must see it
        raise SystemExit(f"error: {len(failed)} check(s) failed: " + "; ".join(x["check"] for x in failed))
    return result

if __name__ == "__main__":
    main()
