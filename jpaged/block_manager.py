"""Block manager: the paged KV pool's allocator — ref counts, copy-on-write, prefix caching.

Block 0 is the null block: never allocated, so padding in block tables can point at it;
usable blocks are 1..num_blocks-1. A block is in exactly one of three states:
  used    ref_count > 0, listed ref_count times across live block tables;
  cached  ref_count == 0, in the free queue, holding the hash of its (full) tokens;
  free    ref_count == 0, in the free queue, no hash.
The free queue is LRU: allocation takes from the front (evicting a cached block drops its
hash); a freed hashed block goes to the back, a freed unhashed block (worth nothing) to the
front. Prefix-cache hashes are SHA-256 over the previous block's hash and the block's token
ids: Python's hash() of int tuples is 64-bit and trivially invertible, so a client could
craft a prompt colliding with another user's prefix and read K/V it never computed;
SHA-256 costs ~1 µs per block, nothing next to a model step.
"""

import hashlib
from array import array
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NoReturn

from jpaged.sequence import Sequence

NULL_BLOCK = 0  # NOTE: never allocated; padding entries of block tables point here


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0  # number of block-table entries holding this block
    hash: bytes | None = None  # set only while registered in the prefix cache


def hash_block(prev_hash: bytes, token_ids: list[int]) -> bytes:
    """Chained hash of one full block: SHA-256(prev_hash ‖ token ids as uint32)."""
    return hashlib.sha256(prev_hash + array("I", token_ids).tobytes()).digest()


class BlockManager:
    """Owns every block's ref count and the prefix cache; sequences own their block tables."""

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self._cached: dict[bytes, int] = {}  # hash -> block id holding it
        self._num_free_cached = 0  # blocks in the free queue that hold a hash
        self.num_query_tokens = 0  # prefix-cache lookups, in tokens (cumulative)
        self.num_hit_tokens = 0  # tokens found cached (cumulative)
        self.peak_used_blocks = 0
        self.high_water = 0  # the highest block id ever taken (never-used blocks go in id order)

    # -- counters --------------------------------------------------------------------------
    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take now (free or cached)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Free blocks still holding a prefix-cache hash."""
        return self._num_free_cached

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - len(self._free)

    def free_block_ids(self) -> list[int]:
        """The free queue, next-to-be-allocated first (for tests and debugging)."""
        return list(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    # -- prefix cache ----------------------------------------------------------------------
    def _block_hash(self, seq: Sequence, index: int) -> bytes:
        """Hash of seq's full block `index`, extending seq.block_hashes as needed."""
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) <= index:
            i = len(hashes)
            hashes.append(
                hash_block(hashes[-1] if i else b"", seq.token_ids[i * bs : (i + 1) * bs])
            )
        return hashes[index]

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Ids of cached blocks holding seq's leading full blocks; changes nothing.

        At most (num_tokens - 1) // block_size blocks: the last token is always computed
        (its logits are needed), so no shared block is ever written.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        for i in range((seq.num_tokens - 1) // self.block_size):
            block_id = self._cached.get(self._block_hash(seq, i))
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def cache_full_blocks(self, seq: Sequence, num_computed_before: int) -> None:
        """Register the blocks that became full of computed tokens since num_computed_before."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(num_computed_before // bs, seq.num_computed_tokens // bs):
            block = self.blocks[seq.block_table[i]]
            if block.hash is not None:
                continue  # already cached (a shared prefix)
            block_hash = self._block_hash(seq, i)
            if block_hash not in self._cached:  # else the same tokens live in another block
                block.hash = block_hash
                self._cached[block_hash] = block.block_id

    # -- allocation ------------------------------------------------------------------------
    def _take(self) -> int:
        """Pop the least recently used free block (evicting its hash), ref_count 1."""
        block_id, _ = self._free.popitem(last=False)
        self.high_water = max(self.high_water, block_id)
        block = self.blocks[block_id]
        if block.hash is not None:
            del self._cached[block.hash]
            block.hash = None
            self._num_free_cached -= 1
        block.ref_count = 1
        return block_id

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:  # a cached block gets a reader again
            del self._free[block_id]
            self._num_free_cached -= block.hash is not None
        block.ref_count += 1

    def _unref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[block_id] = None
            if block.hash is None:
                self._free.move_to_end(block_id, last=False)
            else:
                self._num_free_cached += 1

    def allocate_for(
        self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] | None = None
    ) -> list[tuple[int, int]] | None:
        """Extend seq.block_table to cover the tokens computed this step; all or nothing.

        cached_blocks: match_prefix(seq) for a seq holding no blocks (its first scheduling;
        counted as one prefix-cache query of num_tokens tokens); the new tokens then start
        at len(cached_blocks) * block_size, else at seq.num_computed_tokens.
        Returns the (src, dst) block copies to do before the step (copy-on-write of a shared
        partial last block), or None, changing nothing, if the free queue is too short.
        """
        bs, table = self.block_size, seq.block_table
        first_scheduling = cached_blocks is not None
        if cached_blocks is None:
            cached_blocks = []
            start = seq.num_computed_tokens
        else:
            start = len(cached_blocks) * bs
        reclaimed = sum(self.blocks[b].ref_count == 0 for b in cached_blocks)
        num_fresh = self.blocks_for(start + num_new_tokens) - len(table) - len(cached_blocks)
        cow_src = table[start // bs] if start % bs else None  # block the first new token lands in
        if cow_src is not None and self.blocks[cow_src].ref_count == 1:
            cow_src = None  # ours alone: write in place
        if num_fresh + reclaimed + (cow_src is not None) > len(self._free):
            return None
        if first_scheduling and self.enable_prefix_caching:
            self.num_query_tokens += seq.num_tokens
            self.num_hit_tokens += start
        for block_id in cached_blocks:  # before _take, which could evict them
            self._ref(block_id)
            table.append(block_id)
        copies = []
        if cow_src is not None:
            cow_dst = self._take()
            copies.append((cow_src, cow_dst))
            table[start // bs] = cow_dst
            self.blocks[cow_src].ref_count -= 1  # stays >= 1
        for _ in range(num_fresh):
            table.append(self._take())
        self.peak_used_blocks = max(self.peak_used_blocks, self.num_used_blocks)
        return copies

    def fork(self, seq: Sequence, child: Sequence) -> None:
        """child (from seq.fork) shares all of seq's blocks, the partial last one included."""
        if child.block_table != seq.block_table:
            raise ValueError("child.block_table must equal its parent's (use Sequence.fork)")
        for block_id in child.block_table:
            self.blocks[block_id].ref_count += 1  # >= 1 already: not in the free queue

    def free(self, seq: Sequence) -> None:
        """Drop seq's references, last block first (so a prefix's tail is evicted first)."""
        for block_id in reversed(seq.block_table):
            self._unref(block_id)
        seq.block_table.clear()

    def trim(self, seq: Sequence) -> None:
        """Drop seq's trailing blocks past those its computed tokens need (blocks taken for
        a verify step's drafts that were rejected)."""
        keep = self.blocks_for(seq.num_computed_tokens)
        while len(seq.block_table) > keep:
            self._unref(seq.block_table.pop())

    # -- checks ----------------------------------------------------------------------------
    def check_invariants(self, seqs: Iterable[Sequence]) -> None:
        """Raise AssertionError unless refs, free queue and hash table agree with seqs' tables.

        seqs: every sequence holding blocks (all live ones may be passed).
        """
        refs: Counter[int] = Counter()
        for seq in seqs:
            if len(set(seq.block_table)) != len(seq.block_table):
                _fail(f"seq {seq.seq_id} holds a block twice: {seq.block_table}")
            refs.update(seq.block_table)
        null = self.blocks[NULL_BLOCK]
        if refs[NULL_BLOCK] or NULL_BLOCK in self._free or null.ref_count or null.hash:
            _fail("the null block 0 was allocated")
        for block in self.blocks[1:]:
            bid = block.block_id
            if bid in self._free:
                if block.ref_count or refs[bid]:
                    _fail(
                        f"block {bid} is free with ref_count {block.ref_count}, {refs[bid]} users"
                    )
            elif block.ref_count != refs[bid] or block.ref_count == 0:
                _fail(f"block {bid} has ref_count {block.ref_count} but {refs[bid]} users")
        if (
            len(self._free) + sum(1 for b in self.blocks[1:] if b.ref_count)
            != self.num_usable_blocks
        ):
            _fail("blocks lost or double-freed")
        if any(not 1 <= bid < self.num_blocks for bid in self._free):
            _fail(f"bad block id in the free queue: {list(self._free)}")
        for block_hash, bid in self._cached.items():
            if self.blocks[bid].hash != block_hash:
                _fail(f"hash table points at block {bid}, which holds another hash")
        if sum(b.hash is not None for b in self.blocks) != len(self._cached):
            _fail("a block holds a hash missing from the hash table")
        if self._num_free_cached != sum(self.blocks[b].hash is not None for b in self._free):
            _fail("num_cached_blocks is out of date")
        if self._cached and not self.enable_prefix_caching:
            _fail("blocks cached with prefix caching off")


def _fail(message: str) -> NoReturn:
    raise AssertionError(message)
