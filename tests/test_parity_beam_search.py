"""Beam search on the default model against transformers' generate(num_beams=k): same beams,
same order, same scores (Must show 1 of the beam-search issue)."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from jpaged.beam_search import BeamSearchParams
from jpaged.llm import LLM
from tests.util import ROOT, ref_python

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a land far away,",
]
WIDTHS = [2, 4]
NUM_NEW = 16
EOS = 2


@pytest.fixture(scope="module")
def reference(default_model_dir, tmp_path_factory):
    llm = LLM(max_model_len=256, num_blocks=128, block_size=16)
    tok = llm.get_tokenizer()
    prompts = [tok.encode(p) for p in PROMPTS]
    tmp = tmp_path_factory.mktemp("ref_beam")
    req, out = tmp / "request.json", tmp / "out.json"
    req.write_text(json.dumps({"model_dir": str(default_model_dir), "prompts": prompts,
                               "beam_widths": WIDTHS, "max_new_tokens": NUM_NEW,
                               "length_penalty": 1.0}))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX", "XLA"))}
    env["OMP_NUM_THREADS"] = "2"
    script = ROOT / "tests" / "ref" / "ref_beam.py"
    subprocess.run([ref_python(), str(script), str(req), str(out)], check=True, env=env,
                   timeout=900)  # fmt: skip
    return llm, prompts, json.loads(out.read_text())


@pytest.mark.parametrize("width", WIDTHS)
def test_beam_search_equals_transformers(reference, width):
    llm, prompts, ref = reference
    outs = llm.beam_search(prompts, BeamSearchParams(beam_width=width, max_tokens=NUM_NEW))
    for i, out in enumerate(outs):
        want = ref[f"w{width}_p{i}"]
        assert all(EOS not in s for s in want["sequences"]), "pick prompts where no beam ends"
        got = [s.token_ids for s in out.sequences]
        assert got == want["sequences"], f"prompt {i}: beams differ"
        scores = [s.score for s in out.sequences]
        np.testing.assert_allclose(scores, want["scores"], atol=2e-4, rtol=0)
        for s in out.sequences:  # length_penalty 1: score = cumulative / 16
            assert s.score == pytest.approx(s.cumulative_logprob / NUM_NEW)
            assert s.finish_reason == "length" and s.text == llm.get_tokenizer().decode(s.token_ids)
        print(f"w={width} prompt {i}: max |score - ref| "
              f"{np.max(np.abs(np.subtract(scores, want['scores']))):.2e}")  # fmt: skip
    assert llm.engine.scheduler.stats.blocks_in_use == 0
