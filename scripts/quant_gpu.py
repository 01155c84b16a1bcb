"""Quantized linear layers against bf16 on one GPU, Llama-2-7B shapes, in one process.

1. Each layer shape alone at M = 1, 16, 64, 256, 1024 tokens: bf16 (the Triton GEMV at M=1,
   cuBLAS above), and the int8, int4 (g128) and fp8 layers through their real forward (fp8 both
   with the weight-only GEMM and with torch._scaled_mm; int4 also dequantized in one pass and
   multiplied by cuBLAS, "int4-dense", and int8 likewise, "int8-dense"), eight weight copies rotated so L2 does
   not help, timed as CUDA-graph replays; each checked against its dequantized weight.
2. `fastllm bench latency` rows for bf16, int8, int4, fp8 at batch 1 and 64 (same options).

Usage: python scripts/quant_gpu.py OUTDIR [--skip-layers] [--skip-e2e] [--batches=1,64] [--retune=N] [--no-split-k]
[--ms=1,64] [--kinds=int8,int4,fp8,int8-w8a8,int4+head] (+head: the LM head quantized too; -rows: the
GEMVs' row kernels, not the word kernels; int4-silu: SiLU-and-mul taken into int4's down_proj;
int8-px / fp8-px: the word GEMVs requesting their inputs a tile ahead, without TMA; -notma: the GEMVs'
register-prefetch word kernels, not the TMA ones; -tma: the TMA ones for int8 / fp8 too; -pin: the
int4 TMA GEMVs in the best dp4a configurations of --pin-int4=SWEEP_TMA_JSON (of the layers
--pin-shapes=o,down names, where given); -nopin: the int4 TMA GEMVs autotuned, none pinned; -swap: the Triton GEMM (2+ tokens) tuned over its SWAP tiles only; -tiles14: over its first fourteen tiles; -wide: over its tiles and WIDE_TILES; -nomma: int4 products of 2+ tokens not through fastllm.kernels.cuda_w4 (mma.sync); -planes / -noplanes: weight-only int8 products of 2-2,047 tokens on the int8 tensor cores with the activations in two int8 planes (int8.PLANES_MAX_TOKENS), or none; -cutlassN (N in 2, 8, 16, 32, 64, 128): weight-only int8 / int4 products of N or more tokens to the CUTLASS GEMM's timed pick (int8.CUTLASS_MIN_TOKENS); -nodp4a: the int4 TMA GEMVs in
float arithmetic, not dp4a; -norm: each RMSNorm taken into the GEMV after it; -nohead: the TMA GEMVs'
weight loads after their PDL wait, not before; -head2: their whole pipeline prologue before it; -ahead2:
the int8 / fp8 word GEMVs holding two weight tiles ahead, not one; -noattn: RoPE and the KV store
in their own kernel, not inside decode attention; -upsplits: decode attention's split count rounded
up, not down; -splitsN: at most N splits; -nocuda: the int8 GEMVs in Triton, not the CUDA GEMV;
-cuda: the int4 GEMVs through the CUDA GEMV; -cuda8 / -nocuda8: the fp8 GEMVs through the CUDA GEMV, or in Triton; -cudanorm / -nocudanorm: the int8 layers take the
RMSNorm before them into the CUDA GEMV, or not; -cta8: the CUDA GEMV with 8 rows per CTA, not 16; -persistN: the CUDA GEMVs on a persistent
grid of N CTAs per SM; -noglu: SiLU-and-mul in down_proj's CUDA GEMV, not in gate_up_proj's; -waitfirst: the RMSNorm and decode attention kernels wait before they let the next kernel launch; -xnorm / -xattn (timing only, wrong outputs): the RMSNorms left out, or the decode attention replaced by a copy; -minbN: the CUDA int4 GEMV's registers capped for N CTAs per SM; suffixes combine; e2e
only; bf16-SUFFIX rows are bf16 with the suffix).
--retune=N runs each quantized e2e row N times, each autotuning afresh; every row's JSON records
the autotuner's picks. Prints a table last; JSON in OUTDIR.
"""
import json
import sys
from pathlib import Path

import torch
from torch import nn

from fastllm.bench.common import LLAMA2_7B_LINEARS, graph_time, script_out_dir

out_dir = script_out_dir(__doc__)
dev = torch.device("cuda")
report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
lines: list[str] = []


def dump():
    (out_dir / "quant_gpu.json").write_text(json.dumps(report, indent=1))


from fastllm.core.cuda_linear import DecodeLinear  # noqa: E402
from fastllm.stages.quantizers.fp8 import Fp8Linear  # noqa: E402
from fastllm.stages.quantizers.int4 import Int4Linear  # noqa: E402
from fastllm.stages.quantizers.int8 import Int8Linear  # noqa: E402

SHAPES = LLAMA2_7B_LINEARS
MS = [int(m) for a in sys.argv if a.startswith("--ms=") for m in a.split("=")[1].split(",")] or [1, 16, 64, 256, 1024]
KINDS = [k for a in sys.argv if a.startswith("--kinds=") for k in a.split("=")[1].split(",")] or ["int8", "int4", "fp8"]
FP8_DEFAULT = Fp8Linear.scaled_mm_min_tokens
INT4_DEFAULT = Int4Linear.dense_min_tokens
if "--no-split-k" in sys.argv:  # the Triton GEMM without split-K, for comparison
    from fastllm.kernels import qgemm

    qgemm.SPLIT_K_MAX_TOKENS = 0
INT8_DEFAULT = Int8Linear.dense_min_tokens
if "--skip-layers" not in sys.argv:
    layers_report = []
    for name, (N, K) in SHAPES.items():
        base = [nn.Linear(K, N, bias=False, device=dev, dtype=torch.bfloat16) for _ in range(8)]
        for b in base:
            b.__class__ = DecodeLinear
        make = {"int8": Int8Linear, "int4": lambda b: Int4Linear(b, 128), "fp8": Fp8Linear,
                "int8-w8a8": lambda b: Int8Linear(b, dynamic_activations=True)}
        variants = {"bf16": base, **{k: [make[k](b) for b in base] for k in KINDS if k in make}}
        for M in MS:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            row = {"shape": name, "N": N, "K": K, "M": M}
            extra = [("fp8-scaled_mm", variants["fp8"])] if "fp8" in variants else []
            extra += [("int4-dense", variants["int4"])] if "int4" in variants else []
            extra += [("int8-dense", variants["int8"])] if "int8" in variants else []
            for vname, mods in list(variants.items()) + extra:
                if vname.startswith("fp8"):
                    Fp8Linear.scaled_mm_min_tokens = 2 if vname == "fp8-scaled_mm" else 10 ** 9
                    if M == 1 and vname == "fp8-scaled_mm":
                        continue
                if vname.startswith("int4"):  # "int4-dense": dequantized in one pass, then cuBLAS
                    Int4Linear.dense_min_tokens = 2 if vname == "int4-dense" else 10 ** 9
                    if M == 1 and vname == "int4-dense":
                        continue
                if vname == "int8" or vname == "int8-dense":  # likewise for int8
                    Int8Linear.dense_min_tokens = 2 if vname == "int8-dense" else 10 ** 9
                    if M == 1 and vname == "int8-dense":
                        continue
                w = mods[0].weight if vname == "bf16" else mods[0].dequantize(torch.float32)
                ref = x.double() @ w.double().T
                with torch.inference_mode():
                    err = ((mods[0](x).double() - ref).norm() / ref.norm()).item()
                    it = iter(range(10 ** 9))
                    t = graph_time(lambda: mods[next(it) % 8](x))
                row[vname + "_us"], row[vname + "_err"] = t * 1e6, err
            Fp8Linear.scaled_mm_min_tokens = FP8_DEFAULT
            Int4Linear.dense_min_tokens = INT4_DEFAULT
            Int8Linear.dense_min_tokens = INT8_DEFAULT
            layers_report.append(row)
            report["layers"] = layers_report
            dump()
            cells = "  ".join(f"{v} {row[v + '_us']:7.1f}us ({row['bf16_us'] / row[v + '_us']:.2f}x, err {row[v + '_err']:.0e})"
                              for v in ["int8", "int8-dense", "int8-w8a8", "int4", "int4-dense", "fp8", "fp8-scaled_mm"]
                              if v + "_us" in row)
            line = f"{name:8s} M={M:5d}: bf16 {row['bf16_us']:7.1f}us  {cells}"
            lines.append(line)
            print(line, flush=True)
        del variants, base
        torch.cuda.empty_cache()

if "--skip-e2e" not in sys.argv:
    from fastllm.bench import gpu as B

    e2e = []
    batches = [int(b) for a in sys.argv if a.startswith("--batches=") for b in a.split("=")[1].split(",")] or [1, 64]
    RETUNE = int(next((a.split("=")[1] for a in sys.argv if a.startswith("--retune=")), 1))

    def tuners():
        from fastllm.kernels import gemv as GV, gemv_int4 as GV4, qgemm as QG

        return {"gemv": GV._tuned, "gemv_bytes": GV._tuned_bytes, "gemv_int4": GV4._tuned,
                "gemv_int4_words": GV4._tuned_words, "qgemm": QG._tuned, "gemv_bytes_tma": GV._tuned_bytes_tma,
                "gemv_int4_tma": GV4._tuned_tma}

    from fastllm.kernels import cuda_gemv as CG, gemv as GV, gemv_int4 as GV4
    from fastllm.stages.quantizers import int4 as Q4, int8 as Q8
    from fastllm.kernels import qgemm as QG
    QG_CONFIGS = list(QG._tuned.configs)
    WIDE_TILES = [QG.triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "SWAP": sw}, num_warps=w, num_stages=st)
                  for m, n, k, w, st, sw in [(64, 64, 128, 4, 6, True), (64, 64, 128, 4, 5, True), (64, 64, 64, 4, 6, True),
                                             (128, 64, 128, 4, 4, True), (64, 64, 128, 4, 4, False), (32, 64, 128, 4, 6, True)]]
    from fastllm.stages.attention.paged import PagedAttention
    from fastllm.kernels import paged_attention as PAK

    from fastllm.models import llama as LM
    from fastllm.kernels import launch as LAUNCH
    ORIGINAL = {"norm": LM.RMSNorm.forward, "attn": PagedAttention.forward_rope}
    DEFAULTS = {"TMA": (GV.TMA, GV4.TMA), "DP4A": GV4.DP4A, "CUDA_NORM": GV.CUDA_NORM, "CUDA_FP8": GV.CUDA_FP8,
                "TRIGGER_FIRST": LAUNCH.TRIGGER_FIRST, "CUTLASS_MIN_TOKENS": Q8.CUTLASS_MIN_TOKENS,
                "PLANES_MAX_TOKENS": Q8.PLANES_MAX_TOKENS, "PLANES_MIN_TOKENS": Q8.PLANES_MIN_TOKENS,
                "MMA4": Int4Linear.mma_max_tokens}
    # "-pin" rows: the int4 TMA GEMV takes the best dp4a configurations of a scripts/sweep_tma.py JSON (--pin-int4=PATH)
    PIN4 = dict(GV4.PINNED_TMA)
    # --pin-shapes=o,down: only those layers take the sweep's best
    PIN_SHAPES = [n for a in sys.argv if a.startswith("--pin-shapes=") for n in a.split("=")[1].split(",")]
    for a in sys.argv:
        if a.startswith("--pin-int4="):
            sweep = json.loads(Path(a.split("=", 1)[1]).read_text())
            for r in sweep["results"]:
                if PIN_SHAPES and r["shape"] not in PIN_SHAPES:
                    continue
                best = min((t, k) for k, t in r["us"].items() if k.startswith("int4 dp4a "))[1]
                cfg = dict(kv.split(": ") for kv in best.removeprefix("int4 dp4a ").split(", "))
                PIN4[(sweep["device"], r["N"], r["K"], 128)] = (int(cfg["BLOCK_N"]), int(cfg["BLOCK_W"]),
                                                                int(cfg["num_warps"]), int(cfg["STAGES"]))
            report["pinned_int4"] = {str(k): v for k, v in PIN4.items()}
    PIN4_DEFAULT = dict(GV4.PINNED_TMA)
    for batch in batches:
        for q in ["bf16"] + [k for k in KINDS for _ in range(RETUNE)]:
            for t in tuners().values():  # each run autotunes afresh: --retune=N shows how much the picks move it
                t.cache.clear()
            opts = {"max_num_seqs": batch}  # graphs up to the batch only: each size autotunes the GEMMs
            PagedAttention.fuse_rope_decode = "-noattn" not in q  # "-noattn": RoPE and KV store in their own kernel
            # "-waitfirst": the RMSNorm and decode attention kernels wait for the kernel before, then let the
            # next one launch (else the default, fastllm.kernels.launch.TRIGGER_FIRST)
            LAUNCH.TRIGGER_FIRST = DEFAULTS["TRIGGER_FIRST"] and "-waitfirst" not in q
            # "-xnorm" / "-xattn": timing only, wrong outputs: the RMSNorms (and their residual adds) left
            # out, or the decode attention replaced by a copy of q
            LM.RMSNorm.forward = ((lambda self, x, residual=None: x if residual is None else (x, residual))
                                  if "-xnorm" in q else ORIGINAL["norm"])
            PagedAttention.forward_rope = ((lambda self, layer, qk, v, rope, meta: qk[:, :self.spec.num_heads].contiguous())
                                           if "-xattn" in q else ORIGINAL["attn"])
            PAK.SPLITS_ROUND_DOWN = "-upsplits" not in q  # "-upsplits": decode attention's splits rounded up
            # "-splitsN": at most N splits
            PAK.MAX_SPLITS = next((int(x[6:]) for x in q.split("-") if x.startswith("splits")), 32)
            if q.startswith("bf16-"):
                opts["quantizer"] = "none"
            elif q != "bf16":
                GV.WORDS = GV4.WORDS = not q.endswith("-rows")  # "-rows": the GEMVs' row kernels
                GV.CUDA = "nocuda" not in q.split("-")  # "-nocuda": the int8 GEMVs in Triton, not the CUDA GEMV
                # "-cuda8" / "-nocuda8": the fp8 GEMVs through the CUDA GEMV, or in Triton (else the default)
                GV.CUDA_FP8 = {"cuda8": True, "nocuda8": False}.get(next((t for t in q.split("-") if t.endswith("cuda8")), ""),
                                                                   DEFAULTS["CUDA_FP8"])
                GV4.CUDA = q.endswith("-cuda") or "-cuda-" in q  # "-cuda": the int4 GEMVs in CUDA
                # "-cudanorm" / "-nocudanorm": the RMSNorms in the CUDA int8 GEMVs, or not (else the default)
                GV.CUDA_NORM = {"cudanorm": True, "nocudanorm": False}.get(next((t for t in q.split("-") if t.endswith("cudanorm")), ""),
                                                                           DEFAULTS["CUDA_NORM"])
                GV.GLU = "-noglu" not in q  # "-noglu": SiLU-and-mul in down_proj's GEMV, not gate_up_proj's
                CG.WARPS = 8 if "-cta8" in q else 16  # "-cta8": the CUDA GEMV with 8 rows per CTA, not 16
                # "-persistN": the CUDA int8 GEMV on a persistent grid of N CTAs per SM
                CG.PERSIST = next((int(x[7:]) for x in q.split("-") if x.startswith("persist")), 0)
                CG.PERSIST4 = CG.PERSIST  # (int4 too, with "-cuda")
                # "-minbN": the CUDA int4 GEMV's registers capped for N CTAs per SM
                CG.INT4_MINB = next((int(x[4:]) for x in q.split("-") if x.startswith("minb")), 1)
                GV.PREFETCH_X = q.endswith("-px")  # "-px": int8 / fp8 word GEMVs request inputs a tile ahead
                Int4Linear.fuse_silu_mul = q.endswith("-silu")  # "-silu": SiLU-and-mul in int4's down_proj GEMV
                # "-notma": the register-prefetch word GEMVs (as "-px" needs); "-tma": the TMA GEMVs for
                # int8 / fp8 too
                GV.TMA, GV4.TMA = DEFAULTS["TMA"]
                DecodeLinear.fuse_norm = "-norm" in q  # "-norm": the RMSNorms taken into the GEMVs after them
                # "-cutlassN": weight-only int8 / int4 products of N+ tokens to the CUTLASS GEMM's timed pick
                cutlass_min = next((int(x[7:]) for x in q.split("-") if x.startswith("cutlass") and x[7:].isdigit()),
                                   DEFAULTS["CUTLASS_MIN_TOKENS"])
                Q8.CUTLASS_MIN_TOKENS = Q4.CUTLASS_MIN_TOKENS = cutlass_min
                # "-planes": weight-only int8 products of 2-2,047 tokens on the int8 tensor cores, the
                # activations as two int8 planes (fastllm.kernels.w8a8.w8a16_planes); "-noplanes": none
                Q8.PLANES_MAX_TOKENS = (2047 if "-planes" in q else 0 if "-noplanes" in q
                                        else DEFAULTS["PLANES_MAX_TOKENS"])
                Q8.PLANES_MIN_TOKENS = 2 if "-planes" in q else DEFAULTS["PLANES_MIN_TOKENS"]
                # "-nomma": int4 products of 2+ tokens not through fastllm.kernels.cuda_w4 (mma.sync)
                Int4Linear.mma_max_tokens = 0 if "-nomma" in q else DEFAULTS["MMA4"]
                # "-swap": the Triton GEMM (2+ tokens) tunes over its SWAP tiles only (the dequantized weight
                # as wgmma's left operand, from registers; the other tiles pass it through shared memory)
                # "-tiles14": over the fourteen tiles it had before the twenty-first session's five;
                # "-wide": over its tiles and WIDE_TILES
                QG._tuned.configs = ([c for c in QG_CONFIGS if c.kwargs["SWAP"]] if "-swap" in q
                                     else QG_CONFIGS[:14] if "-tiles14" in q
                                     else QG_CONFIGS + WIDE_TILES if "-wide" in q else QG_CONFIGS)
                # "-nopin": the int4 TMA GEMVs autotuned, none pinned
                GV4.PINNED_TMA = PIN4 if "-pin" in q else {} if "-nopin" in q else PIN4_DEFAULT
                GV4._pinned_tma.cache_clear()
                GV4.DP4A = DEFAULTS["DP4A"] and "-nodp4a" not in q  # "-nodp4a": the int4 TMA GEMV in floats
                # "-nohead": the TMA GEMVs wait for the kernel before ahead of their first weight tiles;
                # "-head2": they request the pipeline's whole prologue first
                GV.HEAD_START = GV4.HEAD_START = 0 if "-nohead" in q else 2 if "-head2" in q else 1
                GV.AHEAD = 2 if "-ahead2" in q else 1  # "-ahead2": the word GEMVs hold two tiles ahead
                if "-tma" in q:
                    GV.TMA = GV4.TMA = True
                if "-notma" in q or "-px" in q:
                    GV.TMA = GV4.TMA = False
                # "+head": the LM head quantized too
                suffixes = ("+head", "-rows", "-silu", "-px", "-notma", "-tma", "-pin", "-nodp4a", "-norm", "-nohead",
                            "-head2", "-ahead2", "-noattn", "-upsplits", "-splits16", "-splits8", "-splits4", "-nocuda", "-cta8", "-cuda", "-cudanorm", "-nocudanorm", "-cuda8", "-nocuda8", "-noglu",
                            "-xnorm", "-xattn", "-waitfirst",
                            *(f"-persist{n}" for n in range(1, 9)), "-minb2", "-minb3", "-nopin", "-swap", "-tiles14", "-wide", "-planes", "-noplanes", "-nomma",
                            *(f"-cutlass{n}" for n in (2, 8, 16, 32, 64, 128)))
                name = q
                while name.endswith(suffixes):
                    name = next(name.removesuffix(x) for x in suffixes if name.endswith(x))
                opts["quantizer"] = {"name": "int8", "activations": "dynamic"} if name == "int8-w8a8" else {"name": name}
                if q.endswith("+head"):
                    opts["quantizer"]["skip"] = []
            r = B.latency("dummy:llama-2-7b", batch=batch, options=opts)
            row = dict(batch=batch, quantizer=q, **r["rows"][0], weight_bytes=r["weight_bytes"],
                       autotune={name: {str(k): str(c) for k, c in t.cache.items()} for name, t in tuners().items()})
            e2e.append(row)
            report["e2e"] = e2e
            dump()
            base = next(x for x in e2e if x["batch"] == batch and x["quantizer"] == "bf16")
            line = (f"latency batch {batch:3d} {q:9s}: {row['tok_s']:8.1f} tok/s ({row['ms_per_token']:.3f} ms/step), "
                    f"{row['tok_s'] / base['tok_s']:.2f}x bf16, start {row['startup_s']:.0f} s")
            lines.append(line)
            print(line, flush=True)
            torch.cuda.empty_cache()
print("\n==== summary ====\n" + "\n".join(lines))
