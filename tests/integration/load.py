"""Load through Envoy for the mesh's integration tests: clients calling one RPC until stopped,
counting calls, failures and the arms that answered, and Envoy's count of calls per replica."""

import re
import threading
import urllib.request
from collections.abc import Callable
from typing import Any

import grpc

from tiermesh.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from tiermesh.kit.topology import ARM_HEADER
from tiermesh.retriever.v1 import retriever_pb2, retriever_pb2_grpc


def calls_to(admin: str, address: str, cluster: str = "retriever") -> int:
    """How many requests Envoy has sent to one replica of `cluster`."""
    with urllib.request.urlopen(f"http://{admin}/clusters", timeout=2) as response:
        found = re.search(
            rf"^{cluster}::{re.escape(address)}::rq_total::(\d+)$", response.read().decode(), re.M
        )
    return int(found.group(1)) if found else 0


class Load:
    """Clients calling one RPC through Envoy until stopped, each as a user of its own (so an A/B
    split sends some of them to each arm); counts calls, failures and the arms that answered."""

    def __init__(self, envoy: str, call: Callable[[grpc.Channel, list], Any], clients: int = 4) -> None:
        self.envoy, self.call = envoy, call
        self.calls, self.failures, self.arms = 0, [], set()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, client: int) -> None:
        with grpc.insecure_channel(self.envoy) as channel:
            n = 0
            while not self.stopping.is_set():
                n += 1
                try:
                    call = self.call(channel, [("x-tiermesh-user", f"user-{client}-{n % 50}")])
                    self.arms |= {value for key, value in call.initial_metadata() if key == ARM_HEADER}
                    self.calls += 1
                except grpc.RpcError as error:
                    self.failures.append(f"{error.code().name}: {error.details()}")

    def __enter__(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join()


def search(channel: grpc.Channel, metadata: list) -> grpc.Call:
    stub = retriever_pb2_grpc.RetrieverServiceStub(channel)
    _, call = stub.Search.with_call(
        retriever_pb2.SearchRequest(text="APR?", k=1), timeout=10, metadata=metadata
    )
    return call


def embed(channel: grpc.Channel, metadata: list) -> grpc.Call:
    stub = embedder_pb2_grpc.EmbedderServiceStub(channel)
    _, call = stub.Embed.with_call(embedder_pb2.EmbedRequest(text="APR?"), timeout=10, metadata=metadata)
    return call
