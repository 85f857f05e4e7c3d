"""Fused MoE: Triton against the reference over a named grid, the align metadata, the reference
against a per-token loop from the formula, validation errors, and (GPU) bf16 at the target
shapes and CUDA-graph capture with new routing on replay.

Each case: (T tokens, E experts, top-k, d hidden, I expert intermediate, ids dtype, routing).
Routing "spread": k distinct experts per token at random; "two": every slot goes to one of
experts 2 and 5 (the other experts get no token; with k > 2 a token repeats an expert).
"""

from __future__ import annotations

import pytest
import torch

from kernels.moe import fused_moe
from kernels.moe import ref as mref
from kernels.moe import triton as mtri
from kernels.testing import assert_close, ratio_for

interpret, gpu = pytest.mark.interpret, pytest.mark.gpu
I32, I64 = torch.int32, torch.int64
_NAMES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    I32: "i32",
    I64: "i64",
}


def case(t, e, k, d, i, ids_dtype, routing="spread", dtype=torch.float32):
    name = f"T{t}-E{e}-k{k}-d{d}-I{i}-{_NAMES[ids_dtype]}-{routing}-{_NAMES[dtype]}"
    return pytest.param(t, e, k, d, i, ids_dtype, routing, dtype, id=name)


def make_inputs(t, e, k, d, i, ids_dtype, routing, dtype, device):
    x = torch.randn(t, d, device=device).to(dtype)
    w_gate_up = (torch.randn(e, 2 * i, d, device=device) * d**-0.5).to(dtype)
    w_down = (torch.randn(e, d, i, device=device) * i**-0.5).to(dtype)
    if routing == "spread":
        ids = torch.rand(t, e, device=device).topk(k, dim=1).indices
    else:
        ids = torch.tensor([2, 5], device=device)[torch.randint(0, 2, (t, k), device=device)]
    weights = torch.rand(t, k, device=device)
    return x, w_gate_up, w_down, weights, ids.to(ids_dtype)


GRID = [
    case(1, 8, 2, 48, 40, I64),  # one token; d, I not multiples of the tiles
    case(7, 8, 2, 48, 40, I32),
    case(33, 16, 4, 64, 32, I64),  # d and I multiples of BK (the unmasked-K path)
    case(33, 4, 1, 48, 40, I32),  # top-1
    case(7, 8, 8, 40, 24, I64),  # top-k = E: every expert, every token
    case(33, 8, 2, 48, 40, I64, "two"),  # six of eight experts get no token
    case(7, 8, 3, 48, 40, I32, "two"),  # a token routed twice to one expert
    case(17, 4, 3, 48, 40, I32, "spread", torch.float16),
    case(0, 8, 2, 48, 40, I64),
]


@interpret
@pytest.mark.parametrize("t, e, k, d, i, ids_dtype, routing, dtype", GRID)
def test_triton_matches_ref(t, e, k, d, i, ids_dtype, routing, dtype, device):
    inp = make_inputs(t, e, k, d, i, ids_dtype, routing, dtype, device)
    want = fused_moe(*inp, impl="ref")
    got = fused_moe(*inp, impl="triton")
    assert got.dtype == dtype and got.shape == (t, d)
    if t:  # (an empty output has no RMS)
        assert_close("moe", want.float(), got.float(), ratio_for(dtype))


@interpret
def test_align_metadata(device):
    t, e, k, bm = 37, 8, 3, 16
    ids = torch.rand(t, e, device=device).topk(k, dim=1).indices
    ids[:20] = torch.tensor([1, 4, 6])  # crowd three experts, leave others light or empty
    sorted_ids, block_expert, total = mtri.moe_align(ids, e, bm)
    n = t * k
    counts = torch.bincount(ids.flatten().cpu(), minlength=e)
    padded = (counts + bm - 1) // bm * bm
    assert int(total) == int(padded.sum())
    assert block_expert.numel() == mtri.max_blocks(n, e, bm) >= int(total) // bm
    rows = sorted_ids[: int(total)].cpu().long()
    real = rows[rows < n]
    assert sorted(real.tolist()) == list(range(n)), "each pair gets exactly one row"
    assert ((rows == n) | (rows < n)).all(), "padding rows hold the sentinel T*k"
    flat = ids.flatten().cpu()
    seg_end = padded.cumsum(0)
    for b in range(int(total) // bm):
        eb = int(block_expert[b])
        assert seg_end[eb] - padded[eb] <= b * bm < seg_end[eb]
        block = rows[b * bm : (b + 1) * bm]
        assert (flat[block[block < n]] == eb).all(), f"block {b} holds another expert's pair"


@interpret
def test_triton_drops_out_of_range_ids(device):
    """The reference raises on an id outside [0, E); the Triton path (which cannot look without a
    host sync) gives that slot no row and no contribution, and never reads out of bounds."""
    x, w_gate_up, w_down, weights, ids = make_inputs(
        5, 4, 2, 48, 40, I64, "spread", torch.float32, device
    )
    bad = ids.clone()
    bad[1, 0], bad[3, 1] = 4, -2
    with pytest.raises(ValueError, match=r"topk_ids must lie in \[0, E=4\)"):
        fused_moe(x, w_gate_up, w_down, weights, bad, impl="ref")
    zeroed = weights.clone()
    zeroed[1, 0] = zeroed[3, 1] = 0.0
    want = fused_moe(x, w_gate_up, w_down, zeroed, ids, impl="ref")
    got = fused_moe(x, w_gate_up, w_down, weights, bad, impl="triton")
    assert_close("moe dropped slots", want, got, ratio_for(torch.float32))


@pytest.mark.parametrize("impl", ["ref", pytest.param("triton", marks=interpret)])
def test_minus_one_slots_contribute_nothing(impl, device):
    """-1 marks a slot routed to another rank's expert (expert parallelism): the output is that
    of the remaining slots, as if their weight were zero."""
    x, w_gate_up, w_down, weights, ids = make_inputs(
        9, 4, 3, 48, 40, I32, "spread", torch.float32, device
    )
    ep = ids.clone()
    ep[ids >= 2] = -1  # this rank holds experts 0 and 1
    zeroed = torch.where(ids >= 2, 0.0, weights)
    want = fused_moe(x, w_gate_up, w_down, zeroed, ids, impl="ref")
    got = fused_moe(x, w_gate_up, w_down, weights, ep, impl=impl)
    assert_close("moe -1 slots", want, got, ratio_for(torch.float32))


def test_ref_matches_per_token_formula():
    x, w_gate_up, w_down, weights, ids = make_inputs(
        6, 5, 3, 12, 7, I64, "spread", torch.float64, None
    )
    ids[2] = torch.tensor([4, 4, 0])  # a repeated expert adds twice
    out = mref.fused_moe(x, w_gate_up, w_down, weights.float(), ids)  # fp32 math, fp64 out
    for t in range(6):
        want = torch.zeros(12, dtype=torch.float64)
        for j in range(3):
            e = int(ids[t, j])
            gate, up = w_gate_up[e, :7] @ x[t], w_gate_up[e, 7:] @ x[t]
            want += weights[t, j] * (w_down[e] @ (gate / (1 + torch.exp(-gate)) * up))
        torch.testing.assert_close(out[t], want, rtol=1e-5, atol=1e-6)


def test_dispatch_picks_ref_on_cpu():
    inp = make_inputs(3, 4, 2, 8, 4, I64, "spread", torch.float32, None)
    assert torch.equal(fused_moe(*inp), mref.fused_moe(*inp))


def _bad(**change):
    x, w_gate_up, w_down, weights, ids = make_inputs(
        3, 4, 2, 8, 6, I64, "spread", torch.float32, None
    )
    args = dict(x=x, w_gate_up=w_gate_up, w_down=w_down, topk_weights=weights, topk_ids=ids)
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(x=torch.randn(3, 8, dtype=torch.float64)), "x must be"),
        (dict(x=torch.randn(3, 2, 4)), "x must be"),
        (dict(w_gate_up=torch.randn(4, 12, 9)), "w_gate_up must be"),
        (dict(w_gate_up=torch.randn(4, 11, 8)), "w_gate_up must be"),
        (dict(w_gate_up=torch.randn(4, 12, 8).half()), "w_gate_up must have x's dtype"),
        (dict(w_down=torch.randn(4, 8, 5)), "w_down must be"),
        (dict(w_down=torch.randn(3, 8, 6)), "w_down must be"),
        (dict(w_down=torch.randn(4, 8, 6).bfloat16()), "w_down must have x's dtype"),
        (dict(topk_ids=torch.zeros(2, 2, dtype=torch.int64)), "topk_ids must be"),
        (dict(topk_ids=torch.zeros(3, 2, dtype=torch.int16)), "topk_ids must be int32 or int64"),
        (dict(topk_weights=torch.rand(3, 2).half()), "topk_weights must be fp32"),
        (dict(topk_weights=torch.rand(3, 3)), "topk_weights must be fp32"),
        (dict(topk_ids=torch.zeros(3, 2, dtype=torch.int64, device="meta")), "topk_ids is on"),
    ],
    ids=[
        "x-fp64",
        "x-3d",
        "w_gate_up-wrong-d",
        "w_gate_up-odd-rows",
        "w_gate_up-dtype",
        "w_down-wrong-I",
        "w_down-wrong-E",
        "w_down-dtype",
        "ids-wrong-T",
        "ids-int16",
        "weights-fp16",
        "weights-wrong-k",
        "ids-device",
    ],
)
def test_validation_errors(change, match):
    with pytest.raises(ValueError, match=match):
        fused_moe(**_bad(**change))


def test_triton_rejects_strided_last_dim():
    x, w_gate_up, w_down, weights, ids = make_inputs(
        3, 4, 2, 16, 8, I64, "spread", torch.float32, None
    )
    with pytest.raises(ValueError, match="w_down needs a contiguous last dimension"):
        mtri.fused_moe(
            x, w_gate_up, w_down.transpose(1, 2).contiguous().transpose(1, 2), weights, ids
        )


# -- GPU: bf16 at the target shapes ------------------------------------------------------------
GLM = dict(e=64, k=4, d=2048, i=1536)  # GLM-4.7-Flash
DSV3 = dict(e=256, k=8, d=7168, i=2048)  # DeepSeek-V3.2


@pytest.fixture(scope="module")
def weights_cache():
    cache = {}

    def get(e, d, i):
        if (e, d, i) not in cache:
            cache.clear()  # one shape at a time (DeepSeek's experts are 22 GB in bf16)
            g = torch.Generator(device="cuda").manual_seed(1)
            wg = torch.randn(e, 2 * i, d, device="cuda", dtype=torch.bfloat16, generator=g)
            wd = torch.randn(e, d, i, device="cuda", dtype=torch.bfloat16, generator=g)
            cache[(e, d, i)] = (wg.mul_(d**-0.5), wd.mul_(i**-0.5))
        return cache[(e, d, i)]

    yield get
    cache.clear()
    torch.cuda.empty_cache()


def _routing(t, e, k, skew=False):
    if skew:  # every slot on two experts: the most padding-free rows, the fewest blocks
        ids = torch.tensor([3, 40], device="cuda")[torch.randint(0, 2, (t, k), device="cuda")]
    else:
        ids = torch.rand(t, e, device="cuda").topk(k, dim=1).indices
    return torch.rand(t, k, device="cuda"), ids


def _check_gpu(weights_cache, t, e, k, d, i, skew=False, config=None):
    w_gate_up, w_down = weights_cache(e, d, i)
    x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16)
    w, ids = _routing(t, e, k, skew)
    want = fused_moe(x, w_gate_up, w_down, w, ids, impl="ref")
    got = mtri.fused_moe(x, w_gate_up, w_down, w, ids, config=config)
    assert_close(f"moe T={t}", want.float(), got.float(), ratio_for(torch.bfloat16))


@gpu
@pytest.mark.parametrize("t", [1, 3, 16, 64, 513, 8192])
def test_gpu_glm_shape(t, weights_cache):
    _check_gpu(weights_cache, t, **GLM)


@gpu
@pytest.mark.parametrize("t", [64, 2048])
def test_gpu_glm_shape_two_experts(t, weights_cache):
    _check_gpu(weights_cache, t, **GLM, skew=True)


@gpu
@pytest.mark.parametrize(
    "regime, idx", [(r, j) for r, cs in mtri.SWEEP.items() for j in range(len(cs))]
)
def test_gpu_every_sweep_config(regime, idx, weights_cache):
    _check_gpu(weights_cache, 300, **GLM, config=mtri.SWEEP[regime][idx])


@gpu
def test_gpu_repeatable_despite_atomic_ranks(weights_cache):
    """The align step's atomics may order an expert's rows differently per run; every output
    row depends only on its own inputs, so results are bit-identical."""
    e, k, d, i = GLM.values()
    w_gate_up, w_down = weights_cache(e, d, i)
    x = torch.randn(4096, d, device="cuda", dtype=torch.bfloat16)
    w, ids = _routing(4096, e, k)
    first = fused_moe(x, w_gate_up, w_down, w, ids)
    for _ in range(3):
        assert torch.equal(first, fused_moe(x, w_gate_up, w_down, w, ids))


@gpu
@pytest.mark.parametrize("t", [1, 5, 64])
def test_gpu_deepseek_shape(t, weights_cache):
    _check_gpu(weights_cache, t, **DSV3)


@gpu
@pytest.mark.parametrize("t", [4, 300])
def test_gpu_cuda_graph_replays_new_routing(t, weights_cache):
    """Captured once, replayed with other routing written into the same input tensors: the
    output follows, so nothing in fused_moe read the routing on the host or sized a buffer
    from it (the capture itself would fail on a host sync)."""
    e, k, d, i = GLM.values()
    w_gate_up, w_down = weights_cache(e, d, i)
    x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16)
    w, ids = _routing(t, e, k)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile outside the capture
        fused_moe(x, w_gate_up, w_down, w, ids)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w_gate_up, w_down, w, ids)
    for skew in (False, True, False):
        new_w, new_ids = _routing(t, e, k, skew)
        x.copy_(torch.randn_like(x))
        w.copy_(new_w)
        ids.copy_(new_ids)
        graph.replay()
        want = fused_moe(x, w_gate_up, w_down, w, ids, impl="ref")
        assert_close(
            f"graph replay T={t} skew={skew}", want.float(), out.float(), ratio_for(torch.bfloat16)
        )
