"""Instruction mix of the GEMV kernels' main loops as this machine's Triton compiled them:
reads the cubins in the Triton cache (run the kernels first), disassembles them with the
cuobjdump that ships with Triton, and counts the instructions between each backward branch and
its target. Usage: python scripts/dump_sass.py OUTDIR [name-substring ...]"""
import collections
import os
import re
import subprocess
import sys
from pathlib import Path

import triton

if {"-h", "--help"} & set(sys.argv[1:]):  # not an output path
    sys.exit(print(__doc__))

out_dir = Path(sys.argv[1])
want = sys.argv[2:] or ["gemv"]
tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
cache = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
for cubin in sorted(cache.rglob("*.cubin")):
    if not any(w in cubin.name for w in want):
        continue
    sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True).stdout
    res = subprocess.run([tool, "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", res)
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,5})\*/\s+(.*?);", sass)]
    for a, i in ins:
        t = re.search(r"BRA\s+(?:\S+\s+)?0x([0-9a-f]+)", i)
        if t and int(t.group(1), 16) < a:
            body = [x for b, x in ins if int(t.group(1), 16) <= b <= a]
            c = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", x).split()[0].split(".")[0] for x in body)
            print(f"{cubin.parent.name[:8]} {cubin.name} regs {regs.group(1) if regs else '?'} loop {len(body)}: "
                  f"{c.most_common(12)}")
    (out_dir / f"{cubin.parent.name[:8]}-{cubin.stem}.sass").write_text(sass)
