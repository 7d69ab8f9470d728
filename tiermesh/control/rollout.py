"""Gradual rollout of a tier's treatment, with automatic rollback.

The treatment's share goes through the steps (e.g. 5, 20, 50, 100 percent), holding each for a
while. During a hold both arms' traffic since the step began is compared every `interval_s`: when
the treatment's error rate exceeds `max_error_ratio` x the control's, or its p95 latency
`max_p95_ratio` x the control's, the treatment goes back to 0% at once and the reason is logged.
At 100% the control serves nobody, so the treatment is held to the control's figures from the
last step that had both. A guard needs `min_requests` calls of an arm before it judges it.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Sequence

from tiermesh.control.armstats import ArmCounts, snapshot, window
from tiermesh.control.traffic import EnvoyAdmin, TrafficError, checked_percent, set_treatment, split_of


@dataclasses.dataclass(frozen=True)
class Guard:
    max_error_ratio: float = 2.0
    max_p95_ratio: float = 1.5
    min_requests: int = 20

    def breach(self, treatment: ArmCounts, control: ArmCounts) -> str | None:
        """Why the treatment must be rolled back, or None while it does as well as allowed."""
        if treatment.requests < self.min_requests or control.requests < self.min_requests:
            return None
        rate_t, rate_c = treatment.error_rate or 0.0, control.error_rate or 0.0
        if treatment.failures and rate_t > self.max_error_ratio * rate_c:
            return (
                f"treatment error rate {100 * rate_t:.2f}% ({treatment.failures}/{treatment.requests}) > "
                f"{self.max_error_ratio:g} x control's {100 * rate_c:.2f}% "
                f"({control.failures}/{control.requests})"
            )
        p95_t, p95_c = treatment.envoy_quantile(0.95), control.envoy_quantile(0.95)
        if p95_t is not None and p95_c is not None and p95_t > self.max_p95_ratio * p95_c:
            return f"treatment p95 {p95_t:.1f} ms > {self.max_p95_ratio:g} x control's {p95_c:.1f} ms"
        return None


@dataclasses.dataclass(frozen=True)
class Outcome:
    completed: bool
    percent: float  # the treatment's share when the rollout ended
    reason: str


def parse_steps(text: str) -> list[float]:
    """`5,20,50,100` → [5.0, 20.0, 50.0, 100.0]: rising percentages."""
    try:
        steps = [checked_percent(part.strip(), "steps") for part in text.split(",") if part.strip()]
    except TrafficError as error:
        raise TrafficError(f"--steps: {error}") from None
    if not steps or any(b <= a for a, b in itertools.pairwise(steps)) or steps[0] <= 0:
        raise TrafficError(f"--steps: expected rising percentages above 0, e.g. 5,20,50,100; got {text!r}")
    return steps


def parse_duration(text: str) -> float:
    """`90`, `90s`, `2m`, `1h` → seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    raw = text.strip().lower()
    scale = units.get(raw[-1:])
    try:
        value = float(raw[:-1] if scale else raw) * (scale or 1)
    except ValueError:
        raise TrafficError(f"--hold: expected a duration like 30s, 5m or 1h, got {text!r}") from None
    if not 0 <= value <= 7 * 24 * 3600:
        raise TrafficError(f"--hold: must be from 0 to 7 days, got {text!r}")
    return value


def rollout(
    admin: EnvoyAdmin,
    tier: str,
    steps: Sequence[float],
    hold_s: float,
    guard: Guard,
    *,
    interval_s: float = 1.0,
    log: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
) -> Outcome:
    """Move `tier`'s treatment through `steps`; roll back to 0% on a guard breach. The guard reads
    Envoy's figures only, so the tiers' /metrics are not scraped every interval."""
    split = split_of(admin, tier)  # refuses unknown tiers and tiers without a treatment
    start_share = split.percent("treatment")
    log(
        f"rollout of {tier}: steps {', '.join(f'{s:g}%' for s in steps)}, hold {hold_s:g}s each; "
        f"rolls back when treatment errors > {guard.max_error_ratio:g}x "
        f"or p95 > {guard.max_p95_ratio:g}x control's"
    )
    reference: ArmCounts | None = None  # the control's figures from the last step that had both arms
    for step in steps:
        set_treatment(admin, tier, step)
        log(f"{tier}: treatment {start_share:g}% -> {step:g}%")
        start_share = step
        began = snapshot(admin, split)
        deadline = time.monotonic() + hold_s
        while True:
            sleep(min(interval_s, max(0.0, deadline - time.monotonic())))
            current = window(snapshot(admin, split), began)
            control, treatment = current["control"], current["treatment"]
            if control.requests >= guard.min_requests:
                reference = control
            judged_against = control if control.requests >= guard.min_requests else reference or control
            reason = guard.breach(treatment, judged_against)
            if reason:
                set_treatment(admin, tier, 0)
                message = f"{tier}: rolled back to 0% at the {step:g}% step: {reason}"
                log(message)
                return Outcome(False, 0.0, reason)
            if time.monotonic() >= deadline:
                break
        log(
            f"{tier}: {step:g}% held {hold_s:g}s: treatment {treatment.requests} calls, "
            f"{treatment.failures} errors; control {control.requests} calls, {control.failures} errors"
        )
        if treatment.requests < guard.min_requests:
            log(f"{tier}: warning: only {treatment.requests} treatment calls at {step:g}% (too few to judge)")
    log(f"{tier}: rollout complete, treatment at {steps[-1]:g}%")
    return Outcome(True, steps[-1], "completed")
