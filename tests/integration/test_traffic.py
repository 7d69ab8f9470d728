"""A/B traffic through the real Envoy: sticky weighted splits, live shifts, experiments, rollouts.

One mesh of the bias tier with a treatment deployment that is misconfigured for long texts
(BIAS_MAX_TEXT_CHARS=40): short texts are answered alike by both arms, long ones only by the
control, which is how a bad treatment looks to the mesh.
"""

import concurrent.futures
import contextlib
import json
import threading

import grpc
import pytest

from tiermesh.bias.v1 import bias_pb2, bias_pb2_grpc
from tiermesh.control.testing import running_mesh
from tiermesh.control.traffic import EnvoyAdmin, set_treatment, split_of
from tiermesh.kit.testing import run_cli
from tiermesh.kit.topology import only

pytestmark = pytest.mark.integration

SHORT = "Approve the loan."  # both arms answer it
LONG = "Applicants from that neighbourhood should not get loans at all."  # the treatment refuses it


@pytest.fixture(scope="module")
def ab_mesh(tmp_path_factory, bias_text_model):
    home = tmp_path_factory.mktemp("ab")
    with running_mesh(home, tiers=only("bias"), BIAS_TREATMENT="BIAS_MAX_TEXT_CHARS=40") as (mesh, status):
        yield mesh, status


@pytest.fixture
def admin(ab_mesh):
    admin = EnvoyAdmin(ab_mesh[1]["envoy"]["admin"])
    yield admin
    set_treatment(admin, "bias", 0)


@pytest.fixture(scope="module")
def stub(ab_mesh):
    with grpc.insecure_channel(ab_mesh[1]["envoy"]["grpc"]) as channel:
        yield bias_pb2_grpc.BiasServiceStub(channel)


def arm_of(stub, user: str, text: str = SHORT) -> str:
    _, call = stub.ScoreText.with_call(
        bias_pb2.ScoreTextRequest(text=text), metadata=[("x-tiermesh-user", user)], timeout=10
    )
    return dict(call.initial_metadata())["x-tiermesh-arm"]


def arms_of(stub, users: list[str]) -> dict[str, str]:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return dict(zip(users, pool.map(lambda user: arm_of(stub, user), users), strict=True))


USERS = [f"user-{i}" for i in range(10_000)]


@pytest.mark.slow
def test_ten_thousand_users_split_as_weighted_stay_put_and_only_move_forward(admin, stub):
    set_treatment(admin, "bias", 30)
    first = arms_of(stub, USERS)
    share = sum(arm == "treatment" for arm in first.values()) / len(USERS)
    assert abs(share - 0.30) <= 0.02, share

    sample = USERS[::5]  # the same users again, weights unchanged: the same arm, every one
    assert arms_of(stub, sample) == {user: first[user] for user in sample}

    set_treatment(admin, "bias", 50)
    second = arms_of(stub, USERS)
    back = [u for u in USERS if first[u] == "treatment" and second[u] == "control"]
    moved = [u for u in USERS if first[u] == "control" and second[u] == "treatment"]
    assert back == []  # raising the treatment never sends its users back
    assert abs(len(moved) / len(USERS) - 0.20) <= 0.02
    assert abs(sum(arm == "treatment" for arm in second.values()) / len(USERS) - 0.50) <= 0.02


def test_traffic_cli_shows_and_sets_weights_and_refuses_bad_input_without_changing_envoy(ab_mesh, admin):
    env = ab_mesh[0].environ
    done = run_cli(env, "traffic", "set", "bias", "treatment=12.5")
    assert done.returncode == 0, done.stderr
    assert "treatment 0.00% -> 12.50% (control 87.50%)" in done.stdout
    shown = run_cli(env, "traffic", "show", "--json")
    assert json.loads(shown.stdout)["bias"] == {"control": 87.5, "treatment": 12.5, "source": "runtime"}
    runtime_before = admin.runtime()
    for args, message in (
        (["traffic", "set", "bias", "treatment=101"], "from 0 to 100"),
        (["traffic", "set", "bias", "treatment=-5"], "from 0 to 100"),
        (["traffic", "set", "bias", "canary=5"], "expected treatment=<percent>"),
        (["traffic", "set", "llm", "treatment=5"], "unknown tier 'llm'"),
        (["rollout", "nope", "--hold", "1s"], "unknown tier"),
        (["rollout", "bias", "--steps", "50,20"], "--steps"),
    ):
        refused = run_cli(env, *args)
        assert refused.returncode == 1 and message in refused.stderr, (args, refused.stderr)
    assert admin.runtime() == runtime_before  # a refused command changes nothing in Envoy
    assert split_of(admin, "bias").percent("treatment") == 12.5


def test_a_shift_under_concurrent_load_drops_no_request(admin, stub):
    stop, failures, served = threading.Event(), [], {"control": 0, "treatment": 0}

    def load(worker: int) -> None:
        count = 0
        while not stop.is_set():
            count += 1
            try:
                served[arm_of(stub, f"load-{worker}-{count}")] += 1
            except grpc.RpcError as error:
                failures.append(error.code())

    workers = [threading.Thread(target=load, args=(i,)) for i in range(6)]
    for worker in workers:
        worker.start()
    try:
        for percent in (10, 50, 100, 0, 100, 30, 0):
            set_treatment(admin, "bias", percent)
            stop.wait(0.4)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert failures == []
    assert served["control"] > 50 and served["treatment"] > 50


@pytest.mark.slow
def test_an_experiment_reads_out_both_arms_and_keeps_the_failing_treatments_control(ab_mesh, admin, stub):
    env = ab_mesh[0].environ
    assert run_cli(env, "experiment", "report", "bias").returncode == 1  # none started
    started = run_cli(env, "experiment", "start", "bias", "--treatment", "50", "--name", "long-texts")
    assert started.returncode == 0, started.stderr
    empty = run_cli(env, "experiment", "report", "bias")
    assert empty.returncode == 1 and "no traffic reached bias" in empty.stderr
    again = run_cli(env, "experiment", "start", "bias")
    assert again.returncode == 1 and "already running" in again.stderr
    for i in range(200):
        try:
            arm_of(stub, f"exp-{i}", LONG)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    stopped = run_cli(env, "experiment", "stop", "bias")
    assert stopped.returncode == 0, stopped.stderr
    arm_of(stub, "after-the-window", LONG)  # not counted: the window is closed
    report = json.loads(run_cli(env, "experiment", "report", "bias", "--json").stdout)
    control, treatment = report["arms"]["control"], report["arms"]["treatment"]
    assert control["requests"] + treatment["requests"] == 200
    assert control["failures"] == 0 and treatment["failures"] == treatment["requests"] > 50
    assert report["errors"]["bayes"]["prob_treatment_better"] < 0.01
    assert report["errors"]["frequentist"]["p_value"] < 0.01
    assert report["recommendation"] == "KEEP_CONTROL"
    text = run_cli(env, "experiment", "report", "bias").stdout
    assert "recommendation: KEEP_CONTROL" in text and "P(treatment better)" in text


def test_a_rollout_of_a_failing_treatment_rolls_back_by_itself(ab_mesh, admin, stub):
    stop = threading.Event()

    def load() -> None:
        count = 0
        while not stop.is_set():
            count += 1
            with contextlib.suppress(grpc.RpcError):
                arm_of(stub, f"roll-{count}", LONG)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        rolled = run_cli(
            ab_mesh[0].environ,
            "rollout",
            "bias",
            "--steps",
            "20,50,100",
            "--hold",
            "30s",
            "--min-requests",
            "10",
            timeout=120,
        )
    finally:
        stop.set()
        worker.join()
    assert rolled.returncode == 1, rolled.stdout + rolled.stderr
    assert "bias: treatment 0% -> 20%" in rolled.stdout
    assert "rolled back to 0% at the 20% step: treatment error rate 100.00%" in rolled.stdout
    assert "-> 50%" not in rolled.stdout
    assert split_of(admin, "bias").percent("treatment") == 0
