"""The control plane: what operates the mesh, above the tiers.

`cli` (the `tiermesh` command root) and `commands/` (its command modules), `runner` (the local
runner behind `tiermesh up/down/status`), `probes`, `supervise` and `treatment` (process helpers),
`envoy_config` (Envoy's configuration from the topology), `traffic`, `experiment`, `rollout`,
`abstats` and `armstats` (A/B weights, read-outs and guards), `otlp_sink` and `traces` (Envoy's
spans and `tiermesh trace`), `testing` (whole-mesh helpers for tests and benchmarks). Nothing
here runs inside a tier process.
"""
