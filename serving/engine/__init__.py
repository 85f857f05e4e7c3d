"""Inference engine: paged KV cache, continuous batching, chunked prefill, prefill/decode roles.

from serving.engine import LLMEngine, SamplingParams
engine = LLMEngine.from_pretrained(path, index_cache="FSSF", role="unified")
outputs = engine.generate(["Hello"], SamplingParams(temperature=0, max_tokens=16))
"""

from serving.engine.async_engine import AsyncLLMEngine
from serving.engine.config import EngineConfig
from serving.engine.kv_connector import HandoffRefused, HandoffTimeout
from serving.engine.llm_engine import LLMEngine
from serving.engine.outputs import (
    EngineStats,
    HandoffReserved,
    Logprob,
    Output,
    PrefillResult,
    StepOutput,
    TokenDelta,
)
from serving.engine.params import SamplingParams
from serving.engine.payload import PAYLOAD_VERSION, KVHeader, KVPayload
from serving.engine.resume import Resume

__all__ = [
    "PAYLOAD_VERSION",
    "AsyncLLMEngine",
    "EngineConfig",
    "EngineStats",
    "HandoffRefused",
    "HandoffReserved",
    "HandoffTimeout",
    "KVHeader",
    "KVPayload",
    "LLMEngine",
    "Logprob",
    "Output",
    "PrefillResult",
    "Resume",
    "SamplingParams",
    "StepOutput",
    "TokenDelta",
]
