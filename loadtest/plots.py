"""PNG plots of a load-test run: latency over time, and the server's KV usage and queues."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _users(run, t0: float) -> tuple[list[float], list[float]]:
    rows = [r for r in run.locust_history if r.get("Name") == "Aggregated"]
    return ([float(r["Timestamp"]) - t0 for r in rows], [float(r["User Count"]) for r in rows])


def _shade_saturated(ax, run) -> None:
    sat = run.meta["plan"].get("saturated_from_s")
    stop = (run.meta.get("load_stopped") or 0) - (run.meta.get("load_started") or 0)
    if sat is not None and stop > sat:
        ax.axvspan(sat, stop, color="tab:red", alpha=0.07, label="oversubscribed stage")


def plot_latency(run, path: Path) -> None:
    t0 = run.meta.get("load_started") or 0.0
    ok = [r for r in run.requests if "error" not in r]
    bad = [r for r in run.requests if "error" in r]
    fig, (ax, ax_itl) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    # Each request at the time it ended: that is when its latency became known.
    end = [r["start"] + r["e2e_s"] - t0 for r in ok]
    ax.scatter(end, [r["e2e_s"] for r in ok], s=8, label="end-to-end", color="tab:blue")
    ax.scatter(end, [r["ttft_s"] for r in ok], s=8, label="TTFT", color="tab:orange")
    if bad:
        ax.scatter(
            [r["start"] + r["e2e_s"] - t0 for r in bad],
            [r["e2e_s"] for r in bad],
            marker="x",
            color="tab:red",
            label="failed",
        )
    ax.set_ylabel("seconds")
    ax.set_title(f"{run.meta['plan']['scenario']} on {run.meta['model']}: latency per request")
    _shade_saturated(ax, run)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    # Per-request TPOT and the request's worst gap (a preemption shows as a tall spike).
    tp = [
        (e, r["tpot_s"] * 1000, max(r["itl_ms"], default=0))
        for e, r in zip(end, ok, strict=True)
        if r.get("tpot_s") is not None
    ]
    if tp:
        e, tpot, worst = map(list, zip(*tp, strict=True))
        ax_itl.scatter(e, worst, s=6, color="tab:gray", label="largest ITL of the request")
        ax_itl.scatter(e, tpot, s=8, color="tab:green", label="TPOT")
        ax_itl.set_yscale("log")
    ax_itl.set_ylabel("ms")
    ax_itl.set_xlabel("seconds since the load started")
    users_t, users = _users(run, t0)
    if users:
        ax_u = ax_itl.twinx()
        ax_u.step(users_t, users, where="post", color="black", lw=1, label="users")
        ax_u.set_ylabel("users")
        ax_u.legend(loc="upper right", fontsize=8)
    ax_itl.legend(loc="upper left", fontsize=8)
    ax_itl.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_kv(run, path: Path) -> None:
    t0 = run.meta.get("load_started") or 0.0
    m = run.metrics
    t = np.array([x["t"] - t0 for x in m])
    fig, (ax, ax_q) = plt.subplots(
        2, 1, figsize=(9, 6), sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    stop = (run.meta.get("load_stopped") or t0) - t0
    for a in (ax, ax_q):
        a.axvline(stop, color="gray", ls="--", lw=1)
        _shade_saturated(a, run)
        a.grid(alpha=0.3)
    if len(t):
        ax.plot(t, [x["kv_usage"] for x in m], color="tab:purple", lw=2, label="KV usage")
        ax_q.plot(t, [x["running"] for x in m], color="tab:blue", label="running")
        ax_q.plot(t, [x["waiting"] for x in m], color="tab:orange", label="waiting")
        users_t, users = _users(run, t0)
        if users:
            ax_q.step(users_t, users, where="post", color="black", lw=1, label="users")
        pre = np.array([x["preemptions"] for x in m])
        ax_p = ax_q.twinx()
        ax_p.plot(t, pre - pre[0], color="tab:red", ls="--", label="preemptions (cumulative)")
        ax_p.set_ylabel("preemptions")
        ax_p.legend(loc="upper right", fontsize=8)
    ax.axhline(0.9, color="tab:purple", ls=":", lw=1, label="0.9")
    ax.text(stop, 0.03, " load stops", fontsize=8, color="gray")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("KV usage (share of pages)")
    ax.set_title(
        f"KV pool ({run.meta['kv_capacity_tokens']:.0f} tokens) under "
        f"{run.meta['plan']['scenario']} load"
    )
    ax.legend(loc="lower center", fontsize=8)
    ax_q.set_ylabel("requests / users")
    ax_q.set_xlabel("seconds since the load started")
    ax_q.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
