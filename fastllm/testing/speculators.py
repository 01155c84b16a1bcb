"""Conformance of speculators: proposals the engine can verify."""
from __future__ import annotations

from .api import check_api_version
from .reference import fake_request


def check_speculator(spec, *, vocab_size: int = 256) -> dict[str, list[int]]:
    """`spec` has a bool `enabled`; propose() returns {request id: [draft token ids]} for a subset
    of the requests given, with token ids in [0, vocab_size), leaves the requests unchanged, and
    proposes nothing when disabled or given no requests. Returns the proposals."""
    check_api_version(spec, "speculator")
    name = type(spec).__name__
    assert type(getattr(spec, "enabled", None)) is bool, f"{name}: `enabled` must be a bool, got {spec.enabled!r}"
    empty = spec.propose([])
    assert isinstance(empty, dict) and not empty, f"{name}: propose([]) must return {{}}, got {empty!r}"
    pattern = [v % vocab_size for v in (11, 12, 13, 14)]
    reqs = [fake_request("s0", pattern * 4, max_tokens=8),  # repeats: prompt lookup finds a match
            fake_request("s1", [v % vocab_size for v in range(3, 40, 3)], max_tokens=8),
            fake_request("s2", [7 % vocab_size], max_tokens=8)]
    reqs[0].token_ids += pattern[:2]  # with output tokens too
    before = [list(r.token_ids) for r in reqs]
    out = spec.propose(reqs)
    assert isinstance(out, dict), f"{name}: propose() returned a {type(out).__name__}, not a dict"
    assert [r.token_ids for r in reqs] == before, f"{name}: propose() modified the requests' token_ids"
    unknown = sorted(set(out) - {r.id for r in reqs})
    assert not unknown, f"{name}: propose() returned drafts for unknown request ids {unknown}"
    for rid, draft in out.items():
        assert isinstance(draft, list) and all(type(t) is int and 0 <= t < vocab_size for t in draft), (
            f"{name}: the draft for {rid} must be a list of int token ids in [0, {vocab_size}), got {draft!r}")
    if not spec.enabled:
        assert not any(out.values()), f"{name}: a disabled speculator proposed {out}"
    return out
