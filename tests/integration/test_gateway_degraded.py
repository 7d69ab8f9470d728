"""The gateway when tiers fail: a request out of time names the hop, and tiers stopped one by one
(bias, classifiers, the retriever, the llm) degrade the answer explicitly or fail it fast, by name.

The mesh is this module's own: its tiers are stopped for good.
"""

import asyncio
import contextlib
import os
import re
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.gateway import local_gateway, rest_client
from tiermesh.control.probes import grpc_health
from tiermesh.control.runner import stop_process
from tiermesh.control.testing import running_mesh
from tiermesh.kit.testing import run_cli

pytestmark = pytest.mark.integration

QUESTION = "What paperwork do I need to get a car loan at the dealership?"
GENERATION = {"max_tokens": 8, "temperature": 0, "seed": 3}
SECRET = re.compile(r"\btm_k_[0-9a-f]{10}_[A-Za-z0-9_-]{43}")
# Every request must answer well within this: a dead tier is an error, never a hang.
TIMEOUT = httpx.Timeout(60.0, connect=5.0)


@pytest.fixture(scope="module")
def degraded_mesh(
    tmp_path_factory, embedding_model, knowledge_index, language_model, classifier_models, bias_text_model
):
    with running_mesh(tmp_path_factory.mktemp("degraded"), RETRIEVER_REPLICAS="1") as (running, status):
        yield running, status


@pytest.fixture(scope="module")
def status(degraded_mesh):
    return degraded_mesh[1]


@pytest.fixture(scope="module")
def api(status):
    """A client of the mesh's REST API through Envoy, with a key made by `tiermesh keys create`."""
    result = run_cli(
        {**os.environ, "REDIS_URL": status["store"]["url"]}, "keys", "create", "--name", "degraded",
        "--requests-per-minute", "600", "--tokens-per-minute", "10000000",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    secret = SECRET.search(result.stdout).group(0)
    with rest_client(status, secret, TIMEOUT) as client:
        yield client


@contextlib.asynccontextmanager
async def local_client(status: dict, **settings):
    """An async client of a gateway served in this process over the mesh's Envoy (requests to it
    must be awaited: its server runs on this event loop)."""
    async with (
        local_gateway(status, **settings) as (url, secret),
        httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {secret}"}, timeout=TIMEOUT
        ) as client,
    ):
        yield client


def error_of(response: httpx.Response) -> dict:
    assert response.headers["content-type"].startswith("application/json"), response.text
    return response.json()["error"]


def degraded_total(status: dict, mode: str) -> float:
    """The gateway's tiermesh_gateway_degraded_total{mode=...} (0 before the first)."""
    text = httpx.get(f"http://{status['gateway']['metrics']}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tiermesh_gateway_degraded_total" and sample.labels.get("mode") == mode:
                return sample.value
    return 0.0


def stop(running, status: dict, tier: str) -> None:
    """Stop every process of `tier`, then wait until Envoy no longer finds it serving."""
    state = running.state()
    names = [name for name in state if name == tier or name.startswith(f"{tier}-")]
    assert names, f"no {tier} process in {sorted(state)}"
    for name in names:
        stop_process(state[name], timeout=20)
    service = status[names[0]]["service"]
    deadline = time.monotonic() + 15
    while grpc_health(status["envoy"]["grpc"], service, tier=tier) == "SERVING":
        assert time.monotonic() < deadline, f"Envoy still finds {tier} serving"
        time.sleep(0.2)
    time.sleep(1.0)  # the health check that failed may not have ejected the last host yet


def advise(client: httpx.Client, **extra) -> httpx.Response:
    return client.post("/v1/advice", json={"question": QUESTION, "options": GENERATION, **extra})


async def test_a_request_out_of_time_names_the_hop_that_ran_out(status):
    async with local_client(status, request_timeout_s=0.5) as client:
        warm = await client.post("/v1/advice", json={"question": "What's a good recipe for banana bread?"})
        assert warm.status_code == 200, warm.text  # channels open: the hops before the llm are quick

        started = time.monotonic()
        response = await client.post(
            "/v1/advice", json={"question": QUESTION, "options": {"max_tokens": 200, "temperature": 0}}
        )
        elapsed = time.monotonic() - started

    assert response.status_code == 504, response.text
    error = error_of(response)
    assert (error["code"], error["param"], error["type"]) == ("upstream_timeout", "llm", "server_error")
    assert error["message"].startswith("llm: DEADLINE_EXCEEDED"), error
    assert elapsed < 5


@pytest.mark.slow
async def test_tiers_stopped_one_by_one_degrade_or_fail_by_name(degraded_mesh, status, api):
    running, _ = degraded_mesh

    # bias: answered, marked unchecked (never treated as clean)
    before = degraded_total(status, "bias_unchecked")
    stop(running, status, "bias")
    response = advise(api)
    assert response.status_code == 200, response.text
    advice = response.json()
    assert advice["bias"]["status"] == "unchecked" and advice["bias"]["score"] is None
    assert advice["bias"]["unchecked_reason"].startswith("bias:"), advice["bias"]
    assert advice["degraded"] == ["bias_unchecked"]
    assert advice["text"].strip() and advice["sources"] and advice["intent"]
    assert "bias" not in {v["tier"] for v in advice["versions"]}
    assert [t["status"] for t in advice["timings"] if t["tier"] == "bias"] == ["UNAVAILABLE"]
    assert degraded_total(status, "bias_unchecked") == before + 1

    # classifiers: answered without intent or entities
    stop(running, status, "classifiers")
    response = advise(api)
    assert response.status_code == 200, response.text
    advice = response.json()
    assert advice["intent"] is None and advice["entities"] == []
    assert advice["degraded"] == ["classifiers_skipped", "bias_unchecked"]
    assert advice["text"].strip() and advice["sources"]
    assert {t["status"] for t in advice["timings"] if t["tier"] == "classifiers"} == {"UNAVAILABLE"}
    assert degraded_total(status, "classifiers_skipped") >= 1

    # the retriever: no answer without sources (unless configured), 503 naming it
    stop(running, status, "retriever")
    response = advise(api)
    assert response.status_code == 503, response.text
    error = error_of(response)
    assert (error["code"], error["param"]) == ("upstream_unavailable", "retriever"), error
    streamed = advise(api, stream=True)  # fails before any text: the same status and JSON body
    assert streamed.status_code == 503 and error_of(streamed)["param"] == "retriever", streamed.text

    async with local_client(status, answer_without_sources=True) as local:
        response = await local.post("/v1/advice", json={"question": QUESTION, "options": GENERATION})
        assert response.status_code == 200, response.text
        advice = response.json()
        assert advice["sources"] == [] and advice["text"].strip()
        assert advice["degraded"] == ["classifiers_skipped", "sources_skipped", "bias_unchecked"]

        # the llm: nothing to answer with, 503 naming it, fast
        await asyncio.to_thread(stop, running, status, "llm")  # the local gateway keeps serving
        for body in (
            {"question": QUESTION, "options": GENERATION},
            {"question": QUESTION, "options": GENERATION, "stream": True},
        ):
            response = await local.post("/v1/advice", json=body)
            assert response.status_code == 503, response.text
            error = error_of(response)
            assert (error["code"], error["param"]) == ("upstream_unavailable", "llm"), error
        chat = await local.post(
            "/v1/chat/completions",
            json={"model": "tiermesh-advisor", "messages": [{"role": "user", "content": QUESTION}]},
        )
        assert chat.status_code == 503 and error_of(chat)["param"] == "llm", chat.text

    response = advise(api)  # the mesh's gateway still fails at the retriever, as fast
    assert response.status_code == 503 and error_of(response)["param"] == "retriever", response.text
