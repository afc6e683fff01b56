"""vLLM's `use_beam_search` and `best_of` extras: which engine request they make, and which
`n` of its outputs the client gets.

- use_beam_search: a beam search of width best_of (default n) inside the engine; the best n
  beams are the choices (best score first). Deterministic: temperature, top_p, ... are not
  used; logprobs, stop strings, stop_token_ids and min_tokens are refused (400).
- best_of > n without beam search: best_of samples, the n with the highest cumulative
  logprob are the choices (vLLM's rule). Not with stream (OpenAI: best_of cannot stream).
"""

from __future__ import annotations

import dataclasses

from jpaged.beam_search import BeamSearchParams
from jpaged.outputs import RequestOutput
from jpaged.sampling_params import SamplingParams
from serve.errors import bad_request


def check_beam_fields(
    *,
    n: int,
    best_of: int | None,
    use_beam_search: bool,
    stream: bool,
    params: SamplingParams,
    logprobs_param: str,
) -> None:
    """400 for a best_of / use_beam_search combination the server cannot honour."""
    if best_of is not None:
        if best_of < n:
            raise bad_request(f"best_of must be >= n={n}, got {best_of}", "best_of")
        if best_of > n and stream:
            raise bad_request("best_of > n cannot be used with stream", "best_of")
    if not use_beam_search:
        return
    refused = [
        (params.logprobs is not None, logprobs_param),
        (bool(params.stop), "stop"),
        (bool(params.stop_token_ids), "stop_token_ids"),
        (params.min_tokens > 0, "min_tokens"),
    ]
    for bad, name in refused:
        if bad:
            raise bad_request(f"{name} is not supported with use_beam_search", name)


def engine_params(
    params: SamplingParams,
    *,
    best_of: int | None,
    use_beam_search: bool,
    length_penalty: float,
    room: int,
) -> SamplingParams | BeamSearchParams:
    """What to submit for each prompt; room = tokens left in the context after the prompt."""
    width = best_of or params.n
    if use_beam_search:
        max_tokens = room if params.max_tokens is None else params.max_tokens
        try:
            return BeamSearchParams(beam_width=width, max_tokens=max_tokens,
                                    ignore_eos=params.ignore_eos,
                                    length_penalty=length_penalty)  # fmt: skip
        except ValueError as exc:
            raise bad_request(str(exc), "length_penalty") from None
    if width != params.n:
        return dataclasses.replace(params.clone(), n=width)
    return params


def best_n(out: RequestOutput, n: int, use_beam_search: bool) -> RequestOutput:
    """The client's n choices: the first n beams, or the n samples of highest cumulative logprob."""
    if len(out.outputs) <= n:
        return out
    ranked = (
        out.outputs
        if use_beam_search
        else sorted(out.outputs, key=lambda o: -(o.cumulative_logprob or 0.0))
    )
    chosen = [dataclasses.replace(o, index=i) for i, o in enumerate(ranked[:n])]
    return dataclasses.replace(out, outputs=chosen)
