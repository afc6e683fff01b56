"""`python -m jpaged.serve`: the OpenAI-compatible HTTP server, with vLLM's flag names.

Loads the model (the embedded SmolLM2-135M-Instruct unless --model), sizes the KV pool,
compiles the step shapes, then serves /v1/completions, /v1/chat/completions, /v1/models,
/tokenize, /detokenize, /health, /version and /metrics until SIGTERM or Ctrl-C, which
stop new requests, let those in flight finish for up to --shutdown-timeout seconds,
abort the rest and exit with status 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
from dataclasses import replace
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MAX_QUEUED_REQUESTS = 4096
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?B)?\s*$")
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}

logger = logging.getLogger("jpaged.serve")


def parse_size(text: str) -> int:
    """Bytes or token counts: `4096`, `1k` (1000), `1K` / `1KiB` (1024), `4G`, `512MiB`."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4096, 1k, 4GiB)")
    number, unit, suffix = match.groups()
    binary = unit.isupper() or suffix == "iB"
    value = float(number) * (1024 if binary else 1000) ** _POWERS[unit.lower()]
    if value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    return int(value)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to a flag's help unless the help already says it or X is None."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


_METAVARS = {int: "N", float: "X"}


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The flags (vLLM's names where vLLM has the option)."""
    p = argparse.ArgumentParser(
        prog="python -m jpaged.serve", description=__doc__, formatter_class=_HelpFormatter
    )

    def add(*names: str, **kwargs: object) -> None:
        kind = kwargs.get("type")
        if "metavar" not in kwargs and "choices" not in kwargs and kwargs.get("action") is None:
            kwargs["metavar"] = "SIZE" if kind is parse_size else _METAVARS.get(kind, "TEXT")
        p.add_argument(*names, **kwargs)  # type: ignore[arg-type]

    add("--model", default=None,
        help="HF model directory, .gguf file or hub id; default: the embedded "
             "SmolLM2-135M-Instruct")  # fmt: skip
    add("--served-model-name", nargs="+", default=None,
        help="name(s) clients use in `model`; the first is echoed in responses "
             f"(default: --model, or {DEFAULT_MODEL_NAME})")  # fmt: skip
    add("--host", default="127.0.0.1", help="address to bind; use 0.0.0.0 to listen on all")
    add("--port", type=int, default=8000, help="TCP port")
    add("--api-key", default=None,
        help="require `Authorization: Bearer KEY` on /v1/* (default: $JPAGED_API_KEY; "
             "none when unset)")  # fmt: skip
    add("--tensor-parallel-size", "-tp", type=int, default=1,
        help="devices to shard the model over (tensor parallelism)")  # fmt: skip
    add("--mesh", default=None,
        help="device mesh, e.g. tp=4 (dp > 1 runs through the Python LLM API only)")  # fmt: skip
    add("--coordinator-address", default=None,
        help="several hosts: jax.distributed coordinator HOST:PORT, same on every process "
             "(default: $JPAGED_COORDINATOR_ADDRESS); the step stream uses PORT+1")  # fmt: skip
    add("--num-processes", type=int, default=None,
        help="several hosts: number of processes (default: $JPAGED_NUM_PROCESSES or 1)")  # fmt: skip
    add("--process-id", type=int, default=None,
        help="several hosts: this process's index; 0 serves HTTP, the others follow its "
             "steps (default: $JPAGED_PROCESS_ID or 0)")  # fmt: skip
    add("--dtype", default="auto",
        help="weights/activations dtype: auto (float32 on CPU, bfloat16 on GPU), float32, "
             "bfloat16, float16")  # fmt: skip
    add("--kv-cache-dtype", default="auto",
        help="KV pool dtype: auto (= --dtype), float32, bfloat16, float16, fp8 (= fp8_e4m3), "
             "fp8_e5m2")  # fmt: skip
    add("--max-model-len", type=parse_size, default=None,
        help="context length (prompt + output) in tokens (default: the model's)")  # fmt: skip
    add("--block-size", type=int, default=16, help="tokens per KV block (8..256, power of two)")
    add("--max-num-seqs", type=int, default=256, help="most sequences in one step's batch")
    add("--max-num-batched-tokens", type=parse_size, default=None,
        help="token budget of one step (prefill chunks + decodes); default 2048")  # fmt: skip
    add("--gpu-memory-utilization", type=float, default=0.9,
        help="fraction of accelerator memory for weights + activations + KV pool")  # fmt: skip
    add("--kv-cache-memory", "--kv-cache-memory-bytes", type=parse_size, default=None,
        help="KV pool size in bytes (e.g. 2GiB); overrides --gpu-memory-utilization; "
             "on CPU the default is 4 GiB")  # fmt: skip
    add("--num-blocks", "--num-gpu-blocks-override", type=int, default=None,
        help="KV pool size in blocks; overrides both memory options")  # fmt: skip
    add("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
        help="share KV blocks of identical prompt prefixes across requests")  # fmt: skip
    add("--quantization", "-q", default=None, choices=["int8", "awq", "gptq"],
        help="int8: weight-only per channel, from a float checkpoint; awq / gptq: a 4-bit "
             "checkpoint (default: what config.json's quantization_config says)")  # fmt: skip
    add("--attention-backend", default="auto", choices=["auto", "cpu", "xla", "pallas"],
        help="attention: auto = pallas on GPU; on CPU the C++ kernel (cpu) where a compiler "
             "builds it, else xla; pallas off a GPU is interpreted (slow)")  # fmt: skip
    add("--seed", type=int, default=0, help="seed for requests that give none")
    add("--speculative-config", type=_json_object, default=None, metavar="JSON",
        help='n-gram speculative decoding for greedy requests, vLLM\'s form: '
             '\'{"method": "ngram", "num_speculative_tokens": 3}\' (optional '
             'prompt_lookup_max, prompt_lookup_min); default: off')  # fmt: skip
    add("--chat-template", default=None,
        help="Jinja chat template, a file path or the template text (default: the model's)")  # fmt: skip
    add("--max-queued-requests", type=int, default=DEFAULT_MAX_QUEUED_REQUESTS,
        help="requests allowed to wait for a batch slot; beyond it requests get HTTP 429")  # fmt: skip
    add("--warmup", default="decode", choices=["none", "decode", "prefill", "all"],
        help="step shapes compiled at start-up (the rest compile on first use)")  # fmt: skip
    add("--shutdown-timeout", type=float, default=30.0,
        help="on SIGTERM, seconds in-flight requests may run before they are aborted")  # fmt: skip
    add("--uvicorn-log-level", default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn's log level")  # fmt: skip
    add("--disable-uvicorn-access-log", action="store_true", help="no log line per request")
    return p


def load_chat_template(value: str | None) -> str | None:
    """--chat-template as text: a file's contents, or the value when it is a template."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template: {value!r} is neither a file nor a Jinja template")


def _check_unsupported(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.tensor_parallel_size < 1:
        parser.error(f"--tensor-parallel-size must be >= 1, got {args.tensor_parallel_size}")
    if args.max_queued_requests < 1:
        parser.error(f"--max-queued-requests must be >= 1, got {args.max_queued_requests}")
    if args.shutdown_timeout < 0:
        parser.error(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")


def main(argv: list[str] | None = None) -> int:
    """Parse flags, build the engine, serve until SIGTERM / Ctrl-C; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_unsupported(args, parser)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("jpaged").setLevel(logging.INFO)  # jpaged's own start-up and shutdown lines

    # heavy imports after --help and flag errors, which should be instant
    import uvicorn

    from jpaged import multihost
    from jpaged.config import EngineConfig
    from jpaged.engine import LLMEngine
    from serve.app import build_app

    try:
        distributed = multihost.distributed_options(
            args.coordinator_address, args.num_processes, args.process_id
        )
        config = EngineConfig(
            tensor_parallel_size=args.tensor_parallel_size, mesh=args.mesh,
            model=args.model, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype,
            block_size=args.block_size, num_blocks=args.num_blocks,
            kv_cache_memory=args.kv_cache_memory,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            enable_prefix_caching=args.enable_prefix_caching,
            attention_backend=args.attention_backend, seed=args.seed, warmup=args.warmup,
            quantization=args.quantization, speculative_config=args.speculative_config,
        )  # fmt: skip
        chat_template = load_chat_template(args.chat_template)
        if config.mesh_shape()[0] > 1:
            raise ValueError(f"--mesh {args.mesh}: the server runs dp=1 (one server per replica)")
    except ValueError as exc:
        parser.error(str(exc))
    address, num_processes, process_id = distributed
    multihost.initialize_distributed(address, num_processes, process_id)
    try:
        # with several processes, process 0 compiles after its followers are listening
        engine = LLMEngine(config if num_processes == 1 else replace(config, warmup="none"))
    except (ValueError, OSError) as exc:
        logger.error("cannot load the model: %s", exc)
        return 1
    if num_processes > 1:
        if process_id != 0:
            steps = multihost.receive_steps(multihost.step_address(address))
            logger.info("follower stopped after %d steps", multihost.follow(engine.runner, steps))
            return 0
        broadcaster = multihost.StepBroadcaster(
            multihost.step_address(address), num_followers=num_processes - 1
        )
        engine.runner.step_listener = broadcaster
        engine.warmup(config.warmup)
    s = engine.stats
    logger.info(
        "engine ready: KV pool %d blocks x %d tokens = %d tokens; max_model_len %d; "
        "load %.2fs, compile %.2fs (%d compilations)",
        s.num_blocks, s.block_size, s.num_blocks * s.block_size, engine.max_model_len,
        s.load_time_s, s.warmup_time_s, engine.runner.num_compilations,
    )  # fmt: skip
    names = args.served_model_name or [args.model or DEFAULT_MODEL_NAME]
    app = build_app(
        engine,
        names,
        api_key=args.api_key or os.environ.get("JPAGED_API_KEY") or None,
        max_queued_requests=args.max_queued_requests,
        chat_template=chat_template,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.uvicorn_log_level,
            access_log=not args.disable_uvicorn_access_log,
            timeout_graceful_shutdown=args.shutdown_timeout,
        )
    )
    # uvicorn re-raises the signal it caught once it has shut down; with these handlers
    # in place that re-raise is a no-op, so a graceful SIGTERM exits with status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: logger.info("signal %d: exiting", signum))
    server.run()
    if num_processes > 1:
        broadcaster.close()
    logger.info("server stopped")
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
