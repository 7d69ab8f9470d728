"""tiermesh: a gRPC inference mesh for retrieval-augmented loan advice.

The package has three rooms, each a layer that may import only the ones below it (checked by
`lint-imports`, contracts in pyproject.toml):

* `tiermesh/<tier>/v1/` — the generated stubs of the contract in `protos/` (never edited by hand);
* `tiermesh.kit` — the runtime kit every tier process runs on (server, settings, telemetry, ...);
* the tiers themselves, `services/<tier>/`, on the kit;
* `tiermesh.control` — the control plane that operates the mesh (runner, Envoy configuration,
  traffic, experiments, rollouts, the trace sink) and the `tiermesh` command above everything.
"""

__version__ = "0.1.0"
