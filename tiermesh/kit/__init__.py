"""The runtime kit: what every tier process imports, and nothing that operates the mesh.

`server` (the gRPC bootstrap: health, reflection, the observing interceptor, graceful shutdown),
`config` (settings from environment variables), `logs`, `telemetry`, `metrics`, `errors`
(RpcError → gRPC status), `batching` (dynamic micro-batching), `registry` (versioned model
artifacts), `hotswap` (following `latest` over pub/sub), `contract` (the generated stubs),
`topology` (the mesh's shape: tiers, arms, ports, headers), `minilm` (the sentence encoder three
tiers share), `commands` (what tier commands get from the CLI root) and `testing` (helpers for a
tier's tests). The kit imports only the stubs; tiers and the control plane import the kit.
"""
