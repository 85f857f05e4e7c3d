"""KV payload transports between two Ray actors: the object store and Ray Direct Transport
(NIXL over UCX, which runs on CPU), on the same code path the prefill and decode replicas use."""

from __future__ import annotations

import time

import pytest
import ray
import torch

from serving.config import KVTransferConfig
from serving.errors import KVTransferError
from serving.kv_transfer import make_transport
from tests.serving.harness import wait_for

pytestmark = pytest.mark.ray

CONFIGS = {
    "object_store": KVTransferConfig(),
    "nixl": KVTransferConfig(backend="direct", tensor_transport="nixl"),
}


LAYOUT = {
    "num_layers": 2,
    "attn_kind": "mla",
    "kv_heads": 1,
    "k_dim": 64,
    "v_dim": 48,
    "index_layers": [0],
    "index_head_dim": 8,
    "index_fp8": False,
    "dtype": "float32",
    "plan_id": "plan-x",
    "page_size": 64,
}


def header(n: int = 1000):
    from serving.engine import PAYLOAD_VERSION, KVHeader

    return KVHeader(PAYLOAD_VERSION, "plan-x", LAYOUT, list(range(n)), 9, n)


def payload(seed: int):
    from serving.engine import KVPayload

    # Large enough (~0.5 MB) for the object store proper: Ray inlines objects under 100 KB
    # into the task spec, where they would outlive their owner.
    g, n = torch.Generator().manual_seed(seed), 1000
    attn = [torch.randn(n, 1, 64, generator=g) for _ in range(2)]
    return KVPayload.from_tensors(header(n), attn, [torch.randn(n, 8, generator=g), None])


def checksum(p) -> float:
    return float(p.data.view(torch.float32).double().sum())


@ray.remote(num_cpus=0)
class Producer:
    def __init__(self, cfg):
        self.transport = make_transport(cfg.backend, cfg.tensor_transport)

    def put(self, seed: int):
        return self.transport.put(payload(seed))

    def ping(self) -> bool:
        return True


@ray.remote(num_cpus=0)
class Consumer:
    def __init__(self, cfg):
        self.transport = make_transport(cfg.backend, cfg.tensor_transport)

    async def get(self, handle, timeout_s: float):
        try:
            p = await self.transport.get(handle, timeout_s)
        except KVTransferError as e:
            return ("error", e.code, str(e))
        return ("ok", p.plan_id, p.first_token, checksum(p), p.nbytes)


@pytest.fixture(params=list(CONFIGS))
def cfg(request, ray_cluster):
    return CONFIGS[request.param]


def test_payload_arrives_intact(cfg):
    prod, cons = Producer.remote(cfg), Consumer.remote(cfg)
    handle = ray.get(prod.put.remote(3))
    assert handle.transport == (cfg.tensor_transport if cfg.backend == "direct" else "object_store")
    expected = payload(3)
    assert handle.nbytes == expected.nbytes > 500_000
    assert handle.header.prompt_token_ids == expected.header.prompt_token_ids  # ahead of bytes
    status, plan, first, total, nbytes = ray.get(cons.get.remote(handle, 30))
    assert (status, plan, first, nbytes) == ("ok", "plan-x", 9, expected.nbytes)
    assert total == pytest.approx(checksum(expected))
    for a in (prod, cons):
        ray.kill(a)


def test_lost_sender_is_a_clear_error_not_a_hang(cfg):
    prod, cons = Producer.remote(cfg), Consumer.remote(cfg)
    handle = ray.get(prod.put.remote(4))
    ray.kill(prod)  # the replica holding the payload dies before decode takes it
    wait_for(lambda: _dead(prod), 30, "the killed producer to be dead")  # ray.kill is async
    start = time.monotonic()
    result = ray.get(cons.get.remote(handle, 10), timeout=60)
    assert time.monotonic() - start < 30
    if cfg.backend == "direct":  # the tensors lived in the dead process
        assert result[0] == "error" and result[1] == "kv_transfer_failed" and "KV" in result[2]
    else:  # a copy may still sit in this node's shared memory; if not, a clear error
        assert result[0] == "error" or result[3] == pytest.approx(checksum(payload(4)))
    ray.kill(cons)


def _dead(actor) -> bool:
    try:
        ray.get(actor.ping.remote(), timeout=10)
    except ray.exceptions.RayActorError:
        return True
    return False


@ray.remote(num_cpus=0)
def _never_ready():
    time.sleep(3600)


def test_payload_that_never_arrives_times_out(ray_cluster):
    from serving.kv_transfer import KVHandle

    ref = _never_ready.remote()
    cons = Consumer.remote(KVTransferConfig())
    start = time.monotonic()
    status, code, message = ray.get(
        cons.get.remote(KVHandle("object_store", header(1), 0, [ref]), 1.0), timeout=60
    )
    assert (status, code) == ("error", "kv_transfer_timeout") and "1.0s" in message
    assert time.monotonic() - start < 20
    ray.cancel(ref, force=True)
    ray.kill(cons)


def test_released_handle_is_refused(cfg):
    prod = Producer.remote(cfg)
    handle = ray.get(prod.put.remote(5))
    handle.release()
    assert handle.released
    with pytest.raises(KVTransferError, match="released"):
        import asyncio

        asyncio.run(make_transport(cfg.backend, cfg.tensor_transport).get(handle, 1))
    ray.kill(prod)


@pytest.mark.parametrize(
    "error, code",
    [
        (ray.exceptions.ReferenceCountingAssertionError("ab" * 14, None, ""), "kv_released"),
        (ray.exceptions.ObjectFreedError("ab" * 14, None, ""), "kv_released"),
        (ray.exceptions.OwnerDiedError("ab" * 14, None, ""), "kv_transfer_failed"),
    ],
)
def test_a_freed_payload_is_told_apart_from_a_lost_one(error, code):
    """Freed: its holders gave it up (the request is gone, decode ends quietly). Lost: its owner
    died (the request is retried on another prefill replica)."""
    from serving.kv_transfer import _failed

    assert _failed(error, "KV transfer").code == code
