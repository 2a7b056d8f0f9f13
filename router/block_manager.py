"""The paged KV-block manager: allocation, ref-counted sharing, and a prefix cache of full blocks."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class Block:
    id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and computed: hash(parent hash, its tokens)


@dataclass
class BlockStats:
    # counted by the scheduler once per sequence, at its first admission (not on retries or after preemption)
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of which served from it
    preemptions: int = 0


@dataclass
class SeqBlocks:
    """A sequence's block table and the hashes of its full blocks so far."""

    table: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        # free blocks in eviction order (least recently freed first); cached ones keep their hash until reused
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = BlockStats()

    @property
    def num_free(self) -> int:
        return len(self.free)

    def match_prefix(self, seq: SeqBlocks, tokens: list[int]) -> int:
        """Take cached blocks for the longest full-block prefix of tokens[:-1]; returns tokens covered.

        The last token is always recomputed: its logits are needed to sample.
        """
        assert not seq.table, "prefix matching happens at admission, on an empty table"
        if not self.enable_prefix_caching:
            return 0
        for h in prompt_block_hashes(tokens, self.block_size):
            bid = self.cached.get(h)
            if bid is None:
                break
            self._ref(bid)
            seq.table.append(bid)
            seq.hashes.append(h)
        return len(seq.table) * self.block_size

    def cached_blocks(self, hashes: list[int]) -> int:
        """How many of the leading `hashes` (prompt_block_hashes) the prefix cache holds now; takes nothing."""
        n = 0
        while n < len(hashes) and hashes[n] in self.cached:
            n += 1
        return n

    def allocate(self, seq: SeqBlocks, num_tokens: int) -> bool:
        """Grow the table to hold num_tokens; False (and nothing taken) if the blocks are not there."""
        need = self._needed(seq, num_tokens)
        if need > self.num_free:
            return False
        for _ in range(need):
            bid, _ = self.free.popitem(last=False)
            block = self.blocks[bid]
            if block.hash is not None and self.cached.get(block.hash) == bid:
                del self.cached[block.hash]  # evicted from the prefix cache
            block.hash, block.ref_count = None, 1
            seq.table.append(bid)
        return True

    def commit(self, seq: SeqBlocks, tokens: list[int], num_computed: int) -> None:
        """Register the blocks that are now full and computed in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        while len(seq.hashes) < num_computed // self.block_size:
            i = len(seq.hashes)
            h = _hash(seq.hashes[-1] if seq.hashes else None, tokens[i * self.block_size : (i + 1) * self.block_size])
            seq.hashes.append(h)
            block = self.blocks[seq.table[i]]
            if block.hash is None:
                block.hash = h
                self.cached.setdefault(h, block.id)

    def release(self, seq: SeqBlocks) -> None:
        """Drop the sequence's references; tail blocks go first in eviction order."""
        for bid in reversed(seq.table):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[bid] = None
        seq.table.clear()
        seq.hashes.clear()

    def _needed(self, seq: SeqBlocks, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.table))

    def _ref(self, bid: int) -> None:
        block = self.blocks[bid]
        if block.ref_count == 0:
            del self.free[bid]
        block.ref_count += 1


def _hash(parent: int | None, tokens: list[int]) -> int:
    return hash((parent, tuple(tokens)))


def prompt_block_hashes(tokens: list[int], block_size: int) -> list[int]:
    """The chained hashes of the full blocks of tokens[:-1]: the blocks a prompt may take from a prefix cache."""
    hashes: list[int] = []
    for i in range((len(tokens) - 1) // block_size):
        hashes.append(_hash(hashes[-1] if hashes else None, tokens[i * block_size : (i + 1) * block_size]))
    return hashes
