"""Block manager: exact block ids, ref counts, LRU eviction, copy-on-write, invariant checker."""

import pytest

from jpaged.block_manager import BlockManager, hash_block
from jpaged.sequence import Sequence


def make_seq(seq_id: int, token_ids: list[int]) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", token_ids, len(token_ids))


def compute(bm: BlockManager, seq: Sequence, num_new: int, cached: list[int] | None = None):
    """What the scheduler does around a step: allocate, then advance and register hashes."""
    copies = bm.allocate_for(seq, num_new, cached)
    assert copies is not None
    before = len(cached) * bm.block_size if cached is not None else seq.num_computed_tokens
    seq.num_computed_tokens = before + num_new
    bm.cache_full_blocks(seq, before)
    return copies


def refs(bm: BlockManager, block_ids: list[int]) -> list[int]:
    return [bm.blocks[b].ref_count for b in block_ids]


def test_null_block_is_never_allocated():
    bm = BlockManager(4, 2, enable_prefix_caching=False)
    assert bm.num_free_blocks == 3 and bm.free_block_ids() == [1, 2, 3]
    seq = make_seq(0, list(range(6)))
    assert compute(bm, seq, 6) == []
    assert seq.block_table == [1, 2, 3]
    assert bm.allocate_for(make_seq(1, [5]), 1) is None  # block 0 is not handed out
    bm.check_invariants([seq])


def test_allocation_and_free_order_without_caching():
    bm = BlockManager(6, 4, enable_prefix_caching=False)
    a, b = make_seq(0, list(range(10))), make_seq(1, list(range(5)))
    compute(bm, a, 10)
    compute(bm, b, 5)
    assert (a.block_table, b.block_table) == ([1, 2, 3], [4, 5])
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.peak_used_blocks) == (0, 5, 5)
    c = make_seq(2, [7])
    assert bm.allocate_for(c, 1) is None and c.block_table == []  # all or nothing
    bm.free(a)
    assert a.block_table == [] and bm.free_block_ids() == [1, 2, 3]  # unhashed: to the front
    compute(bm, c, 1)
    assert c.block_table == [1]
    # on demand: a decode inside the last block takes nothing, the next token takes one
    b.append_token(9)
    assert compute(bm, b, 1) == [] and b.block_table == [4, 5]
    bm.check_invariants([b, c])
    assert bm.num_cached_blocks == 0 and bm.num_query_tokens == 0


def test_prefix_hit_shares_full_blocks():
    bm = BlockManager(10, 16)
    prompt = list(range(100, 140))  # 40 tokens: blocks of 16, 16, 8
    a, b = make_seq(0, prompt), make_seq(1, prompt)
    assert bm.match_prefix(a) == []
    compute(bm, a, 40, [])
    assert a.block_table == [1, 2, 3]
    assert [bm.blocks[i].hash for i in (1, 2, 3)] == [*a.block_hashes[:2], None]
    assert a.block_hashes[1] == hash_block(hash_block(b"", prompt[:16]), prompt[16:32])
    cached = bm.match_prefix(b)
    assert cached == [1, 2]
    compute(bm, b, 40 - 32, cached)
    assert b.block_table == [1, 2, 4] and b.num_computed_tokens == 40
    assert refs(bm, [1, 2, 3, 4]) == [2, 2, 1, 1]
    assert (bm.num_query_tokens, bm.num_hit_tokens) == (80, 32)
    bm.check_invariants([a, b])
    bm.free(a)
    bm.free(b)
    assert bm.free_block_ids() == [4, 3, 5, 6, 7, 8, 9, 2, 1]  # b's 2 and 1 freed last: MRU
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 9
    bm.check_invariants([])


def test_hit_never_covers_the_last_token():
    bm = BlockManager(10, 16)
    prompt = list(range(32))  # exactly 2 full blocks
    a = make_seq(0, prompt)
    compute(bm, a, 32, [])
    assert a.block_table == [1, 2] and bm.blocks[2].hash is not None
    b = make_seq(1, prompt)
    cached = bm.match_prefix(b)
    assert cached == [1]  # capped at (32 - 1) // 16 blocks: token 31 is recomputed
    compute(bm, b, 16, cached)
    assert b.block_table == [1, 3]
    assert bm.blocks[3].hash is None  # same tokens as block 2: not cached twice
    assert refs(bm, [1, 2, 3]) == [2, 1, 1]
    bm.check_invariants([a, b])


def test_lru_eviction_order():
    bm = BlockManager(7, 4)  # blocks 1..6
    a, b = make_seq(0, list(range(9))), make_seq(1, list(range(100, 109)))
    compute(bm, a, 9, [])
    compute(bm, b, 9, [])
    assert (a.block_table, b.block_table) == ([1, 2, 3], [4, 5, 6])
    bm.free(a)
    bm.free(b)
    # unhashed tails (3, 6) go first; hashed blocks enter the back, a prefix's tail first
    assert bm.free_block_ids() == [6, 3, 2, 1, 5, 4]
    assert bm.num_cached_blocks == 4
    a2, b2 = make_seq(2, list(range(9))), make_seq(3, list(range(100, 109)))
    assert (bm.match_prefix(a2), bm.match_prefix(b2)) == ([1, 2], [4, 5])
    c = make_seq(4, list(range(200, 211)))
    compute(bm, c, 8)  # takes 6, 3: no eviction
    assert c.block_table == [6, 3] and bm.num_cached_blocks == 4
    compute(bm, c, 3)  # evicts 2, a's second block
    assert c.block_table == [6, 3, 2] and bm.blocks[2].hash is None
    assert (bm.match_prefix(a2), bm.match_prefix(b2)) == ([1], [4, 5])
    # a hit makes block 4 used again; freed, it is the most recently used
    compute(bm, b2, 1, [4, 5])
    assert refs(bm, [4, 5]) == [1, 1] and b2.block_table == [4, 5, 1]  # 1 evicted: LRU
    assert bm.match_prefix(a2) == []
    bm.free(b2)
    assert bm.free_block_ids() == [1, 5, 4]  # 1 now holds b2's unhashed tail: reused first
    bm.check_invariants([c])


def test_fork_then_copy_on_write():
    bm = BlockManager(8, 4)
    parent = make_seq(0, list(range(6)))  # blocks [full, partial]
    compute(bm, parent, 6, [])
    child = parent.fork(1, 1)
    bm.fork(parent, child)
    assert child.block_table == parent.block_table == [1, 2]
    assert child.block_table is not parent.block_table
    assert refs(bm, [1, 2]) == [2, 2]
    bm.check_invariants([parent, child])
    parent.append_token(50)
    child.append_token(60)
    assert compute(bm, parent, 1) == [(2, 3)]  # first writer of the shared partial block copies
    assert parent.block_table == [1, 3] and refs(bm, [1, 2, 3]) == [2, 1, 1]
    assert compute(bm, child, 1) == []  # now the sole reader: writes in place
    assert child.block_table == [1, 2]
    bm.check_invariants([parent, child])
    bm.free(parent)
    assert refs(bm, [1, 2, 3]) == [1, 1, 0]
    bm.free(child)
    assert bm.num_free_blocks == 7 and bm.num_cached_blocks == 1  # only block 1 is full
    bm.check_invariants([])


def test_fork_at_a_block_boundary_copies_nothing():
    bm = BlockManager(8, 4)
    parent = make_seq(0, list(range(8)))
    compute(bm, parent, 8, [])
    children = [parent.fork(i, i) for i in (1, 2)]
    for child in children:
        bm.fork(parent, child)
    assert refs(bm, [1, 2]) == [3, 3]
    for k, seq in enumerate([parent, *children]):
        seq.append_token(k)
        assert compute(bm, seq, 1) == []
    assert [s.block_table for s in (parent, *children)] == [[1, 2, 3], [1, 2, 4], [1, 2, 5]]
    bm.check_invariants([parent, *children])


def test_copy_on_write_needs_a_free_block():
    bm = BlockManager(3, 4)  # blocks 1, 2
    parent = make_seq(0, list(range(6)))
    compute(bm, parent, 6, [])
    child = parent.fork(1, 1)
    bm.fork(parent, child)
    child.append_token(1)
    assert bm.allocate_for(child, 1) is None  # no block for the copy: nothing changes
    assert child.block_table == [1, 2] and refs(bm, [1, 2]) == [2, 2]


def test_check_invariants_catches_corruption():
    bm = BlockManager(5, 4)
    seq = make_seq(0, list(range(5)))
    compute(bm, seq, 5, [])
    bm.check_invariants([seq])
    with pytest.raises(AssertionError, match="block 1 has ref_count 1 but 0 users"):
        bm.check_invariants([])
    bm.blocks[1].ref_count = 2
    with pytest.raises(AssertionError, match="block 1 has ref_count 2 but 1 users"):
        bm.check_invariants([seq])
    bm.blocks[1].ref_count = 1
    bm.blocks[3].hash = b"x"
    with pytest.raises(AssertionError, match="missing from the hash table"):
        bm.check_invariants([seq])


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_blocks must be >= 2"):
        BlockManager(1, 16)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        BlockManager(8, 0)
