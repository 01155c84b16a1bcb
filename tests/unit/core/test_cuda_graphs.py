"""The ladder of decode batch sizes that CUDA graphs are captured for (the replay itself is tested
against eager decoding in tests/gpu)."""
from __future__ import annotations

import pytest

from fastllm.core.cuda_graphs import ladder


@pytest.mark.parametrize("max_bs", [1, 3, 16, 100, 512, 513, 600, 1024])
def test_ladder_holds_every_batch_with_bounded_padding(max_bs):
    sizes = ladder(max_bs)
    assert sizes == sorted(set(sizes)) and sizes[0] == 1 and sizes[-1] == max_bs
    for bs in range(1, max_bs + 1):  # the graph a batch replays: the smallest that holds it
        graph = next(s for s in sizes if s >= bs)
        assert graph - bs <= (15 if bs <= 512 else 31), (bs, graph)


def test_ladder_to_1024_has_every_32_above_512():
    sizes = ladder(1024)
    assert [s for s in sizes if s >= 512] == list(range(512, 1025, 32))
    assert len(sizes) == 52
