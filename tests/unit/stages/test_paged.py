"""attention="paged": conformance, sizing, step metadata, and greedy parity of the engine
(continuous + paged) with static + sdpa and HF transformers, with and without prefix caching."""
from __future__ import annotations

import importlib
import random
import sys

import pytest
import torch

from fastllm import Engine, SamplingParams
from fastllm.core.request import Batch
from fastllm.errors import ConfigError
from fastllm.stages.attention.paged import PagedAttention
from fastllm.stages.base import KVSpec
from fastllm.testing import check_attention, fake_request
from helpers import hf_greedy, load_hf, make_tiny_model

OPTS = dict(dtype="float32", device="cpu", progress=False)
PAGED = dict(batcher="continuous", attention="paged")
BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 kv heads, head_dim 16, fp32 (the tiny models)


@pytest.mark.parametrize("opts,heads,kv_heads,head_dim", [
    ({}, 6, 2, 16), ({"block_size": 1}, 4, 4, 8), ({"block_size": 5}, 5, 1, 24),
    ({"block_size": 7, "enable_prefix_caching": False}, 8, 2, 64),
])
def test_conformance(opts, heads, kv_heads, head_dim):
    check_attention(PagedAttention(**opts), num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_conformance_half(dtype):
    check_attention(PagedAttention(block_size=8), dtype=dtype)


def test_conformance_with_a_small_cache_checks_capacity():
    per_token = 2 * 2 * 2 * 16 * 4
    check_attention(PagedAttention(block_size=4, kv_cache_memory=33 * 4 * per_token))  # 32 usable blocks


class _HitWithoutKV(PagedAttention):
    """Claims prefix hits but hands out fresh blocks: the cached K/V is garbage."""

    def match_prefix(self, seq_id, token_ids):
        cached = super().match_prefix(seq_id, token_ids)
        self.free(seq_id)
        assert self.reserve(seq_id, cached)
        return cached


def test_conformance_catches_a_prefix_hit_without_its_kv():
    with pytest.raises(AssertionError, match="paged sequence 'p1'"):
        check_attention(_HitWithoutKV())


def _interpreted_kernels(monkeypatch):
    """fastllm.kernels.paged_attention in Triton's CPU interpreter (which reads TRITON_INTERPRET
    when the kernels are defined); skips on CUDA, where the compiled kernels run (tests/gpu)."""
    if torch.cuda.is_available():
        pytest.skip("on CUDA the compiled kernels run: tests/gpu")
    pytest.importorskip("triton")
    if "fastllm.kernels.paged_attention" not in sys.modules:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernels = importlib.import_module("fastllm.kernels.paged_attention")
    if type(kernels._prefill_kernel).__name__ != "InterpretedFunction":
        pytest.skip("fastllm.kernels.paged_attention was imported before TRITON_INTERPRET was set")
    return kernels


@pytest.mark.parametrize("fuse_rope_decode", [True, False])
def test_kernel_path_passes_in_the_triton_interpreter(monkeypatch, fuse_rope_decode):
    # What runs on CUDA (store_kv, rope_store_kv, paged_decode or paged_decode_rope, paged_prefill
    # with this backend's metadata)
    kernels = _interpreted_kernels(monkeypatch)

    class OnKernels(PagedAttention):
        def setup(self, spec):
            super().setup(spec)
            self._kernels = kernels

    monkeypatch.setattr(PagedAttention, "fuse_rope_decode", fuse_rope_decode)
    check_attention(OnKernels(block_size=8))


def _backend(**opts) -> PagedAttention:
    b = PagedAttention(**opts)
    b.setup(KVSpec(2, 4, 2, 16, torch.bfloat16, torch.device("cpu"), 0.25))
    return b


def test_sizing_from_kv_cache_memory_and_describe():
    block_bytes = 16 * BYTES_PER_TOKEN
    b = _backend(kv_cache_memory=10 * block_bytes + block_bytes // 2)
    assert b.kv.dtype == torch.float32  # fp32 on the CPU whatever the model dtype
    assert b.kv.shape == (2, 2, 10, 16, 2, 16)
    assert (b.num_blocks, b.block_size, b.capacity_tokens, b.num_free_blocks) == (10, 16, 144, 9)
    assert b.describe(48) == (f"KV cache: 9 blocks x 16 = 144 tokens ({10 * block_bytes / (1 << 30):.3g} GiB); "
                              "3 sequences of max_model_len=48 fit")
    assert _backend().kv.numel() * 4 <= 1 << 30  # 1 GiB by default on the CPU


@pytest.mark.parametrize("opts,match", [
    ({"kv_cache_memory": 16 * BYTES_PER_TOKEN}, "at least 2"),
    ({"block_size": 0}, "block_size"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ({"kv_cache_memory": -1}, "kv_cache_memory"),
])
def test_bad_options_raise_config_error(opts, match):
    with pytest.raises(ConfigError, match=match):
        _backend(**opts)


def test_unknown_option_is_named():
    from fastllm import registry

    with pytest.raises(ConfigError, match="block_sz"):
        registry.create("attention", "paged", {"block_sz": 8})


def test_plan_metadata_of_a_chunk_next_to_a_decode():
    b = _backend(block_size=4)
    a, c = fake_request("a", list(range(6))), fake_request("c", list(range(100, 110)))
    b.allocate("a", 7)  # blocks 1, 2
    b.allocate("c", 10)  # blocks 3, 4, 5
    a.num_computed, c.num_computed = 6, 3
    a.token_ids.append(7)
    meta = b.plan(Batch([a, c], [1, 6]))
    assert meta.slot_mapping.dtype == torch.int64 and meta.block_tables.dtype == torch.int32
    assert meta.slot_mapping.tolist() == [2 * 4 + 2, 3 * 4 + 3, 4 * 4 + 0, 4 * 4 + 1, 4 * 4 + 2, 4 * 4 + 3, 5 * 4]
    assert meta.block_tables.tolist() == [[1, 2, 0], [3, 4, 5]]  # padded with the null block
    assert meta.seq_lens.tolist() == meta.context_lens == [7, 9]
    assert meta.cu_seqlens_q.tolist() == [0, 1, 7] and meta.query_lens == [1, 6]
    assert (meta.decode_only, meta.max_query_len, meta.max_seq_len) == (False, 6, 9)
    assert meta.key_slots.tolist() == [4, 5, 6, 7, 8, 9, 10] + [12, 13, 14, 15, 16, 17, 18, 19, 20]
    assert meta.key_mask is None
    c.num_computed, c.token_ids = 9, c.token_ids + [1]
    meta = b.plan(Batch([a, c], [1, 1]))
    assert meta.decode_only and meta.max_seq_len == 10
    assert meta.key_slots.tolist() == [[4, 5, 6, 7, 8, 9, 10, 0, 0, 0], list(range(12, 22))]
    assert meta.key_mask.shape == (2, 1, 1, 10) and meta.key_mask.sum().item() == 17
    assert not b.kv[:, :, 0].any()  # padding reads the zeroed null block


# ---- the engine ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("paged")
    return {f: make_tiny_model(root, f) for f in ("llama", "qwen2")}


def _prompts(n: int = 7, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lens = [1, 3, 16, 17, 40, 95, 130][:n]  # around and across block and chunk boundaries
    return [[rng.randrange(300) for _ in range(L)] for L in lens]


def _greedy(model_dir, prompts, max_tokens: int = 10, **opts) -> list[list[int]]:
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    with Engine(str(model_dir), **OPTS, **opts) as e:
        return [o.token_ids for o in e.generate([{"prompt_token_ids": p} for p in prompts], sp)]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_matches_static_sdpa_and_hf(tiny_dirs, family):
    prompts = _prompts()
    hf = load_hf(tiny_dirs[family])
    ref = [hf_greedy(hf, p, 10) for p in prompts]
    assert _greedy(tiny_dirs[family], prompts) == ref  # static + sdpa
    # a small token budget: long prompts are prefilled in chunks next to decodes
    for overlap in (False, True):  # async_scheduling: each step scheduled before the last one's ids are read
        assert _greedy(tiny_dirs[family], prompts, max_num_batched_tokens=48, async_scheduling=overlap,
                       attention={"name": "paged", "block_size": 8}, batcher="continuous") == ref
    assert _greedy(tiny_dirs[family], prompts, attention="paged", batcher="static") == ref


def test_prefix_cache_hits_a_shared_system_prompt_and_keeps_outputs(tiny_dirs):
    rng = random.Random(1)
    system = [rng.randrange(300) for _ in range(50)]  # 6 full blocks of 8, and 2 tokens
    prompts = [system + [rng.randrange(300) for _ in range(k)] for k in (3, 9, 1, 20, 5)]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = {}
    for caching in (True, False):
        attention = {"name": "paged", "block_size": 8, "enable_prefix_caching": caching}
        with Engine(str(tiny_dirs["llama"]), batcher="continuous", attention=attention, **OPTS) as e:
            first = e.generate({"prompt_token_ids": prompts[0]}, sp)  # computes and publishes the prefix
            rest = e.generate([{"prompt_token_ids": p} for p in prompts[1:]], sp)
            outs[caching] = [o.token_ids for o in first + rest]
            pool = e.attention.pool
            hits, queries = pool.prefix_hits, pool.prefix_queries
        assert queries == sum(map(len, prompts))
        assert hits == (4 * 48 if caching else 0)  # the system prompt's 6 full blocks, for each later request
    assert outs[True] == outs[False] == _greedy(tiny_dirs["llama"], prompts, 6)


@pytest.mark.slow
@pytest.mark.parametrize("overlap", [False, True])
def test_smollm2_greedy_batch_matches_hf(smollm2_dir, smollm2_hf, overlap):
    with Engine(**OPTS, **PAGED, async_scheduling=overlap) as e:
        tok = e.tokenizer
        texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time",
                 "The three primary colors are", "import numpy as np\n", "Water boils at"]
        prompts = [tok.encode(t) for t in texts]
        outs = e.generate([{"prompt_token_ids": p} for p in prompts],
                          SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(smollm2_hf, p, 16), tok.decode(p)


def test_forward_rope_goes_through_a_subclass_forward(monkeypatch):
    from fastllm.models.llama import Rope

    kernels = _interpreted_kernels(monkeypatch)

    calls = []

    class OwnForward(PagedAttention):  # as plugins/fastllm-flash-attn does
        def forward(self, layer, q, k, v, meta):
            calls.append((q.shape, k.shape))
            return super().forward(layer, q, k, v, meta)

    b = OwnForward()
    b.setup(KVSpec(1, 4, 2, 16, torch.float32, torch.device("cpu"), 0.25))
    b._kernels = kernels  # the CUDA path, where forward_rope would otherwise fuse and skip forward()
    req = fake_request("a", list(range(5)), max_tokens=1)
    b.allocate("a", 5)
    batch = Batch([req], [5])
    qk, v = torch.randn(5, 6, 16), torch.randn(5, 2, 16)
    out = b.forward_rope(0, qk, v, Rope(torch.arange(5), torch.rand(8), 1.0, torch.float32), b.plan(batch))
    assert out.shape == (5, 4, 16) and calls == [((5, 4, 16), (5, 2, 16))]
