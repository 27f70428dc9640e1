"""
student_from_teacher.py: a pretrained, shallower student cut from its teacher (the DistilBERT-style start).

G2L starts its student from a pretrained model, not from random weights. Where no smaller pretrained model of the
same family is at hand, a copy of the teacher that keeps a subset of its blocks is one: the patch embedding, the
CLS/register tokens, the position embedding and the final norm are the teacher's, and block j of the student is
block blocks[j] of the teacher. The result is a weights file for the teacher's own architecture at a smaller depth:

    python examples/student_from_teacher.py --teacher repro/teacher112 --blocks first:6 --out first6.safetensors
    python g2l.py --teacher repro/teacher112 --student repro/teacher112 --student-kwargs '{"depth": 6}' \\
        --student-weights first6.safetensors --data tiles/
    # a half-depth H-optimus-0 (20 of its 40 blocks, every other one), from its local weights:
    python examples/student_from_teacher.py --teacher h-optimus-0 --teacher-weights h0.safetensors \\
        --blocks every:2 --out h0-half.safetensors

--blocks: first:K (blocks 0..K-1), every:N (0, N, 2N, ...), or a list such as 0,2,4,6,8,10.
"""
import argparse, json, os, sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # g2l.py, one folder up
import g2l

def pick_blocks(spec, depth):
    """--blocks text -> teacher block indices, checked against the teacher's depth."""
    kind, _, n = spec.partition(":")
    try:
        if kind == "first":
            chosen = list(range(int(n)))
        elif kind == "every":
            chosen = list(range(0, depth, int(n)))
        else:
            chosen = [int(i) for i in spec.split(",")]
    except ValueError:
        raise SystemExit(f"error: --blocks {spec!r}: use first:K, every:N or a list such as 0,2,4")
    if not chosen or any(not 0 <= i < depth for i in chosen):
        raise SystemExit(f"error: --blocks {spec!r} picks {chosen}, but the teacher has blocks 0..{depth - 1}")
    return chosen

def subset_state_dict(teacher, chosen):
    """The teacher's weights with block j of the new model taken from teacher block chosen[j]."""
    sd = teacher.state_dict()
    out = {k: v for k, v in sd.items() if not k.startswith("blocks.")}
    for j, i in enumerate(chosen):
        prefix = f"blocks.{i}."
        out.update({f"blocks.{j}." + k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    return {k: v.detach().float().contiguous() for k, v in out.items()}

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="the teacher, by g2l.py's naming rules (preset, timm name, "
                    "hf-hub:, local-dir:, a folder)")
    ap.add_argument("--teacher-weights", default="",
                    help="local weights for the teacher's architecture (default: none)")
    ap.add_argument("--teacher-kwargs", default="", help="JSON architecture kwargs for the teacher (default: none)")
    ap.add_argument("--blocks", required=True, help="first:K, every:N, or a comma-separated list of block indices")
    ap.add_argument("--out", required=True, help="the student's weights file (.safetensors)")
    a = ap.parse_args(argv)
    if not a.out.endswith(".safetensors"):
        raise SystemExit(f"error: --out {a.out}: write a .safetensors file")
    teacher, spec = g2l.load_model(a.teacher, a.teacher_weights, a.teacher_kwargs)
    if not hasattr(teacher, "blocks"):
        raise SystemExit(f"error: {a.teacher} has no transformer blocks; a block subset needs a ViT")
    chosen = pick_blocks(a.blocks, len(teacher.blocks))
    from safetensors.torch import save_file
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(subset_state_dict(teacher, chosen), a.out + ".tmp")
    os.replace(a.out + ".tmp", a.out)
    kw = json.dumps({**json.loads(a.teacher_kwargs or "{}"), "depth": len(chosen)})
    print(f"student: {len(chosen)} of the teacher's {len(teacher.blocks)} blocks {chosen} -> {a.out}\n"
          f"use it: python g2l.py --teacher {a.teacher} --student {a.teacher} --student-kwargs '{kw}' "
          f"--student-weights {a.out} ... (teacher options as above)")
    return chosen

if __name__ == "__main__":
    main()
