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
PAGING = ("match_prefix", "reserve", "cache_full_blocks")
SHARED = list(range(7000, 7040))  # a 40-token prefix that the paging check's sequences share


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
    for sum(LENGTHS) tokens of this spec.

    A paged backend (one with match_prefix, reserve and cache_full_blocks) is also driven the way
    a continuous batcher drives it: sequences grow block by block, and ones that share a prefix
    with a computed (live or freed) sequence must attend over that sequence's cached K/V."""
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
            where = f"{name}, step {step} ({what}), layer {layer}"
            if layer % 2 and callable(getattr(backend, "forward_rope", None)):  # RoPE fused in the backend
                out, q, k = _forward_rope(backend, layer, q, k, v, meta, batch, where)
            else:
                out = backend.forward(layer, q, k, v, meta)
                assert all(torch.equal(a, b) for a, b in zip((q, k, v), saved)), (
                    f"{name}: forward() modified its q, k or v input in place")
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
    if all(callable(getattr(backend, m, None)) for m in PAGING):
        _check_paging(backend, name, spec, atol, g)
    after = [backend.can_allocate(n) for n in probes]
    assert after == before, (f"{name}: after every sequence was freed, can_allocate{tuple(probes)} is "
                             f"{after}, but was {before} on the empty cache: freed KV is not given back")
    _check_capacity(backend, name)


def _forward_rope(backend, layer, q, k, v, meta, batch, where):
    """backend.forward_rope on unrotated q and k; returns its output and q, k rotated by the
    model's torch RoPE (float64 cos/sin of fp32 angles), the reference's inputs."""
    from ..models.llama import Rope, apply_rotary

    dev, D = q.device, q.shape[-1]
    positions = torch.tensor([p for r, s, n in zip(batch.requests, batch.start, batch.num_new)
                              for p in range(s, s + n)], device=dev)
    inv_freq = 1.0 / (500.0 ** (torch.arange(0, D, 2, device=dev).float() / D))
    qk = torch.cat([q, k], dim=1)  # [T, H + KVH, D], as the model's fused projection lays them out
    out = backend.forward_rope(layer, qk, v, Rope(positions, inv_freq, 0.8, q.dtype), meta)
    angles = (positions[:, None].float() * inv_freq[None, :]).double()
    emb = torch.cat((angles, angles), dim=-1)[:, None, :]
    rotated = apply_rotary(torch.cat([q, k], dim=1).double(), 0.8 * emb.cos(), 0.8 * emb.sin()).to(q.dtype)
    H = q.shape[1]
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == tuple(q.shape), (
        f"{where}: forward_rope() output shape {tuple(getattr(out, 'shape', ()))}, expected {tuple(q.shape)}")
    return out, rotated[:, :H], rotated[:, H:]


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


def _check_paging(backend, name: str, spec: KVSpec, atol: float, g: torch.Generator) -> None:
    """Grow sequences with reserve, publish their blocks, and start others from the cache."""
    L, kvh, d = spec.num_layers, spec.num_kv_heads, spec.head_dim
    hist: dict[str, list[list[torch.Tensor]]] = {}

    def run(seq: str, tokens: list[int], start: int, n: int, prefix_of: str | None = None) -> None:
        r = fake_request(seq, tokens, max_tokens=1)
        r.num_computed = start
        if seq not in hist:  # the cached part of its K/V is that of the sequence it shares a prefix with
            hist[seq] = [[kv[:start] for kv in hist[prefix_of][layer]] if start else
                         [torch.zeros(0, kvh, d, dtype=torch.float64)] * 2 for layer in range(L)]
        assert backend.reserve(seq, start + n), f"{name}: reserve({seq!r}, {start + n}) is False with room"
        meta = backend.plan(Batch([r], [n]))
        for layer in range(L):
            q = torch.randn(n, spec.num_heads, d, generator=g).to(spec.dtype).to(spec.device)
            k, v = (torch.randn(n, kvh, d, generator=g).to(spec.dtype).to(spec.device) for _ in range(2))
            out = backend.forward(layer, q, k, v, meta)
            kh, vh = (torch.cat([h, x.double().cpu()]) for h, x in zip(hist[seq][layer], (k, v)))
            hist[seq][layer] = [kh, vh]
            err = (out.double().cpu() - eager_attention(q.cpu(), kh, vh, start, spec.scale)).abs().max().item()
            assert err <= atol, (f"{name}: paged sequence {seq!r} (cached {start}, new {n}), layer {layer}: "
                                 f"max |out - eager| = {err:.3g} > atol {atol:.3g}")
        backend.cache_full_blocks(seq, tokens, start + n)

    t0 = SHARED + [1, 2, 3, 4]
    c0 = backend.match_prefix("p0", t0)
    assert c0 == 0, f"{name}: match_prefix found {c0} cached tokens of a prefix never computed"
    run("p0", t0, 0, 30)  # a chunk, then the rest of the prompt, then one decode step
    run("p0", t0, 30, 14)
    t0 = t0 + [5]
    run("p0", t0, 44, 1)
    for seq, tokens, owner in [("p1", SHARED + [9] * 7, "p0"), ("p2", t0 + [6], "p0")]:
        if seq == "p2":
            backend.free("p0")  # freed blocks keep their K/V for a later hit
            backend.free("p1")
        cached = backend.match_prefix(seq, tokens)
        common = next((i for i, (a, b) in enumerate(zip(tokens, t0)) if a != b), len(t0))
        assert 0 <= cached <= min(common, len(tokens) - 1), (
            f"{name}: match_prefix({seq!r}) found {cached} cached tokens; it shares {common} with a computed "
            f"sequence and the last of its {len(tokens)} tokens must be computed")
        run(seq, tokens, cached, len(tokens) - cached, prefix_of=owner)
    backend.free("p2")
    cap = getattr(backend, "capacity_tokens", None)
    if cap is not None and cap <= 1 << 16:
        assert not backend.reserve("big", cap + 1), f"{name}: reserve of capacity_tokens + 1 = {cap + 1} is True"
        assert backend.can_allocate(cap), f"{name}: a reserve that failed kept some KV"
        backend.free("big")
