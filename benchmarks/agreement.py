"""Greedy-output bookkeeping shared by the benchmark workers (stdlib only: runs in every env).

A worker reports its outputs on W as `output_record(token_ids)`: a digest of all requests'
ids plus the ids of the first few requests; `agreement(a, b)` compares two such records.
"""

from __future__ import annotations

import hashlib
import json

NUM_COMPARED = 8  # requests whose ids travel in full (W's first 8)


def output_digest(token_ids: list[list[int]]) -> str:
    """sha256 (first 16 hex) of the output ids of all requests, in request order."""
    text = json.dumps([[int(t) for t in ids] for ids in token_ids], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def output_record(token_ids: list[list[int]]) -> dict:
    """What a worker's JSON line carries about its outputs."""
    return {
        "outputs_sha256": output_digest(token_ids),
        "first_outputs": [[int(t) for t in ids] for ids in token_ids[:NUM_COMPARED]],
    }


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Token agreement of two engines' outputs for the same requests.

    identical_requests: requests whose ids are all equal; prefix_agreement: tokens before each
    request's first difference over all tokens; positional_agreement: equal ids at equal
    positions over all tokens (a later token can agree again after a divergence).
    Raises ValueError if the two do not cover the same requests with the same lengths.
    """
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b, strict=True)):
        raise ValueError("outputs to compare must have the same requests and lengths")
    total = sum(len(x) for x in a)
    prefix = 0
    for x, y in zip(a, b, strict=True):
        diffs = [i for i, (s, t) in enumerate(zip(x, y, strict=True)) if s != t]
        prefix += diffs[0] if diffs else len(x)
    positional = sum(s == t for x, y in zip(a, b, strict=True) for s, t in zip(x, y, strict=True))
    return {
        "requests": len(a),
        "identical_requests": sum(x == y for x, y in zip(a, b, strict=True)),
        "prefix_agreement": round(prefix / max(total, 1), 4),
        "positional_agreement": round(positional / max(total, 1), 4),
        "tokens": total,
    }
