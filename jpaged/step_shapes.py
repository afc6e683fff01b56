"""Step shapes: how a step is padded into power-of-two buckets, and which shapes exist.

A step's shape is (T tokens, G query tiles, Q slots per tile, R sampling rows); one jitted
program exists per shape, so this module bounds the number of compilations: `step_shape`
is the one function that decides padding, and the `*_step_shapes` functions list what it
can return (the warm-up sets).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jpaged.model_runner import StepSeq

MIN_TOKEN_BUCKET = 8
PREFILL_TILE = 32  # query slots per tile in steps with prefill chunks (measured: see README)


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


@dataclasses.dataclass(frozen=True, slots=True)
class StepShape:
    num_tokens: int  # T
    num_tiles: int  # G query tiles (= sequences in a pure decode step)
    tile_size: int  # Q query slots per tile (1 in a pure decode step)
    num_rows: int  # R sampling rows


def step_shape(seqs: Sequence[StepSeq], num_rows: int, verify_tile: int = 0) -> StepShape:
    """The bucketed shape of a step; the one function that decides padding.

    verify_tile: a verify step (drafts, a sampling row per token): tiles of at least this
    many slots and R = T, so these steps take few shapes.
    """
    lens = [len(s.token_ids) for s in seqs]
    tile = max(min(bucket(max(lens)), PREFILL_TILE), verify_tile)
    num_tiles = bucket(sum(-(-n // tile) for n in lens))
    num_tokens = bucket(sum(lens), MIN_TOKEN_BUCKET)
    return StepShape(
        num_tokens=num_tokens,
        num_tiles=num_tiles,
        tile_size=tile,
        num_rows=num_tokens if verify_tile else max(num_tiles, bucket(num_rows)),
    )


def verify_tile_size(num_speculative_tokens: int) -> int:
    """Query slots per tile in verify steps: one tile holds a chunk of k + 1 tokens."""
    return min(bucket(num_speculative_tokens + 1), PREFILL_TILE)


def all_step_shapes(
    max_num_seqs: int, max_num_batched_tokens: int, num_speculative_tokens: int = 0
) -> list[StepShape]:
    """Every shape `step_shape` can return for single-sample rows (the warm-up set), with
    the verify steps of speculative decoding (a row per token) when num_speculative_tokens.

    A superset where the exact set is awkward to state: it may hold a few unused shapes.
    """
    shapes = set(verify_step_shapes(max_num_seqs, max_num_batched_tokens, num_speculative_tokens))
    for n_tok in range(1, max_num_batched_tokens + 1):
        t = bucket(n_tok, MIN_TOKEN_BUCKET)
        if n_tok <= max_num_seqs:  # pure decode: one tile per sequence
            shapes.add(StepShape(t, bucket(n_tok), 1, bucket(n_tok)))
        q = 2
        while q <= min(PREFILL_TILE, bucket(n_tok)):
            longest_min = q // 2 + 1 if q < PREFILL_TILE else q // 2 + 1
            if longest_min <= n_tok:
                g_min = -(-n_tok // q)
                # the longest chunk takes >= 1 tile; each other sequence at most 1 + len // q
                g_max = min(n_tok - longest_min + 1, max_num_seqs + n_tok // q)
                g = bucket(g_min)
                while g // 2 < g_max:
                    shapes.add(StepShape(t, g, q, g))
                    g *= 2
            q *= 2
    return sorted(shapes, key=lambda s: (s.num_tokens, s.tile_size, s.num_tiles))


def burst_prefill_shapes(max_num_seqs: int, max_num_batched_tokens: int) -> set[StepShape]:
    """The prefill shapes a burst of prompts takes: a full or half token budget (T) in
    PREFILL_TILE-slot tiles, one or two tiles per PREFILL_TILE tokens of the full budget
    (short prompts and chunk ends leave tiles part empty). Measured on W: its 5 prefill steps
    are (2048, 128 tiles) x 4 and (1024, 128 tiles). Not all of them are valid shapes: callers
    intersect with all_step_shapes."""
    full = bucket(max_num_batched_tokens, MIN_TOKEN_BUCKET)
    tiles = [bucket(-(-full // PREFILL_TILE)) * f for f in (1, 2)]
    tiles = [g for g in tiles if g <= bucket(max_num_seqs + full // PREFILL_TILE)]
    return {StepShape(t, g, PREFILL_TILE, g) for t in (full, full // 2) for g in tiles}


def verify_step_shapes(
    max_num_seqs: int, max_num_batched_tokens: int, num_speculative_tokens: int
) -> list[StepShape]:
    """The shapes `step_shape` gives verify steps: decodes whose chunks carry up to
    num_speculative_tokens drafts, one tile each (none when 0)."""
    shapes = set()
    q = verify_tile_size(num_speculative_tokens)
    g = 1
    while num_speculative_tokens and g <= bucket(max_num_seqs):
        for n_tok in range(g // 2 + 1, min(g * q, max_num_batched_tokens) + 1):
            t = bucket(n_tok, MIN_TOKEN_BUCKET)
            shapes.add(StepShape(t, g, q, t))
        g *= 2
    return sorted(shapes, key=lambda s: (s.num_tokens, s.tile_size, s.num_tiles))
