"""The step load's arithmetic: per-step sustained QPS and latency percentiles of whole calls.

Kept apart from the locustfile (which needs gevent) so that it can be tested on its own.
"""

from __future__ import annotations

import numpy as np


class StepRecorder:
    """Attributes every completed call to the step it finished in and summarises each step.

    Step ``i`` runs from ``start + i * step_s``; its first ``settle_s`` (users starting,
    queues filling) are left out, so a step's QPS is the calls completed in the remaining
    ``step_s - settle_s`` seconds divided by that time.
    """

    def __init__(self, users: list[int], step_s: float, settle_s: float):
        if not users or any(u < 1 for u in users):
            raise ValueError(f"step user counts must be positive integers, got {users}")
        if not 0 <= settle_s < step_s:
            raise ValueError(f"settle time {settle_s} s must lie in [0, step time {step_s} s)")
        self.users = list(users)
        self.step_s = float(step_s)
        self.settle_s = float(settle_s)
        self.t0: float | None = None
        self.calls: list[list[tuple[float, bool]]] = [[] for _ in users]

    def start(self, now: float) -> None:
        self.t0 = now

    def add(self, now: float, response_ms: float, ok: bool) -> None:
        if self.t0 is None:
            return
        offset = now - self.t0
        step = int(offset // self.step_s)
        if 0 <= step < len(self.users) and offset - step * self.step_s >= self.settle_s:
            self.calls[step].append((response_ms, ok))

    def summary(self, p99_ms: float) -> dict:
        window = self.step_s - self.settle_s
        steps = []
        for users, calls in zip(self.users, self.calls, strict=True):
            ms = np.array([c[0] for c in calls], float)
            failures = sum(1 for c in calls if not c[1])
            row = {"users": users, "calls": len(calls), "failures": failures, "qps": len(calls) / window}
            if len(ms):
                row.update(
                    p50_ms=float(np.percentile(ms, 50)),
                    p90_ms=float(np.percentile(ms, 90)),
                    p99_ms=float(np.percentile(ms, 99)),
                )
            row["within_objective"] = bool(len(ms) and failures == 0 and row["p99_ms"] <= p99_ms)
            steps.append(row)
        passing = [s for s in steps if s["within_objective"]]
        best = max(passing, key=lambda s: s["qps"]) if passing else None
        return {
            "p99_objective_ms": p99_ms,
            "step_s": self.step_s,
            "settle_s": self.settle_s,
            "steps": steps,
            "max_qps_within_objective": best["qps"] if best else None,
            "at_users": best["users"] if best else None,
        }

    @staticmethod
    def format(summary: dict) -> str:
        lines = [
            f"step load: {summary['step_s']:g} s per step, first {summary['settle_s']:g} s not counted",
            f"{'users':>6} {'calls':>7} {'fail':>5} {'QPS':>8} {'p50 ms':>8} {'p99 ms':>8}",
        ]
        for s in summary["steps"]:
            p50, p99 = s.get("p50_ms", float("nan")), s.get("p99_ms", float("nan"))
            mark = "" if s["within_objective"] else "  (over objective)"
            counts = f"{s['users']:>6} {s['calls']:>7} {s['failures']:>5}"
            lines.append(f"{counts} {s['qps']:>8.1f} {p50:>8.1f} {p99:>8.1f}{mark}")
        if summary["max_qps_within_objective"] is None:
            lines.append(f"no step held p99 <= {summary['p99_objective_ms']:g} ms without failures")
        else:
            lines.append(
                f"highest sustained QPS at p99 <= {summary['p99_objective_ms']:g} ms: "
                f"{summary['max_qps_within_objective']:.1f} ({summary['at_users']} users)"
            )
        return "\n".join(lines)
