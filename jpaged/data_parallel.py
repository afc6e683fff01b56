"""Data parallelism: D independent engine replicas, each tensor-parallel on its own sub-mesh.

A dp=D, tp=T mesh is cut into D (1, T) sub-meshes (`jpaged.mesh.replica_meshes`); each
holds a full copy of the weights split T ways, its own KV pool, scheduler and prefix cache.
A request goes to the replica with the fewest unfinished requests and stays there.

Why replicas and not one scheduler splitting each batch along `dp`: a sequence's KV blocks
live in one replica's pool, so splitting a batch means pinning sequences to replicas anyway
(or moving KV between them); with one jitted program over the whole mesh every replica
would also wait for the slowest one's shapes each step (the step's bucket is the largest
replica's), and its prefill would stall the others' decodes. Separate replicas keep the
scheduler, block manager and runner unchanged, need no cross-replica collectives, and
match what vLLM does for data parallelism (one engine core per dp rank). The cost: prefix
caching does not share blocks across replicas.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from jpaged.config import EngineConfig
from jpaged.engine import EngineStats, LLMEngine, PromptType
from jpaged.mesh import build_mesh, replica_meshes
from jpaged.outputs import RequestOutput
from jpaged.sampling_params import SamplingParams
from jpaged.tokenizer import Tokenizer

if TYPE_CHECKING:
    from models.llama import Llama


class DataParallelEngine:
    """`LLMEngine`'s request API over dp replicas; `step()` steps every busy replica."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        model: Llama | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        """ValueError when the mesh needs more devices than are visible."""
        dp, tp = config.mesh_shape()
        self.config = config
        self.mesh = build_mesh(dp, tp)
        self.replicas = [
            LLMEngine(config, model=model, tokenizer=tokenizer, mesh=sub)
            for sub in replica_meshes(self.mesh)
        ]
        first = self.replicas[0]
        self.tokenizer = first.tokenizer
        self.model_config = first.model_config
        self.max_model_len = first.max_model_len
        self._owner: dict[str, LLMEngine] = {}
        # threads: each replica's step blocks on its own devices; jax releases the GIL there
        self._pool = ThreadPoolExecutor(max_workers=dp, thread_name_prefix="jpaged-dp")

    @property
    def stats(self) -> EngineStats:
        """Counters summed over replicas (load and warm-up time: the slowest replica)."""
        total = EngineStats(block_size=self.config.block_size)
        for r in self.replicas:
            s = r.stats
            for field in EngineStats.__dataclass_fields__:
                if field in ("block_size", "load_time_s", "warmup_time_s"):
                    continue
                setattr(total, field, getattr(total, field) + getattr(s, field))
            total.load_time_s = max(total.load_time_s, s.load_time_s)
            total.warmup_time_s = max(total.warmup_time_s, s.warmup_time_s)
        return total

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Queue on the least busy replica; same errors as `LLMEngine.add_request`."""
        if request_id in self._owner:
            raise ValueError(f"request_id {request_id!r} is already in use")
        replica = min(self.replicas, key=lambda r: r.get_num_unfinished_requests())
        replica.add_request(request_id, prompt, params, arrival_time)
        self._owner[request_id] = replica

    def abort_request(self, request_id: str | Sequence[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            replica = self._owner.pop(rid, None)
            if replica is not None:
                replica.abort_request(rid)

    def has_unfinished_requests(self) -> bool:
        return any(r.has_unfinished_requests() for r in self.replicas)

    def get_num_unfinished_requests(self) -> int:
        return sum(r.get_num_unfinished_requests() for r in self.replicas)

    def step(self) -> list[RequestOutput]:
        """One step of every replica with work, run side by side; their outputs, concatenated."""
        busy = [r for r in self.replicas if r.has_unfinished_requests()]
        outputs: list[RequestOutput] = []
        for outs in self._pool.map(LLMEngine.step, busy):
            outputs.extend(outs)
        for out in outputs:
            if out.finished:
                self._owner.pop(out.request_id, None)
        return outputs
