"""Hopper machine code of Triton kernels without a GPU, for the scripts that count their loops
(sass_qgemm.py, sass_int4.py, dump_sass.py): compile for sm_90a with the Triton here and read the
SASS with the cuobjdump it bundles (triton >= 3.2)."""
import collections
import os
import re
import subprocess
import tempfile

import triton

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")


def cubin_sass(path: str) -> tuple[str, int]:
    """(SASS text, registers) of a cubin file."""
    sass = subprocess.run([CUOBJDUMP, "-sass", path], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", subprocess.run([CUOBJDUMP, "-res-usage", path], capture_output=True,
                                                  text=True).stdout)
    return sass, int(regs.group(1)) if regs else -1


def compile_sm90(fn, signature: dict, constexprs: dict, aligned: tuple, num_warps: int, num_stages: int) -> tuple:
    """(SASS text, registers) of fn for sm_90a; `aligned`: integer arguments known divisible by 16."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(signature)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if signature[n].startswith("*") or n in aligned}
    k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        return cubin_sass(f.name)


def loops(sass: str) -> list[list[str]]:
    """The instructions of each loop: a backward branch and everything from its target to it."""
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,5})\*/\s+(.*?);", sass)]
    found = []
    for a, i in ins:
        t = re.search(r"BRA\s+(?:\S+\s+)?0x([0-9a-f]+)", i)
        if t and int(t.group(1), 16) < a:
            found.append([x for b, x in ins if int(t.group(1), 16) <= b <= a])
    return found


def opcodes(body: list[str]) -> collections.Counter:
    """Opcode counts (predicate and modifiers dropped) of a list of instructions."""
    return collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", x).split()[0].split(".")[0] for x in body)
