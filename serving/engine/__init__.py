"""Inference engine: paged KV cache, continuous batching, chunked prefill, prefill/decode roles."""
