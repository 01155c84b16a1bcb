"""The next int8 weight layout for many-token GEMMs, timed against today's: weights stored in the
tensor cores' register order, so each lane loads its weight bytes sixteen at a time.

Each row's columns are permuted within blocks of 64: column k = 16 j + 8 h + 2 t + p (j: which
16-column step, t: the lane's position in its quad, h, p: the lane's four values per step) is
stored at 16 t + 4 j + 2 h + p (`permute_columns`). The prototype kernel undoes it with reshape /
permute, which Triton folds into the register layout of the left tensor-core operand
(scripts/sass_qgemm.py shows the compiled loop: 184 against 267 instructions per K step).

On a GPU, per Llama-3-8B layer and token count: cuBLAS' bf16, fastllm.kernels.qgemm (autotuned),
and the prototype on row-major and on permuted weights (autotuned over the same tiles), with each
result's error against a float64 product. Usage: python scripts/qgemm_layout.py OUTDIR
[--ms=256,1024,4096]; JSON in OUTDIR.
"""
import json
import sys

import torch
import triton
import triton.language as tl


def permute_columns(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] (K a multiple of 64) in the permuted storage order."""
    N, K = q.shape
    assert K % 64 == 0
    k = torch.arange(K, device=q.device)
    c, r = k // 64, k % 64
    j, h, t, p = r // 16, (r // 8) % 2, (r // 2) % 4, r % 2
    out = torch.empty_like(q)
    out[:, c * 64 + 16 * t + 4 * j + 2 * h + p] = q
    return out


@triton.jit
def _permuted_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_w, stride_ym, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PERMUTED: tl.constexpr):
    # y = x (q * s)^T as qgemm's swapped product (the weight the left operand, from registers);
    # K % BLOCK_K == 0, BLOCK_K % 64 == 0. fp32 x (Triton's CPU interpreter): fp32 products.
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    x_ptrs = x_ptr + tl.where(offs_m < M, offs_m, 0).to(tl.int64)[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :]
    w_ptrs = w_ptr + tl.where(offs_n < N, offs_n, 0).to(tl.int64)[:, None] * stride_w + tl.arange(0, BLOCK_K)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs)
        w = tl.load(w_ptrs)
        if PERMUTED:  # stored at 16 t + 4 j + 2 h + p -> column 16 j + 8 h + 2 t + p
            w = tl.reshape(tl.permute(tl.reshape(w, [BLOCK_N, BLOCK_K // 64, 4, 4, 2, 2]), [0, 1, 3, 4, 2, 5]),
                           [BLOCK_N, BLOCK_K])
        if x.dtype == tl.float32:
            acc = tl.dot(w.to(tl.float32), tl.trans(x), acc, input_precision="ieee")
        else:
            acc = tl.dot(w.to(tl.float32).to(x.dtype), tl.trans(x), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc = tl.trans(acc) * tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


TILES = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
         for m, n, k, w, s in [(256, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 64, 8, 3), (256, 64, 64, 4, 3),
                               (64, 128, 128, 4, 3), (128, 128, 128, 8, 3)]]
_tuned = triton.autotune(TILES, key=["M", "N", "K", "PERMUTED"])(_permuted_kernel)


def prototype(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, permuted: bool,
              config: triton.Config | None = None) -> torch.Tensor:
    """x [M, K] times the int8 weight q [N, K] (stored permuted if `permuted`) with scales s [N]."""
    M, K = x.shape
    N = q.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    args = (x, q, s, y, M, N, K, x.stride(0), q.stride(0), y.stride(0))
    if config is None:
        _tuned[lambda m: (triton.cdiv(N, m["BLOCK_N"]), triton.cdiv(M, m["BLOCK_M"]))](*args, PERMUTED=permuted)
    else:
        kw = config.kwargs
        _permuted_kernel[(triton.cdiv(N, kw["BLOCK_N"]), triton.cdiv(M, kw["BLOCK_M"]))](
            *args, PERMUTED=permuted, **kw, num_warps=config.num_warps, num_stages=config.num_stages)
    return y


def main() -> None:
    import torch.nn.functional as F

    from fastllm.bench.common import LLAMA3_8B_LINEARS, graph_time, script_out_dir
    from fastllm.kernels import qgemm as Q
    from fastllm.stages.quantizers.int8 import quantize_int8

    out_dir = script_out_dir(__doc__)
    dev = torch.device("cuda")
    ms = [int(v) for a in sys.argv if a.startswith("--ms=") for v in a.split("=")[1].split(",")] or [256, 1024, 4096]
    copies, rows, lines = 4, [], []
    for name, (N, K) in LLAMA3_8B_LINEARS.items():
        w16 = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) / K ** 0.5 for _ in range(copies)]
        q8 = [quantize_int8(t) for t in w16]
        perm = [(permute_columns(q), s) for q, s in q8]
        for M in ms:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            ref = x.double() @ (q8[0][0].double() * q8[0][1].double()[:, None]).T
            variants = {"bf16": lambda i: F.linear(x, w16[i]),
                        "qgemm": lambda i: Q.qgemm_rows(x, *q8[i]),
                        "row-major": lambda i: prototype(x, *q8[i], permuted=False),
                        "permuted": lambda i: prototype(x, *perm[i], permuted=True)}
            row = {"layer": name, "N": N, "K": K, "M": M}
            for v, fn in variants.items():
                err = ((fn(0).double() - ref).abs().max() / ref.abs().max()).item()
                it = iter(range(10 ** 9))
                row[v] = {"us": graph_time(lambda: fn(next(it) % copies)) * 1e6, "rel_err": err}
            rows.append(row)
            base = row["bf16"]["us"]
            line = f"{name:8s} M={M:5d} " + "  ".join(f"{v} {row[v]['us']:7.1f} us ({base / row[v]['us']:.2f}x, "
                                                      f"err {row[v]['rel_err']:.0e})" for v in variants)
            print(line, flush=True)
            lines.append(line)
    (out_dir / "qgemm_layout.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows},
                                                          indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
