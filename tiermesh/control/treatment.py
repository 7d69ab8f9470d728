"""`python -m tiermesh.control.treatment`: start a tier as its A/B treatment in a container.

Compose's `<tier>-treatment` services run this (`TIERMESH_TIER` names the tier). It applies the
runner's own variable, `<TIER>_TREATMENT` (KEY=VALUE pairs, or `same`), with the runner's parser,
then replaces itself with the tier, so `tiermesh up` and compose read one variable with one
syntax and one check. Unset, there is no treatment: Envoy has no cluster for it, and the
container says so and exits 0 (compose restarts it only on failure, so no model sits idle).
"""

from __future__ import annotations

import os
import sys

from tiermesh.kit.topology import TopologyError, tier_named, treatment_overrides


def main() -> int:
    try:
        tier = tier_named(os.environ.get("TIERMESH_TIER", ""))
    except TopologyError as error:
        print(f"TIERMESH_TIER: {error}", file=sys.stderr)
        return 2
    try:
        overrides = treatment_overrides(os.environ, tier)
    except TopologyError as error:
        print(f"{tier.name} treatment: {error}", file=sys.stderr)
        return 2
    if overrides is None:
        print(
            f"{tier.name} treatment: {tier.prefix}TREATMENT is not set (Envoy has no cluster for it); exiting"
        )
        return 0
    differs = " ".join(f"{key}={value}" for key, value in overrides.items())
    print(f"{tier.name} treatment: {differs or 'the control settings (an A/A test)'}", flush=True)
    os.execvpe(sys.executable, [sys.executable, "-m", tier.module], {**os.environ, **overrides})
    return 1  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main())
