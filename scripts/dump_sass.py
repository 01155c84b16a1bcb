"""Instruction mix of the GEMV kernels' main loops as this machine's Triton compiled them:
reads the cubins in the Triton cache (run the kernels first), disassembles them with the
cuobjdump that ships with Triton, and counts the instructions between each backward branch and
its target. Usage: python scripts/dump_sass.py OUTDIR [name-substring ...]"""
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sass_common import cubin_sass, loops, opcodes  # noqa: E402

if {"-h", "--help"} & set(sys.argv[1:]):  # not an output path
    sys.exit(print(__doc__))

out_dir = Path(sys.argv[1])
want = sys.argv[2:] or ["gemv"]
cache = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
for cubin in sorted(cache.rglob("*.cubin")):
    if not any(w in cubin.name for w in want):
        continue
    sass, regs = cubin_sass(str(cubin))
    for body in loops(sass):
        print(f"{cubin.parent.name[:8]} {cubin.name} regs {regs} loop {len(body)}: {opcodes(body).most_common(12)}")
    (out_dir / f"{cubin.parent.name[:8]}-{cubin.stem}.sass").write_text(sass)
