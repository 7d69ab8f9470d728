"""`tiermesh index ...` and `tiermesh search ...`: the retriever's operator and user commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from services.retriever import corpus
from services.retriever.config import INDEX_NAME, RECALL_K, RECALL_THRESHOLD

INDEX_EPILOG = """typical flow:
  tiermesh index build                       embed and index the shipped knowledge base
  tiermesh index validate <version>          recall@5 against exact search
  tiermesh index publish <version>           make it live on every replica (hot swap)
  tiermesh index rollback                    back to the version before
  tiermesh index build --corpus my.jsonl --kind ivf --nlist 1024
  tiermesh index synth --count 1000000 -o var/synthetic/corpus.jsonl"""


def add_commands(sub: Any) -> None:
    """Register `index` and `search` on the top-level parser's subparsers."""
    index = sub.add_parser(
        "index",
        help="build, validate, publish and roll back retriever indexes",
        epilog=INDEX_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    index.add_argument(
        "--name", default=INDEX_NAME, help=f"registry name of the index (default {INDEX_NAME})"
    )
    actions = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    build = actions.add_parser("build", help="embed a corpus and build a new index version (not live yet)")
    build.add_argument(
        "--corpus",
        type=Path,
        default=corpus.DEFAULT_CORPUS,
        help="JSONL, CSV or Parquet (default: shipped KB)",
    )
    build.add_argument("--kind", choices=("auto", "flat", "ivf"), default="auto", help="auto: flat below 50k")
    build.add_argument("--nlist", type=int, help="IVF lists (default ~4*sqrt(N))")
    build.add_argument(
        "--nprobe", type=int, help="IVF lists a search scans by default (default: max(16, nlist/128))"
    )

    validate = actions.add_parser("validate", help="recall@k against exact search on held-out queries")
    validate.add_argument("version", help="version to validate ('latest' works)")
    validate.add_argument("--queries", type=Path, help="JSONL of {'question': ...} or one query per line")
    validate.add_argument("-k", type=int, default=RECALL_K, help="k of recall@k (default 5)")

    publish = actions.add_parser("publish", help="make a version live on every replica")
    publish.add_argument("version")
    publish.add_argument(
        "--allow-low-recall", action="store_true", help="publish below the recall threshold (logged)"
    )

    actions.add_parser("rollback", help="make the previously published version live again")
    actions.add_parser("list", help="every version with kind, size, recall; * marks the live one")

    synth = actions.add_parser("synth", help="write a large synthetic lending corpus (JSONL) for scale tests")
    synth.add_argument("--count", type=int, default=100_000, help="documents (default 100000)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("-o", "--output", type=Path, required=True, help="JSONL file to write")
    index.set_defaults(run=run_index)

    search = sub.add_parser("search", help="ask the retriever through Envoy and print the passages")
    search.add_argument("text", help="the question")
    search.add_argument("-k", type=int, help="passages to return")
    search.add_argument("--nprobe", type=int, help="IVF lists to scan")
    search.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE", help="metadata filter")
    search.add_argument("--target", help="host:port (default: the running mesh's Envoy)")
    search.add_argument("--timeout", type=float, default=10.0)
    search.set_defaults(run=run_search)


def run_index(args: argparse.Namespace) -> int:
    from services.retriever import manage
    from tiermesh.kit.registry import Registry

    registry = Registry()
    try:
        return _run_index(args, registry)
    except (manage.PublishRefused, corpus.CorpusError, manage.IndexArtifactError) as error:
        print(f"tiermesh index {args.index_command}: {error}", file=sys.stderr)
        return 1


def _run_index(args: argparse.Namespace, registry: Any) -> int:
    from services.retriever import manage

    command = args.index_command
    if command == "build":
        version = manage.build(
            registry, args.corpus, name=args.name, kind=args.kind, nlist=args.nlist, nprobe=args.nprobe
        )
        parameters = version.metadata["parameters"]
        print(
            f"{args.name} {version.version}: {parameters['kind']}, {parameters['count']} passages, "
            f"nlist {parameters['nlist']}, embedder {parameters['embedder']['version']}"
        )
        print(f"next: tiermesh index validate {version.version}")
    elif command == "validate":
        queries = corpus.load_questions(args.queries) if args.queries else None
        result, table = manage.validate(registry, args.version, name=args.name, queries=queries, k=args.k)
        print(f"{'nprobe':>8}  recall@{args.k}")
        for row in table:
            mark = "  <- default" if row.nprobe == result.nprobe else ""
            print(f"{row.nprobe:>8}  {row.recall:.4f}{mark}")
        verdict = "ok to publish" if result.recall >= RECALL_THRESHOLD else "below threshold"
        print(f"recall@{args.k} {result.recall:.4f} on {result.queries} queries: {verdict}")
        return 0 if result.recall >= RECALL_THRESHOLD else 1
    elif command == "publish":
        manage.publish(
            registry,
            args.version,
            name=args.name,
            store_url=args.mesh.store(),
            allow_low_recall=args.allow_low_recall,
        )
    elif command == "rollback":
        manage.rollback(registry, name=args.name, store_url=args.mesh.store())
    elif command == "list":
        rows = manage.versions_table(registry, args.name)
        if not rows:
            print(f"no versions of {args.name} (tiermesh index build makes one)")
        for row in rows:
            recall = "-" if row["recall"] is None else f"{row['recall']:.3f}"
            print(
                f"{'*' if row['live'] else ' '}{row['version']}  {row['kind']:<4} "
                f"{row['vectors']:>9} vectors  "
                f"nlist {row['nlist']:<5} nprobe {row['nprobe']:<4} recall {recall:<6} {row['created']}"
            )
    elif command == "synth":
        print(manage.synth(args.output, args.count, seed=args.seed))
    return 0


def run_search(args: argparse.Namespace) -> int:
    import grpc

    from tiermesh.retriever.v1 import retriever_pb2, retriever_pb2_grpc

    target = args.target or args.mesh.envoy()
    filters = dict(item.split("=", 1) for item in args.filter if "=" in item)
    request = retriever_pb2.SearchRequest(text=args.text, metadata_filter=filters)
    if args.k is not None:
        request.k = args.k
    if args.nprobe is not None:
        request.nprobe = args.nprobe
    with grpc.insecure_channel(target) as channel:
        try:
            response = retriever_pb2_grpc.RetrieverServiceStub(channel).Search(request, timeout=args.timeout)
        except grpc.RpcError as error:
            print(f"{error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    scanned = f", nprobe {response.nprobe}" if response.nprobe else ""
    print(f"index {response.model.name} {response.model.version}{scanned} via {target}")
    for passage in response.passages:
        print(f"  {passage.score:.3f}  {passage.doc_id}#{passage.chunk_index}  {passage.title}")
        print(f"         {passage.text[:160]}{'...' if len(passage.text) > 160 else ''}")
    if not response.passages:
        print("  no passages matched")
    return 0
