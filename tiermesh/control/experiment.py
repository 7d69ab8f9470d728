"""A/B experiments on one tier: a time window of both arms' traffic and feedback, and a read-out.

`start` remembers, in the store, both arms' counters at that moment (Envoy's and the tiers') and
where the gateway's feedback stream stood; `stop` remembers them again. The read-out compares the
arms over that window:

- the **primary metric** is user feedback on answers: a positive rating or outcome (accepted,
  applied, approved, repaid) is a success, a negative one (rating < 0, rejected, declined,
  defaulted) a failure; neutral ratings count for neither. The answer's record says which arm of
  the tier produced it, so feedback is attributed exactly.
- **guardrails** are the error rate and the p95 latency of each arm, from Envoy.

Both get a Bayesian read-out (Beta-Binomial: P(treatment better), posteriors, lift) and a
frequentist test (two-proportion z-test, or Fisher's exact test on small counts). The
recommendation: KEEP_CONTROL when a guardrail is breached (the treatment fails more often with
P >= confidence, or its p95 is over `max_p95_ratio` x the control's) or the treatment is worse on
feedback with P >= confidence; PROMOTE when it is better on feedback with P >= confidence and both
arms have `min_feedback` rated answers; CONTINUE otherwise, saying what is missing.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import redis

from tiermesh.control.abstats import BayesReadout, FrequentistReadout, bayes_binomial, frequentist_binomial
from tiermesh.control.armstats import ArmCounts, snapshot, window
from tiermesh.control.traffic import EnvoyAdmin, TrafficError, set_treatment, split_of

KEY_PREFIX = "tiermesh:experiments:"
FEEDBACK_STREAM = "tiermesh:feedback"
GOOD_OUTCOMES = {"accepted", "applied", "approved", "repaid"}
BAD_OUTCOMES = {"rejected", "declined", "defaulted"}
RECOMMENDATIONS = ("PROMOTE", "KEEP_CONTROL", "CONTINUE")


class ExperimentError(TrafficError):
    """A refused experiment command (none running, no traffic yet, ...); nothing was changed."""


@dataclasses.dataclass(frozen=True)
class Experiment:
    tier: str
    name: str
    started_at: float
    feedback_from: str  # the feedback stream id the window starts at
    baseline: dict[str, ArmCounts]
    treatment_percent: float
    stopped_at: float | None = None
    final: dict[str, ArmCounts] | None = None

    @property
    def running(self) -> bool:
        return self.stopped_at is None

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["baseline"] = {arm: counts.to_json() for arm, counts in self.baseline.items()}
        data["final"] = {arm: c.to_json() for arm, c in self.final.items()} if self.final else None
        return json.dumps(data)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Experiment:
        data = json.loads(raw)
        data["baseline"] = {arm: ArmCounts.from_json(c) for arm, c in data["baseline"].items()}
        if data.get("final"):
            data["final"] = {arm: ArmCounts.from_json(c) for arm, c in data["final"].items()}
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class Feedback:
    good: int = 0
    bad: int = 0
    neutral: int = 0

    @property
    def rated(self) -> int:
        return self.good + self.bad

    @property
    def rate(self) -> float | None:
        return self.good / self.rated if self.rated else None


def classify_feedback(entry: dict[str, str]) -> str:
    """good, bad or neutral: the outcome when there is one (what happened beats what was felt),
    else the rating's sign."""
    outcome = entry.get("outcome", "")
    if outcome in GOOD_OUTCOMES:
        return "good"
    if outcome in BAD_OUTCOMES:
        return "bad"
    try:
        rating = float(entry.get("rating") or "nan")
    except ValueError:
        return "neutral"
    return "good" if rating > 0 else "bad" if rating < 0 else "neutral"


def arm_of_answer(entry: dict[str, str], tier: str) -> str | None:
    """Which arm of `tier` produced the answer the feedback is about (None: the tier was not used)."""
    try:
        versions = json.loads(entry.get("versions") or "[]")
    except ValueError:
        return None
    for used in versions:
        if used.get("tier") == tier and used.get("arm") in ("control", "treatment"):
            return used["arm"]
    return None


@dataclasses.dataclass(frozen=True)
class Readout:
    """One metric's comparison of the arms."""

    metric: str
    control: tuple[int, int]  # (events, trials)
    treatment: tuple[int, int]
    bayes: BayesReadout
    frequentist: FrequentistReadout


@dataclasses.dataclass(frozen=True)
class Report:
    experiment: Experiment
    arms: dict[str, ArmCounts]
    feedback: dict[str, Feedback]
    errors: Readout | None
    satisfaction: Readout | None
    recommendation: str
    reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        def arm(name: str) -> dict[str, Any]:
            counts, feedback = self.arms[name], self.feedback.get(name, Feedback())
            return {
                "requests": counts.requests,
                "failures": counts.failures,
                "error_rate": counts.error_rate,
                "envoy_p50_ms": counts.envoy_quantile(0.5),
                "envoy_p95_ms": counts.envoy_quantile(0.95),
                "tier_p50_ms": counts.tier_quantile(0.5),
                "tier_p95_ms": counts.tier_quantile(0.95),
                "feedback": dataclasses.asdict(feedback) | {"rate": feedback.rate},
            }

        return {
            "tier": self.experiment.tier,
            "name": self.experiment.name,
            "started_at": self.experiment.started_at,
            "stopped_at": self.experiment.stopped_at,
            "arms": {name: arm(name) for name in self.arms},
            "errors": dataclasses.asdict(self.errors) if self.errors else None,
            "satisfaction": dataclasses.asdict(self.satisfaction) if self.satisfaction else None,
            "recommendation": self.recommendation,
            "reasons": self.reasons,
        }


class Experiments:
    """Experiments kept in the store (one per tier at a time), measured through Envoy's admin."""

    def __init__(
        self, store: redis.Redis, admin: EnvoyAdmin, deployments: dict[str, Any] | None = None
    ) -> None:
        self.store = store
        self.admin = admin
        self.deployments = deployments or {}

    def _snapshot(self, tier: str) -> dict[str, ArmCounts]:
        return snapshot(self.admin, split_of(self.admin, tier), self.deployments)

    def get(self, tier: str) -> Experiment:
        raw = self.store.get(KEY_PREFIX + tier)
        if raw is None:
            raise ExperimentError(f"no experiment on {tier} (tiermesh experiment start {tier})")
        return Experiment.from_json(raw)

    def all(self) -> list[Experiment]:
        keys = sorted(self.store.scan_iter(match=KEY_PREFIX + "*"))
        return [Experiment.from_json(raw) for raw in self.store.mget(keys) if raw is not None] if keys else []

    def start(self, tier: str, *, name: str = "", treatment_percent: float | None = None) -> Experiment:
        split = split_of(self.admin, tier)  # refuses unknown tiers and tiers without a treatment
        existing = self.store.get(KEY_PREFIX + tier)
        if existing is not None and Experiment.from_json(existing).running:
            raise ExperimentError(
                f"an experiment on {tier} is already running (tiermesh experiment stop {tier})"
            )
        if treatment_percent is not None:
            split = set_treatment(self.admin, tier, treatment_percent)[1]
        now = time.time()
        experiment = Experiment(
            tier=tier,
            name=name or f"{tier}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}",
            started_at=now,
            feedback_from=f"{int(now * 1000)}-0",
            baseline=self._snapshot(tier),
            treatment_percent=split.percent("treatment"),
        )
        self.store.set(KEY_PREFIX + tier, experiment.to_json())
        return experiment

    def stop(self, tier: str) -> Experiment:
        experiment = self.get(tier)
        if not experiment.running:
            raise ExperimentError(f"the experiment on {tier} already stopped")
        stopped = dataclasses.replace(experiment, stopped_at=time.time(), final=self._snapshot(tier))
        self.store.set(KEY_PREFIX + tier, stopped.to_json())
        return stopped

    def traffic(self, experiment: Experiment) -> dict[str, ArmCounts]:
        later = experiment.final if experiment.final is not None else self._snapshot(experiment.tier)
        return window(later, experiment.baseline)

    def feedback(self, experiment: Experiment) -> dict[str, Feedback]:
        end = f"{int(experiment.stopped_at * 1000)}-99999999" if experiment.stopped_at else "+"
        tallies: dict[str, dict[str, int]] = {"control": {}, "treatment": {}}
        for _id, fields in self.store.xrange(FEEDBACK_STREAM, min=experiment.feedback_from, max=end):
            entry = {k.decode(): v.decode() for k, v in fields.items()}
            arm = arm_of_answer(entry, experiment.tier)
            if arm is None:
                continue
            kind = classify_feedback(entry)
            tallies[arm][kind] = tallies[arm].get(kind, 0) + 1
        return {arm: Feedback(**counts) for arm, counts in tallies.items()}

    def report(
        self,
        tier: str,
        *,
        confidence: float = 0.95,
        min_feedback: int = 30,
        max_p95_ratio: float = 1.5,
    ) -> Report:
        experiment = self.get(tier)
        arms = self.traffic(experiment)
        if not any(counts.requests for counts in arms.values()):
            began = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(experiment.started_at))
            raise ExperimentError(
                f"no traffic reached {tier} since the experiment started at {began}: nothing to compare"
            )
        feedback = self.feedback(experiment)
        return assess(experiment, arms, feedback, confidence, min_feedback, max_p95_ratio)


def _readout(
    metric: str, control: tuple[int, int], treatment: tuple[int, int], higher_is_better: bool
) -> Readout:
    bayes = bayes_binomial(
        control[0], control[1], treatment[0], treatment[1], higher_is_better=higher_is_better
    )
    frequentist = frequentist_binomial(control[0], control[1], treatment[0], treatment[1])
    return Readout(metric, control, treatment, bayes, frequentist)


def assess(
    experiment: Experiment,
    arms: dict[str, ArmCounts],
    feedback: dict[str, Feedback],
    confidence: float,
    min_feedback: int,
    max_p95_ratio: float,
) -> Report:
    """The read-out and recommendation for a window's counts (see the module's docstring)."""
    control, treatment = arms.get("control", ArmCounts()), arms.get("treatment", ArmCounts())
    errors = None
    if control.requests and treatment.requests:
        errors = _readout(
            "error rate",
            (control.failures, control.requests),
            (treatment.failures, treatment.requests),
            higher_is_better=False,
        )
    good_c, good_t = feedback.get("control", Feedback()), feedback.get("treatment", Feedback())
    satisfaction = None
    if good_c.rated and good_t.rated:
        satisfaction = _readout(
            "positive feedback",
            (good_c.good, good_c.rated),
            (good_t.good, good_t.rated),
            higher_is_better=True,
        )

    keep, promote, more = [], [], []
    if errors is None:
        more.append("both arms need traffic (one has none in this window)")
    elif 1.0 - errors.bayes.prob_treatment_better >= confidence and treatment.failures > 0:
        keep.append(
            f"treatment fails more often: {_pct(treatment.error_rate)} vs {_pct(control.error_rate)} "
            f"(P(worse) = {1.0 - errors.bayes.prob_treatment_better:.3f}, "
            f"p = {errors.frequentist.p_value:.3g})"
        )
    p95_c, p95_t = control.envoy_quantile(0.95), treatment.envoy_quantile(0.95)
    if p95_c and p95_t and p95_t > max_p95_ratio * p95_c:
        keep.append(f"treatment p95 {p95_t:.1f} ms > {max_p95_ratio:g} x control's {p95_c:.1f} ms")
    if satisfaction is None or min(good_c.rated, good_t.rated) < min_feedback:
        more.append(
            f"feedback: {good_c.rated} rated answers from control, {good_t.rated} from treatment; "
            f"{min_feedback} per arm needed"
        )
    else:
        better = satisfaction.bayes.prob_treatment_better
        if better >= confidence:
            promote.append(f"users rate treatment better: P(better) = {better:.3f}")
        elif 1.0 - better >= confidence:
            keep.append(f"users rate treatment worse: P(better) = {better:.3f}")
        else:
            more.append(f"feedback inconclusive: P(better) = {better:.3f} (needs {confidence:g} either way)")
    if keep:
        recommendation, reasons = "KEEP_CONTROL", keep
    elif promote and not more:
        recommendation, reasons = "PROMOTE", promote
    else:
        recommendation, reasons = "CONTINUE", more or ["not enough evidence yet"]
    return Report(experiment, arms, feedback, errors, satisfaction, recommendation, reasons)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def render(report: Report) -> str:
    """The read-out as an operator reads it in a terminal."""
    e = report.experiment
    began = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.started_at))
    state = "running" if e.running else "stopped"
    span = (e.stopped_at or time.time()) - e.started_at
    lines = [
        f"experiment {e.name} on {e.tier}: {state}, started {began}, {span:.0f}s of traffic "
        f"(treatment {e.treatment_percent:g}% at start)",
        "",
        f"{'arm':<10} {'requests':>9} {'errors':>8} {'err rate':>9} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'tier p95':>9} {'rated':>6} {'positive':>9}",
    ]
    for arm, counts in report.arms.items():
        fb = report.feedback.get(arm, Feedback())
        lines.append(
            f"{arm:<10} {counts.requests:>9} {counts.failures:>8} {_pct(counts.error_rate):>9} "
            f"{_ms(counts.envoy_quantile(0.5)):>8} {_ms(counts.envoy_quantile(0.95)):>8} "
            f"{_ms(counts.tier_quantile(0.95)):>9} {fb.rated:>6} {_pct(fb.rate):>9}"
        )
    for readout in (report.satisfaction, report.errors):
        if readout is None:
            continue
        b, f = readout.bayes, readout.frequentist
        lines += [
            "",
            f"{readout.metric}: control {readout.control[0]}/{readout.control[1]}, "
            f"treatment {readout.treatment[0]}/{readout.treatment[1]}",
            f"  Bayesian:     P(treatment better) = {b.prob_treatment_better:.3f}; posterior mean control "
            f"{b.control.mean:.3f} [{b.control.low:.3f}, {b.control.high:.3f}], "
            f"treatment {b.treatment.mean:.3f} [{b.treatment.low:.3f}, {b.treatment.high:.3f}]; "
            f"lift {b.lift_mean:+.3f} "
            f"[{b.lift_low:+.3f}, {b.lift_high:+.3f}]",
            f"  frequentist:  {f.test}, p = {f.p_value:.3g}; difference {f.difference:+.3f} "
            f"(95% CI {f.low:+.3f} to {f.high:+.3f})",
        ]
    lines += ["", f"recommendation: {report.recommendation}", *(f"  - {reason}" for reason in report.reasons)]
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
