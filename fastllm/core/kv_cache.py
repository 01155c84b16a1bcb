"""The paged KV cache's bookkeeping: a pool of fixed-size blocks, per-sequence block tables,
and automatic prefix caching over a hash chain of full blocks (vLLM v1's block pool, nano-vllm's
collision guard). Pure host-side Python; the tensors live in the attention backend.

Free blocks wait in one queue in eviction order: a free block keeps its hash, so a later
request with the same prefix takes it back, until an allocation pops it from the head.
"""
from __future__ import annotations

from collections import OrderedDict

NULL_BLOCK = 0  # never handed out: pads block tables


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"a block pool needs at least 2 blocks (one is the null block), got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks  # collision guard
        self.cached: dict[int, int] = {}  # hash -> block id
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))  # head: evict first
        self.tables: dict[str, list[int]] = {}
        self.hashes: dict[str, list[int]] = {}  # chain hashes of each sequence's leading published blocks
        self.prefix_hits = 0  # tokens found in the cache, counted when the sequence's first reserve succeeds
        self.prefix_queries = 0  # tokens looked up, likewise (a lookup retried each step counts once)
        self._lookups: dict[str, tuple[int, int]] = {}  # seq -> (queried, hit), until that reserve

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- whole sequences (the AttentionBackend verbs) -------------------------------------
    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= self.num_free_blocks

    def allocate(self, seq_id: str, num_tokens: int) -> None:
        self.free(seq_id)  # a sequence allocated again gives back its old blocks first
        if not self.reserve(seq_id, num_tokens):
            raise RuntimeError(f"{num_tokens} tokens need {self.blocks_for(num_tokens)} KV blocks, "
                               f"{self.num_free_blocks} are free: call can_allocate first")

    def free(self, seq_id: str) -> None:
        """Give back a sequence's blocks (no-op if it holds none). Blocks whose ref count reaches 0
        join the free queue: hashed ones at the tail in reverse order (a sequence's last blocks
        cover the longest, least shared prefixes, so they go first), unhashed ones at the head."""
        self.hashes.pop(seq_id, None)
        self._lookups.pop(seq_id, None)
        for b in reversed(self.tables.pop(seq_id, [])):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free_queue[b] = None
                if self.block_hash[b] is None:
                    self.free_queue.move_to_end(b, last=False)

    # ---- growing sequences ----------------------------------------------------------------
    def match_prefix(self, seq_id: str, token_ids: list[int]) -> int:
        """Start `seq_id` with the longest cached run of its full leading blocks; return the
        number of tokens it covers. The last token is never a hit: its logits are needed."""
        assert seq_id not in self.tables, f"match_prefix({seq_id!r}) on a sequence that holds blocks"
        blocks: list[int] = []
        hashes: list[int] = []
        if self.enable_prefix_caching:
            bs, h = self.block_size, None
            for i in range((len(token_ids) - 1) // bs):
                toks = tuple(token_ids[i * bs:(i + 1) * bs])
                h = hash((h, toks))
                b = self.cached.get(h)
                if b is None or self.block_tokens[b] != toks:
                    break
                blocks.append(b)
                hashes.append(h)
        for b in blocks:
            if self.ref[b] == 0:
                del self.free_queue[b]
            self.ref[b] += 1
        self.tables[seq_id], self.hashes[seq_id] = blocks, hashes
        hit = len(blocks) * self.block_size
        self._lookups[seq_id] = (len(token_ids), hit)
        return hit

    def reserve(self, seq_id: str, num_tokens: int) -> bool:
        """Grow the sequence's blocks to hold `num_tokens`; False, changing nothing, if too few are free."""
        table = self.tables.get(seq_id)
        if table is not None and len(table) * self.block_size >= num_tokens and seq_id not in self._lookups:
            return True  # the common decode step: its last block still has room
        need = self.blocks_for(num_tokens) - (len(table) if table else 0)
        if need > self.num_free_blocks:
            return False
        if table is None:
            table = self.tables[seq_id] = []
        table.extend(self._take() for _ in range(need))
        queried, hit = self._lookups.pop(seq_id, (0, 0))
        self.prefix_queries += queried
        self.prefix_hits += hit
        return True

    def cache_full_blocks(self, seq_id: str, token_ids: list[int], num_computed: int) -> None:
        """Publish the hashes of the sequence's blocks that are now full of computed KV. Call it
        after the step that computed them ran, so an aborted step never publishes garbage."""
        if not self.enable_prefix_caching or seq_id not in self.tables:
            return
        hashes, bs = self.hashes.setdefault(seq_id, []), self.block_size
        if num_computed // bs <= len(hashes):
            return  # no block filled up in this step
        table = self.tables[seq_id]
        for i in range(len(hashes), min(num_computed // bs, len(table))):
            toks = tuple(token_ids[i * bs:(i + 1) * bs])
            h = hash((hashes[-1] if hashes else None, toks))
            hashes.append(h)
            b = table[i]
            if h not in self.cached:  # else a twin block computed in the same step stays unhashed
                self.cached[h] = b
                self.block_hash[b], self.block_tokens[b] = h, toks

    def reset_prefix_cache(self) -> None:
        """Forget the hashes of every free block (blocks in use keep theirs): later requests
        compute their prefixes again, as on a fresh cache."""
        for b in self.free_queue:
            h = self.block_hash[b]
            if h is not None:
                if self.cached.get(h) == b:
                    del self.cached[h]
                self.block_hash[b] = self.block_tokens[b] = None

    def block_table(self, seq_id: str) -> list[int]:
        return self.tables.get(seq_id, [])

    def _take(self) -> int:
        b, _ = self.free_queue.popitem(last=False)
        h = self.block_hash[b]
        if h is not None:
            if self.cached.get(h) == b:
                del self.cached[h]
            self.block_hash[b] = self.block_tokens[b] = None
        self.ref[b] = 1
        return b
