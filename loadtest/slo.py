"""Service-level objectives for goodput (DistServe / `vllm bench serve --goodput` style)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SLO:
    """Bounds in milliseconds; 0 means not checked. The ITL bound applies to each request's mean
    inter-token latency (TPOT), as vLLM's goodput does, not to its single worst gap."""

    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    e2e_ms: float = 0.0

    def __post_init__(self):
        for name in ("ttft_ms", "itl_ms", "e2e_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"slo {name} must be >= 0, got {getattr(self, name)}")

    def met(self, rec: dict) -> bool:
        """Whether one request record (requests.jsonl) completed within every bound."""
        if "error" in rec:
            return False
        checks = (
            (self.ttft_ms, rec.get("ttft_s")),
            (self.itl_ms, rec.get("tpot_s") or 0.0),
            (self.e2e_ms, rec.get("e2e_s")),
        )
        return all(not slo or (v is not None and v * 1000 <= slo) for slo, v in checks)


def add_slo_args(p) -> None:
    p.add_argument("--slo-ttft-ms", type=float, default=0.0, help="goodput: TTFT bound (0: none)")
    p.add_argument(
        "--slo-itl-ms",
        type=float,
        default=0.0,
        help="goodput: bound on each request's mean inter-token latency (TPOT)",
    )
    p.add_argument("--slo-e2e-ms", type=float, default=0.0, help="goodput: end-to-end bound")


def slo_from(args) -> SLO:
    try:
        return SLO(args.slo_ttft_ms, args.slo_itl_ms, args.slo_e2e_ms)
    except ValueError as e:
        raise ValueError(f"--slo-*: {e}") from e
