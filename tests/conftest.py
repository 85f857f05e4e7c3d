"""Shared test set-up: Triton interpreter on CPU-only machines, GPU skips that say why, seeds."""

from __future__ import annotations

import os
import shutil
import tempfile

# Must happen before anything imports triton: the interpreter flag is read at @triton.jit time.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")  # fp32 dots really in fp32, not tf32

import pytest  # noqa: E402

# Test shapes are tiny: intra-op threads only add synchronisation, and on a busy 2-core runner
# spinning OpenMP workers slow small ops down by an order of magnitude.
torch.set_num_threads(1)


def _patch_triton_interpreter() -> None:
    """Triton 3.6's interpreter turns a scalar into a loop bound with int(ndarray of shape (1,)),
    which numpy 2.x rejects, so every `range(0, n)` with a runtime n fails. Read the single
    element instead. Only touches the interpreter, only in test sessions."""
    try:
        import triton.runtime.interpreter as interp
    except ImportError:  # pragma: no cover
        return
    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    if not getattr(original, "_indexcache_patched", False):
        patched._indexcache_patched = True
        interp._patch_lang_tensor = patched


if not _HAS_CUDA:
    _patch_triton_interpreter()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(
        reason="needs a CUDA GPU: runs on the GPU machine (python -m pytest -m gpu there)"
    )
    for item in items:
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where kernel tests run: the GPU when present, else the CPU under the Triton interpreter."""
    return torch.device("cuda" if _HAS_CUDA else "cpu")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Session cache of tiny random checkpoints, one per family: tiny_dir("glm_moe_dsa")."""
    from model.tiny import make_tiny

    made: dict[str, str] = {}

    def get(kind: str, **overrides):
        key = kind + repr(sorted(overrides.items()))
        if key not in made:
            made[key] = str(make_tiny(kind, tmp_path_factory.mktemp(kind), **overrides))
        return made[key]

    return get


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster and one Serve instance per test run (loopback only), shared by
    every suite that deploys apps; yields the Serve HTTP port."""
    from serving.env import apply_ray_local_env

    apply_ray_local_env()
    import ray
    from ray import serve

    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit
    # Logical CPUs: replicas ask for fractions; the machine's 2 cores are shared by all.
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        _temp_dir=temp,
        log_to_driver=False,
        namespace="indexcache-tests",
    )
    from tests.serving.harness import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
