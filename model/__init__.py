"""PyTorch DSA models (DeepSeek-V3.2, GLM-5 family, DSA-adapted Llama) with IndexCache plans."""

from model.config import ModelConfig, RopeConfig
from model.context import ForwardContext
from model.dsa import DSAForCausalLM, scratch_context
from model.index_cache import IndexCacheConfig
from model.kv_cache import KVCache, KVLayout
from model.loader import load_model
from model.tiny import make_tiny, tiny_config

__all__ = [
    "DSAForCausalLM",
    "ForwardContext",
    "IndexCacheConfig",
    "KVCache",
    "KVLayout",
    "ModelConfig",
    "RopeConfig",
    "load_model",
    "make_tiny",
    "scratch_context",
    "tiny_config",
]
