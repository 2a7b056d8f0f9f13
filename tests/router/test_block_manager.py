"""The KV-block manager: all-or-nothing allocation, eviction order, ref-counted prefix sharing."""

from __future__ import annotations

from shardserve.router.block_manager import BlockManager, SeqBlocks

BS = 4  # tokens per block


def filled(bm: BlockManager, tokens: list[int]) -> SeqBlocks:
    """A sequence whose tokens are all allocated, computed and committed."""
    seq = SeqBlocks()
    assert bm.allocate(seq, len(tokens))
    bm.commit(seq, tokens, len(tokens))
    return seq


def check_refs(bm: BlockManager, *seqs: SeqBlocks) -> None:
    """Each block's ref_count is the number of tables holding it; free blocks are exactly the unheld ones."""
    for block in bm.blocks:
        assert block.ref_count == sum(s.table.count(block.id) for s in seqs) >= 0
    assert set(bm.free) == {b.id for b in bm.blocks if b.ref_count == 0}


def test_allocate_takes_only_the_missing_blocks() -> None:
    bm, seq = BlockManager(8, BS), SeqBlocks()
    assert bm.allocate(seq, 5) and len(seq.table) == 2
    assert bm.allocate(seq, 8) and len(seq.table) == 2  # the second block has room
    assert bm.allocate(seq, 9) and len(seq.table) == 3
    assert bm.num_free == 5


def test_failed_allocate_takes_nothing() -> None:
    bm = BlockManager(4, BS)
    a, b = SeqBlocks(), SeqBlocks()
    assert bm.allocate(a, 3 * BS)
    assert not bm.allocate(b, 2 * BS)
    assert b.table == [] and bm.num_free == 1
    assert bm.allocate(b, BS)  # what does fit still does
    check_refs(bm, a, b)


def test_freed_blocks_are_reused_least_recently_freed_first_tail_first() -> None:
    bm = BlockManager(4, BS)
    a, b = SeqBlocks(), SeqBlocks()
    assert bm.allocate(a, 2 * BS) and bm.allocate(b, BS)
    assert (a.table, b.table) == ([0, 1], [2])
    bm.release(b)
    bm.release(a)  # a's tail block goes before its head: a prefix is evicted from its end
    assert list(bm.free) == [3, 2, 1, 0]
    c = SeqBlocks()
    assert bm.allocate(c, 4 * BS)
    assert c.table == [3, 2, 1, 0]


def test_reusing_a_cached_block_evicts_its_hash() -> None:
    bm = BlockManager(2, BS)
    tokens = list(range(BS + 1))
    bm.release(filled(bm, tokens))
    assert len(bm.cached) == 1
    other = SeqBlocks()
    assert bm.allocate(other, 2 * BS)  # takes every block, the cached one too
    assert bm.cached == {} and all(b.hash is None for b in bm.blocks)
    bm.release(other)
    assert bm.match_prefix(SeqBlocks(), tokens) == 0


def test_shared_prefix_is_ref_counted() -> None:
    bm = BlockManager(8, BS)
    tokens = list(range(2 * BS + 1))
    a = filled(bm, tokens)
    b = SeqBlocks()
    assert bm.match_prefix(b, tokens) == 2 * BS
    assert b.table == a.table[:2]
    assert [bm.blocks[i].ref_count for i in b.table] == [2, 2]
    check_refs(bm, a, b)
    bm.release(a)
    assert [bm.blocks[i].ref_count for i in b.table] == [1, 1]
    assert not set(b.table) & set(bm.free)  # still held by b
    check_refs(bm, b)
    bm.release(b)
    bm.release(b)  # a second release has nothing left to drop
    check_refs(bm)
    assert bm.num_free == 8


def test_match_prefix_never_covers_the_last_token() -> None:
    bm = BlockManager(8, BS)
    tokens = list(range(2 * BS))
    bm.release(filled(bm, tokens))  # both blocks full and cached
    seq = SeqBlocks()
    assert bm.match_prefix(seq, tokens) == BS  # the last token's logits must be computed
    bm.release(seq)
    assert bm.match_prefix(seq, tokens + [99]) == 2 * BS


def test_match_prefix_follows_the_hash_chain() -> None:
    bm = BlockManager(8, BS)
    bm.release(filled(bm, [1] * BS + [2] * BS + [3]))
    # the same second block after a different first one is another prefix
    assert bm.match_prefix(SeqBlocks(), [9] * BS + [2] * BS + [3]) == 0
    assert bm.match_prefix(SeqBlocks(), [1] * BS + [7] * BS + [3]) == BS


def test_commit_registers_only_full_computed_blocks() -> None:
    bm, seq = BlockManager(8, BS), SeqBlocks()
    tokens = list(range(2 * BS + 2))
    assert bm.allocate(seq, len(tokens))
    bm.commit(seq, tokens, BS + 3)  # the second block is not yet computed to its end
    assert len(seq.hashes) == 1 and len(bm.cached) == 1
    bm.commit(seq, tokens, len(tokens))
    assert len(seq.hashes) == 2 and len(bm.cached) == 2
    assert bm.blocks[seq.table[2]].hash is None  # partly filled


def test_disabled_prefix_caching_never_shares() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    tokens = list(range(2 * BS + 1))
    bm.release(filled(bm, tokens))
    assert bm.cached == {}
    seq = SeqBlocks()
    assert bm.match_prefix(seq, tokens) == 0 and seq.table == []
