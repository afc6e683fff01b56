"""The offline Python API: `LLM(model=...).generate(...)`, `.chat(...)`, and `jpaged.generate`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from jpaged.beam_search import BeamSearchOutput, BeamSearchParams, to_beam_output
from jpaged.config import EngineConfig
from jpaged.engine import LLMEngine, PromptType
from jpaged.outputs import RequestOutput
from jpaged.sampling_params import SamplingParams
from jpaged.tokenizer import Tokenizer

Conversation = list[dict[str, Any]]


class LLM:
    """An engine plus a blocking generate loop, like `vllm.LLM`.

    `model=None` serves the embedded SmolLM2-135M-Instruct; other keyword arguments are
    `EngineConfig` fields (block_size, num_blocks, kv_cache_memory, max_model_len, ...).
    """

    def __init__(self, model: str | None = None, **engine_options: Any) -> None:
        config = EngineConfig(model=model, **engine_options)
        if config.mesh_shape()[0] > 1:  # dp replicas (jpaged.data_parallel)
            from jpaged.data_parallel import DataParallelEngine

            self.engine = DataParallelEngine(config)
        else:
            self.engine = LLMEngine(config)
        self._ids = itertools.count()

    @classmethod
    def from_engine(cls, engine: LLMEngine | Any) -> LLM:
        llm = cls.__new__(cls)
        llm.engine = engine
        llm._ids = itertools.count()
        return llm

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for one prompt or a list; returns finished outputs in input order.

        A prompt is a string, a list of token ids, or {"prompt_token_ids": [...]}.
        ValueError if a prompt or the number of sampling params is invalid; nothing is
        queued in that case.
        """
        prompts = self._as_list(prompts)
        if sampling_params is None:
            params = [SamplingParams()] * len(prompts)
        elif isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(
                    f"sampling_params has {len(params)} entries but there are {len(prompts)} prompts"
                )
        return self._run(prompts, params, use_tqdm)

    def beam_search(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: BeamSearchParams,
        use_tqdm: bool = False,
    ) -> list[BeamSearchOutput]:
        """Beam search each prompt inside the engine (beams share blocks); input order.

        Each output holds params.beam_width beams, best score first. ValueError as
        `generate` (nothing queued), or for a beam_width the engine cannot serve.
        """
        prompts = self._as_list(prompts)
        outs = self._run(prompts, [params] * len(prompts), use_tqdm)
        return [to_beam_output(o, params.length_penalty) for o in outs]

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the chat template to one conversation or a list of them, then generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts: list[PromptType] = []
        for conv in convs:
            text = self.engine.tokenizer.apply_chat_template(
                conv, add_generation_prompt=add_generation_prompt, chat_template=chat_template
            )
            # the template already holds any BOS: do not add special tokens again
            ids = self.engine.tokenizer.encode(text, add_special_tokens=False)
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm)

    @staticmethod
    def _as_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
        if isinstance(prompts, str | dict) or (
            isinstance(prompts, list | tuple) and prompts and isinstance(prompts[0], int)
        ):
            return [prompts]
        return list(prompts)

    def _run(
        self,
        prompts: list[PromptType],
        params: Sequence[SamplingParams | BeamSearchParams],
        use_tqdm: bool,
    ) -> list[RequestOutput]:
        engine = self.engine
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
        added: list[str] = []
        try:
            for rid, prompt, p in zip(ids, prompts, params, strict=True):
                if isinstance(p, BeamSearchParams):
                    engine.add_beam_request(rid, prompt, p)
                else:
                    engine.add_request(rid, prompt, p)
                added.append(rid)
        except ValueError:
            engine.abort_request(added)
            raise
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Generating", disable=not use_tqdm, unit="req")
        generated = 0
        try:
            while len(finished) < len(ids):
                for out in engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
                        generated += sum(len(o.token_ids) for o in out.outputs)
                        rate = generated / max(bar.format_dict["elapsed"], 1e-9)
                        bar.set_postfix_str(f"{rate:.0f} tok/s")
        except BaseException:
            engine.abort_request([r for r in ids if r not in finished])
            raise
        finally:
            bar.close()
        return [finished[r] for r in ids]


_default_llm: LLM | None = None


def generate(
    prompts: PromptType | Sequence[PromptType],
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    use_tqdm: bool = False,
) -> list[RequestOutput]:
    """Generate with a process-wide engine of the default model (created on first use)."""
    global _default_llm
    if _default_llm is None:
        _default_llm = LLM()
    return _default_llm.generate(prompts, params, use_tqdm=use_tqdm)
