"""Every configuration of the batch-1 GEMVs (bf16, int8, int4 g128, fp8) on the Llama-2-7B
shapes, timed the way a decode step runs them: eight weight copies rotated (so L2 does not
help), sixteen calls per CUDA graph, programmatic dependent launch on. int8 / fp8 both through
the row kernel (_gemv_kernel; int8-i2f: with the int-to-float conversion instruction) and the
word kernel (_gemv_bytes_kernel, "-words"; "-words-px": with its inputs requested a tile ahead);
int4 through both of its kernels, the word kernel also reading (scale, zero) interleaved
("int4-pairs") (--int4-variants: the word
kernel also with group-major scales, and without scale loads). Then the autotuner's own pick, to
see how far it lands from the best.

Usage: python scripts/sweep_gemv.py OUTDIR [--only=int4,int8-words,int4-pairs,...] ("int4": all of its
variants; "int4-pairs" etc.: only those). Prints the best per
kernel and shape; JSON in OUTDIR.
"""
import json
import sys

import torch

from fastllm.bench.common import LLAMA2_7B_LINEARS, graph_time, script_out_dir

from fastllm.kernels import gemv as G
from fastllm.kernels import gemv_int4 as G4
from fastllm.kernels.launch import launch_rows, pdl
from fastllm.stages.quantizers.fp8 import quantize_fp8
from fastllm.stages.quantizers.int4 import quantize_int4
from fastllm.stages.quantizers.int8 import quantize_int8

out_dir = script_out_dir(__doc__)
dev = torch.device("cuda")
SHAPES = LLAMA2_7B_LINEARS


report: dict = {"device": torch.cuda.get_device_name(), "results": []}
lines = []
ONLY = [k for a in sys.argv if a.startswith("--only=") for k in a.split("=")[1].split(",")]
KINDS = ONLY or ["bf16", "int8", "int8-words", "fp8", "fp8-words", "int4"]
for name, (N, K) in SHAPES.items():
    w = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) for _ in range(8)]
    x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
    y = torch.empty(N, device=dev, dtype=torch.bfloat16)
    q8 = [quantize_int8(t) for t in w] if any(k.startswith("int8") for k in KINDS) else []
    f8 = [quantize_fp8(t) for t in w] if any(k.startswith("fp8") for k in KINDS) else []
    q4 = [quantize_int4(t, 128) for t in w] if any(k.startswith("int4") for k in KINDS) else []
    del w
    torch.cuda.empty_cache()
    w16 = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) for _ in range(8)] if "bf16" in KINDS else []
    kernels = {}
    weights_of = {"bf16": [(t, None) for t in w16], "int8": q8, "int8-i2f": q8, "fp8": f8}
    for kind in [k for k in KINDS if k in weights_of]:
        weights, bits = weights_of[kind], kind != "int8-i2f"
        for cfg in G.CONFIGS:
            def call(i, weights=weights, bits=bits, cfg=cfg):
                wq, sc = weights[i % 8]
                args = (x, wq, y, y, x, y, y, sc if sc is not None else y, N, K, wq.stride(0), 1e-6)
                flags = dict(HAS_BIAS=False, HAS_RES=False, NORM=False, SILU_MUL=False, HAS_SCALE=sc is not None,
                             VIA_BITS=bits, **pdl(x))
                launch_rows(None, G._gemv_kernel, N, args, flags, cfg)
            it = iter(range(10 ** 9))
            kernels.setdefault(kind, []).append((graph_time(lambda: call(next(it))), str(cfg)))
    for kind, weights in [("int8-words", q8), ("fp8-words", f8), ("int8-words-px", q8), ("fp8-words-px", f8)]:
        if kind not in KINDS:
            continue
        ref = (x.double() @ weights[0][0].double().T) * weights[0][1].double()
        for cfg in G.CONFIGS:
            def callw(i, weights=weights, cfg=cfg, kind=kind):
                wq, sc = weights[i % 8]
                wv = wq.view(torch.int32)
                args = (x, wv, y, y, x, y, y, sc, N, K, wv.stride(0), 1e-6)
                flags = dict(HAS_BIAS=False, HAS_RES=False, NORM=False, SILU_MUL=False, FP8=kind.startswith("fp8"),
                             ASM=True, PREFETCH_X=kind.endswith("-px"), **pdl(x))
                launch_rows(None, G._gemv_bytes_kernel, N, args, flags, cfg)
            callw(0)
            err = ((y.double() - ref[0]).norm() / ref.norm()).item()
            assert err < 2e-2, (kind, str(cfg), err)
            it = iter(range(10 ** 9))
            kernels.setdefault(kind, []).append((graph_time(lambda: callw(next(it))), str(cfg)))
    if q4:
        from fastllm.stages.quantizers.int4 import dequantize_int4, pack_scales

        ref4 = x.double() @ dequantize_int4(*q4[0], K).double().T
        q4t = [(p, s_.t().contiguous().t(), z.t().contiguous().t()) for p, s_, z in q4]  # [groups, N] storage
        q4p = [pack_scales(s_, z) for _, s_, z in q4]  # (scale, zero) interleaved, as Int4Linear stores them
        variants = [("int4", q4, False, False), ("int4-words", q4, False, True), ("int4-pairs", q4, False, "pairs")]
        if "--int4-variants" in sys.argv:
            variants += [("int4-words-sT", q4t, False, True), ("int4-words-nosz", q4, True, True)]
        if "int4" not in KINDS:  # only the int4 variants named
            variants = [v for v in variants if v[0] in KINDS]
        for variant, qs, no_sz, words in variants:
            for cfg in G4.WORD_CONFIGS if words else G4.CONFIGS:
                def call4(i, cfg=cfg, qs=qs, no_sz=no_sz, words=words):
                    p, s_, z = qs[i % 8]
                    if words:
                        pw = p.view(torch.int32)
                        pairs = words.startswith("pairs") if isinstance(words, str) else False
                        sz = (q4p[i % 8], q4p[i % 8], q4p[i % 8].stride(0), 2) if pairs else (s_, z, *s_.stride())
                        args = (x, pw, sz[0], sz[1], y, y, N, K, p.shape[1] * 2, pw.stride(0), sz[2], sz[3])
                        launch_rows(None, G4._gemv_int4_words_kernel, N, args,
                                    dict(G=128, HAS_BIAS=False, ASM=True, NO_SZ=no_sz, PAIRS=pairs,
                                         **pdl(x)), cfg)
                    else:
                        args = (x, p, s_, z, y, y, N, K, p.shape[1] * 2, p.stride(0), *s_.stride())
                        launch_rows(None, G4._gemv_int4_kernel, N, args, dict(G=128, HAS_BIAS=False, **pdl(x)), cfg)
                call4(0)
                err = ((y.double() - ref4[0]).norm() / ref4.norm()).item()
                assert no_sz or err < 2e-2, (str(cfg), err)
                it = iter(range(10 ** 9))
                kernels.setdefault(variant, []).append((graph_time(lambda: call4(next(it))), str(cfg)))
    # the autotuner's pick, through the public entry points
    def rotating(fn):
        it = iter(range(10 ** 9))
        return graph_time(lambda: fn(next(it) % 8))

    picks = {}
    if q4:
        picks["int4"] = rotating(lambda i, q4=q4: G4.gemv_int4(x, *q4[i], 128, words=False))
        picks["int4-words"] = rotating(lambda i, q4=q4: G4.gemv_int4(x, *q4[i], 128, words=True))
        picks["int4-tma"] = rotating(lambda i, q4=q4, q4p=q4p: G4.gemv_int4(x, *q4[i], 128, pairs=q4p[i], tma=True))
        picks["int4-pairs"] = rotating(lambda i, q4=q4, q4p=q4p: G4.gemv_int4(x, *q4[i], 128, words=True, pairs=q4p[i],
                                                                            tma=False))
    if "bf16" in KINDS:
        picks["bf16"] = rotating(lambda i, w16=w16: G.gemv(x, w16[i]))
    if q8:
        picks["int8-words"] = rotating(lambda i, q8=q8: G.gemv(x, q8[i][0], scale=q8[i][1]))
        picks["int8"] = rotating(lambda i, q8=q8: G.gemv(x, q8[i][0], scale=q8[i][1], words=False))
    if f8:
        picks["fp8-words"] = rotating(lambda i, f8=f8: G.gemv(x, f8[i][0], scale=f8[i][1]))
        picks["fp8"] = rotating(lambda i, f8=f8: G.gemv(x, f8[i][0], scale=f8[i][1], words=False))
    for kind, rows in kernels.items():
        rows.sort()
        nbytes = {"bf16": 2 * N * K, "int8": N * K, "fp8": N * K}.get(kind.split("-")[0], N * K // 2 + N * K // 128 * 8)
        best_t, best_cfg = rows[0]
        report["results"].append(dict(shape=name, kernel=kind, best_us=best_t * 1e6, best=best_cfg,
                                      top=[(t * 1e6, c) for t, c in rows[:4]], autotuned_us=picks.get(kind, float("nan")) * 1e6,
                                      TBps=nbytes / best_t / 1e12))
        line = (f"{name:8s} {kind:12s} best {best_t * 1e6:6.1f} us ({nbytes / best_t / 1e12:.2f} TB/s) "
                f"autotuned {picks.get(kind, float('nan')) * 1e6:6.1f} us  [{best_cfg}]")
        lines.append(line)
        print(line, flush=True)
    (out_dir / "sweep_gemv.json").write_text(json.dumps(report, indent=1))
    del w16, q8, f8, q4
    torch.cuda.empty_cache()
print("\n==== summary ====\n" + "\n".join(lines))
