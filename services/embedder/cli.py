"""`tiermesh embed`: embed texts through Envoy, as any internal client would."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_commands(sub: Any) -> None:
    """Register `embed` on the root parser's subparsers."""
    embed = sub.add_parser("embed", help="embed texts through Envoy and print the vectors' first values")
    embed.add_argument("texts", nargs="+", help="texts to embed")
    embed.add_argument("--target", help="host:port to call (default: the running mesh's Envoy)")
    embed.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds")
    embed.set_defaults(run=cmd_embed)


def cmd_embed(args: argparse.Namespace) -> int:
    import grpc

    from tiermesh.embedder.v1 import embedder_pb2, embedder_pb2_grpc

    target = args.target or args.mesh.envoy()
    with grpc.insecure_channel(target) as channel:
        stub = embedder_pb2_grpc.EmbedderServiceStub(channel)
        try:
            response = stub.EmbedBatch(embedder_pb2.EmbedBatchRequest(texts=args.texts), timeout=args.timeout)
        except grpc.RpcError as error:
            print(f"{error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    model = response.model
    print(f"model {model.name} {model.version} ({model.digest[:19]}), dimension {response.dimension}")
    print(f"via {target}")
    for text, embedding in zip(args.texts, response.embeddings, strict=True):
        head = ", ".join(f"{v:+.4f}" for v in embedding.values[:5])
        print(f"  [{head}, ...] tokens={embedding.token_count} cached={embedding.cached}  {text[:60]!r}")
    return 0
