"""tiermesh: the shared kit every tier runs on, and the generated stubs of the contract.

Hand-written modules: config, logs, telemetry, metrics, errors, server, batching, registry,
contract, runner, cli, testing. Generated stubs (never edited by hand) live in
`tiermesh/<tier>/v1/` and are rebuilt with `tiermesh protos generate`.
"""

__version__ = "0.1.0"
