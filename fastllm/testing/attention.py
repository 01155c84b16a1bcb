"""Conformance of attention backends against eager float64 attention."""
from __future__ import annotations

import torch

from ..core.request import Batch
from ..stages.base import KVSpec
from .api import check_api_version
from .reference import eager_attention, fake_request

ATOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}

# Sequence lengths, and for each step the (sequence, tokens fed) pairs of one flat batch.
# Odd lengths; a one-token prompt; a prompt prefilled in two chunks, the second next to decodes
# and a multi-token step over a cache (as speculative verification does); a sequence freed and
# another allocated after it.
LENGTHS = {"a": 17, "b": 4, "c": 12, "d": 33, "e": 6}
STEPS = [
    ("prefill of three sequences", [("a", 13), ("b", 1), ("c", 6)]),
    ("decode", [("a", 1), ("b", 1), ("c", 1)]),
    ("first prefill chunk next to decodes", [("d", 11), ("a", 1), ("c", 1)]),
    ("chunk after a cached prefix", [("b", 1), ("d", 18), ("c", 3)]),
    ("after freeing a sequence", [("e", 5), ("d", 1)]),
    ("decode", [("b", 1), ("c", 1), ("d", 1), ("e", 1)]),
]
FREE_AFTER = {3: ["a"]}  # step index -> sequences freed after it


def _poison(device: torch.device, numel: int, dtype: torch.dtype) -> None:
    # Leave NaN in memory the allocator hands out next, so an output row the backend never
    # writes shows as NaN instead of a lucky zero.
    junk = torch.full((numel,), float("nan"), dtype=dtype, device=device)
    del junk


def check_attention(backend, *, num_layers: int = 2, num_heads: int = 6, num_kv_heads: int = 2,
                    head_dim: int = 16, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    atol: float | None = None, seed: int = 0) -> None:
    """Drive a fresh, not yet set-up `backend` through prefill, decode and chunked-prefill steps
    of several sequences (GQA, a non-default scale) and compare every output element with eager
    float64 attention; then check allocate/free/can_allocate bookkeeping. The backend needs room
    for sum(LENGTHS) tokens of this spec."""
    check_api_version(backend, "attention")
    device = torch.device(device)
    atol = ATOL.get(dtype, 4e-2) if atol is None else atol
    scale = 0.37  # not head_dim ** -0.5: a backend that ignores spec.scale fails
    spec = KVSpec(num_layers, num_heads, num_kv_heads, head_dim, dtype, device, scale)
    name = type(backend).__name__
    backend.setup(spec)
    cap = getattr(backend, "capacity_tokens", None)
    probes = [1, 64, 4096] + ([cap] if cap is not None else [])
    before = [backend.can_allocate(n) for n in probes]
    assert before[0] is True, f"{name}: can_allocate(1) is {before[0]!r} on an empty cache"

    g = torch.Generator(device="cpu").manual_seed(seed)
    reqs = {s: fake_request(s, list(range(1000 * i, 1000 * i + n)), max_tokens=1)  # no shared prefix
            for i, (s, n) in enumerate(LENGTHS.items(), start=1)}
    hist: dict[str, list[list[torch.Tensor]]] = {}  # seq -> layer -> [k, v] float64 [S, KVH, D]
    for step, (what, feed) in enumerate(STEPS):
        for s, _ in feed:
            if s not in hist:
                n = LENGTHS[s]
                assert backend.can_allocate(n), f"{name}: can_allocate({n}) is False with room for it"
                backend.allocate(s, n)
                hist[s] = [[torch.zeros(0, num_kv_heads, head_dim, dtype=torch.float64)] * 2
                           for _ in range(num_layers)]
        for s, _ in feed:
            reqs[s].num_computed = hist[s][0][0].shape[0]
        batch = Batch([reqs[s] for s, _ in feed], [n for _, n in feed])
        meta = backend.plan(batch)
        T = batch.num_tokens
        for layer in range(num_layers):
            # The model hands q, k, v as views of one projection: v is not contiguous.
            qkv = torch.randn(T, (num_heads + 2 * num_kv_heads) * head_dim, generator=g).to(dtype)
            q, k, v = qkv.to(device).split([num_heads * head_dim, num_kv_heads * head_dim,
                                            num_kv_heads * head_dim], dim=-1)
            q = q.reshape(T, num_heads, head_dim).contiguous()  # [T, H, D]
            k = k.reshape(T, num_kv_heads, head_dim).contiguous()  # [T, KVH, D]
            v = v.view(T, num_kv_heads, head_dim)
            saved = (q.clone(), k.clone(), v.clone())
            _poison(device, q.numel(), dtype)
            out = backend.forward(layer, q, k, v, meta)
            assert all(torch.equal(a, b) for a, b in zip((q, k, v), saved)), (
                f"{name}: forward() modified its q, k or v input in place")
            where = f"{name}, step {step} ({what}), layer {layer}"
            assert isinstance(out, torch.Tensor) and tuple(out.shape) == tuple(q.shape), (
                f"{where}: output shape {tuple(getattr(out, 'shape', ()))}, expected {tuple(q.shape)}")
            assert out.dtype == dtype and out.device.type == device.type, (
                f"{where}: output is {out.dtype} on {out.device}, expected {dtype} on {device}")
            o = 0
            for s, n in feed:
                kh, vh = hist[s][layer]
                start = kh.shape[0]
                kh = torch.cat([kh, k[o:o + n].double().cpu()])
                vh = torch.cat([vh, v[o:o + n].double().cpu()])
                hist[s][layer] = [kh, vh]
                ref = eager_attention(q[o:o + n].cpu(), kh, vh, start, scale)
                got = out[o:o + n].double().cpu()
                bad = ~torch.isfinite(got)
                assert not bad.any(), (
                    f"{where}: sequence {s!r} (cached {start}, new {n}): {int(bad.sum())} output elements "
                    f"were never written (NaN/inf), first at token {bad.nonzero()[0].tolist()}")
                err = (got - ref).abs().max().item()
                assert err <= atol, (
                    f"{where}: sequence {s!r} (cached {start}, new {n}): max |out - eager| = {err:.3g} "
                    f"> atol {atol:.3g}")
                o += n
        for s in FREE_AFTER.get(step, []):
            backend.free(s)
    for s in hist:
        if s not in sum(FREE_AFTER.values(), []):
            backend.free(s)
    after = [backend.can_allocate(n) for n in probes]
    assert after == before, (f"{name}: after every sequence was freed, can_allocate{tuple(probes)} is "
                             f"{after}, but was {before} on the empty cache: freed KV is not given back")
    _check_capacity(backend, name)


def _check_capacity(backend, name: str) -> None:
    """When the backend reports capacity_tokens, it holds exactly that many and no more."""
    cap = getattr(backend, "capacity_tokens", None)
    if cap is None or cap > 1 << 16:
        return
    assert backend.can_allocate(cap), f"{name}: can_allocate(capacity_tokens={cap}) is False on an empty cache"
    assert not backend.can_allocate(cap + 1), f"{name}: can_allocate({cap + 1}) is True, over capacity_tokens={cap}"
    backend.allocate("full", cap)
    assert not backend.can_allocate(1), f"{name}: can_allocate(1) is True while capacity_tokens={cap} are in use"
    backend.free("full")
    assert backend.can_allocate(cap), f"{name}: can_allocate({cap}) is False after the only sequence was freed"
