"""Two "hosts" on one machine, and faults on the link between them (tests/test_lan.py, scripts/bench_lan.py).

* :class:`NetLab`: two network namespaces, a capture host and a GPU box, joined by a veth pair on a
  private /24 in 10.200.0.0/16 (recipe: shared/notes/lan-namespaces.md). Traffic only ever goes
  between these two namespaces and their own loopback. Always torn down (``ip netns del`` both,
  which also removes the veth pair), even when the test fails.
* Faults: random packet loss with nftables in a namespace's input hook (:meth:`NetLab.loss`),
  the GPU box's link down and up (:meth:`NetLab.link_down`), and delay/jitter through a userspace
  TCP relay (``netem`` is missing from this kernel): ``python -m services.lab.netlab relay ...``.
* :class:`NetnsObserver`: the harness's telemetry observer, running inside the capture namespace.
  ZeroMQ's I/O threads, which make the TCP connections, are created by the thread that makes the
  first socket and inherit that thread's network namespace. So the observer thread switches
  itself (only itself: ``setns`` acts per thread on Linux) into the capture namespace before it
  creates its context, and the rest of this process stays in the root namespace. Chosen over
  ``llvc tap`` under ``ip netns exec``: the harness's :class:`~services.lab.harness.Observer` (arrival times,
  ``played()``, ``first_good_chunk()``) is reused as is, with no JSON round trip and no extra
  process to clean up; ``time.monotonic_ns()`` is one clock for every namespace of a host.
* :class:`LanPipeline` runs ``llvc run --services inference`` in the GPU box and ``llvc run
  --services monitor,playback,capture`` on the capture host, with CURVE on, and
  :func:`run_fault` measures one fault: e2e before/during/after, underruns, drops, recovery.

The relay (``relay`` subcommand) forwards one TCP port to another address, byte for byte (CURVE's
encryption passes through untouched), in both directions. Each chunk of bytes it reads is held
for ``delay ± jitter`` ms (uniform) and order is kept: release = max(previous release, arrival +
delay). SIGUSR1 turns the delay on, SIGUSR2 off (``--start-off``: start without it), so a run can
measure the same path before, during and after. When either side closes, the other is closed too,
so ZeroMQ sees a disconnect and reconnects.
"""
from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import os
import queue
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.telemetry import Heartbeat
from models.spec import ModelSpec
from services.lab.harness import Observer, Played, RunningPipeline, e2e_stats

CLONE_NEWNET = 0x40000000
NFT_TABLE = "llvc_netlab"
NAME_RE = re.compile(r"^llvc-(?:cap|gpu)-(\d+)-\d+$")
_lab_counter = itertools.count()
_skip_cache: dict[bool, str | None] = {}


def _run(*cmd: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def skip_reason(need_nft: bool = False) -> str | None:
    """Why two namespaces (and, with ``need_nft``, nftables inside them) cannot be used here; None if they can."""
    if need_nft not in _skip_cache:
        _skip_cache[need_nft] = _probe(need_nft)
    return _skip_cache[need_nft]


def _probe(need_nft: bool) -> str | None:
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "needs root: creating network namespaces and veth pairs (ip netns add) is privileged"
    if shutil.which("ip") is None:
        return "the `ip` command (Debian package iproute2) is not installed"
    if need_nft and shutil.which("nft") is None:
        return "the `nft` command (Debian package nftables) is not installed: no packet loss without it"
    ns = f"llvc-cap-{os.getpid()}-probe"
    made = _run("ip", "netns", "add", ns, check=False)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    try:
        veth = _run("ip", "-n", ns, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1", check=False)
        if veth.returncode != 0:
            return f"cannot create a veth pair: {veth.stderr.strip()}"
        if need_nft:
            nft = _run("ip", "netns", "exec", ns, "nft", "add", "table", "inet", NFT_TABLE, check=False)
            if nft.returncode != 0:
                return f"nftables does not work in a namespace here: {nft.stderr.strip()}"
    finally:
        _run("ip", "netns", "del", ns, check=False)
    return None


def remove_stale() -> list[str]:
    """Delete namespaces this module made in processes that are gone (a killed test run)."""
    gone = []
    for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = NAME_RE.match(name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            _run("ip", "netns", "del", name, check=False)
            gone.append(name)
    return gone


def enter_netns(name: str) -> None:
    """Move the calling thread (only it) into network namespace ``name``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def in_netns(name: str, fn, *args, timeout: float = 30):
    """Run ``fn(*args)`` in a fresh thread inside namespace ``name``; return its result (or raise its error)."""
    out: dict = {}

    def target():
        try:
            enter_netns(name)
            out["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller
            out["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if "error" in out:
        raise out["error"]
    if t.is_alive():
        raise TimeoutError(f"{fn.__name__} in {name} did not finish within {timeout} s")
    return out.get("value")


class NetLab:
    """Two namespaces (capture host, GPU box) joined by a veth pair; removed on exit, whatever happened."""

    CAP_IF, GPU_IF = "veth-cap", "veth-gpu"

    def __init__(self):
        n = next(_lab_counter)
        pid = os.getpid()
        self.cap = f"llvc-cap-{pid}-{n}"
        self.gpu = f"llvc-gpu-{pid}-{n}"
        net = (pid * 7 + n) % 254 + 1  # a private /24 per lab (namespaces isolate them anyway)
        self.cap_ip, self.gpu_ip = f"10.200.{net}.1", f"10.200.{net}.2"
        self.relays: list[Relay] = []

    def __enter__(self) -> NetLab:
        remove_stale()
        try:
            _run("ip", "netns", "add", self.cap)
            _run("ip", "netns", "add", self.gpu)
            # Made directly inside the namespaces: no veth name ever exists in the root namespace.
            _run("ip", "link", "add", self.CAP_IF, "netns", self.cap, "type", "veth",
                 "peer", "name", self.GPU_IF, "netns", self.gpu)
            _run("ip", "-n", self.cap, "addr", "add", f"{self.cap_ip}/24", "dev", self.CAP_IF)
            _run("ip", "-n", self.gpu, "addr", "add", f"{self.gpu_ip}/24", "dev", self.GPU_IF)
            for ns, dev in ((self.cap, self.CAP_IF), (self.gpu, self.GPU_IF)):
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                _run("ip", "-n", ns, "link", "set", dev, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the relays, delete both namespaces (and so the veth pair). Idempotent."""
        for relay in self.relays:
            relay.stop()
        self.relays.clear()
        for ns in (self.cap, self.gpu):
            _run("ip", "netns", "del", ns, check=False)

    @staticmethod
    def exec_prefix(ns: str) -> list[str]:
        """Command prefix that runs a program inside ``ns``."""
        return ["ip", "netns", "exec", ns]

    def iface(self, ns: str) -> str:
        return self.CAP_IF if ns == self.cap else self.GPU_IF

    # ------------------------------------------------------------------ faults
    def loss(self, ns: str, percent: float) -> None:
        """Drop ``percent`` % of the packets arriving at ``ns`` over the veth (nftables, input hook)."""
        self.clear_loss(ns)
        rule = (f'table inet {NFT_TABLE} {{\n  chain in {{\n    type filter hook input priority 0; policy accept;\n'
                f'    iifname "{self.iface(ns)}" numgen random mod 100 < {int(percent)} counter drop\n  }}\n}}\n')
        _run(*self.exec_prefix(ns), "nft", "-f", "-", input=rule)

    def clear_loss(self, ns: str) -> None:
        _run(*self.exec_prefix(ns), "nft", "delete", "table", "inet", NFT_TABLE, check=False)

    def dropped_packets(self, ns: str) -> int:
        """Packets the loss rule in ``ns`` has dropped so far (0 without a rule)."""
        out = _run(*self.exec_prefix(ns), "nft", "list", "table", "inet", NFT_TABLE, check=False).stdout
        m = re.search(r"counter packets (\d+)", out)
        return int(m.group(1)) if m else 0

    def link_down(self) -> None:
        """Take the GPU box's end of the veth down (the capture side loses carrier)."""
        _run("ip", "-n", self.gpu, "link", "set", self.GPU_IF, "down")

    def link_up(self) -> None:
        _run("ip", "-n", self.gpu, "link", "set", self.GPU_IF, "up")

    def relay(self, listen_port: int, to: str, *, delay_ms: float, jitter_ms: float, seed: int,
              start_off: bool = False) -> Relay:
        """Start a delay/jitter relay in the capture namespace: 127.0.0.1:listen_port → ``to``."""
        relay = Relay([*self.exec_prefix(self.cap), sys.executable, "-m", "services.lab.netlab", "relay",
                       "--listen", f"127.0.0.1:{listen_port}", "--to", to, "--delay-ms", str(delay_ms),
                       "--jitter-ms", str(jitter_ms), "--seed", str(seed), *(["--start-off"] if start_off else [])])
        self.relays.append(relay)
        return relay


class Relay:
    """A running relay process (see the module docstring)."""

    def __init__(self, cmd: list[str]):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.stats: dict = {}
        self.stopped = False
        ready, _, _ = select.select([self.proc.stdout], [], [], 15)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("listening"):
            self.stop()
            raise RuntimeError(f"relay did not start: {line.strip() or 'no output in 15 s'}")

    def delay_on(self) -> None:
        self.proc.send_signal(signal.SIGUSR1)

    def delay_off(self) -> None:
        self.proc.send_signal(signal.SIGUSR2)

    def stop(self) -> dict:
        """Stop it (idempotent); returns its statistics (connections, chunks forwarded, mean hold)."""
        if self.stopped:
            return self.stats
        self.stopped = True
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate(timeout=5)
        for line in (out or "").splitlines():
            if line.startswith("{"):
                self.stats = json.loads(line)
        return self.stats


# --------------------------------------------------------------------------- the relay process
class _Direction:
    """One direction of a relayed connection: a reader that stamps release times, a writer that keeps them."""

    def __init__(self, src: socket.socket, dst: socket.socket, rng: random.Random, shared: dict, close_all):
        self.src, self.dst, self.rng, self.shared, self.close_all = src, dst, rng, shared, close_all
        self.queue: queue.Queue = queue.Queue()
        self.last_release = 0.0
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                data = self.src.recv(65536)
                if not data:
                    break
                now = time.monotonic()
                hold = 0.0
                if self.shared["on"]:
                    d, j = self.shared["delay"], self.shared["jitter"]
                    hold = max(0.0, self.rng.uniform(d - j, d + j)) / 1000
                self.last_release = max(self.last_release, now + hold)
                self.queue.put((self.last_release, data))
                with self.shared["lock"]:
                    self.shared["chunks"] += 1
                    self.shared["held_s"] += self.last_release - now
        except OSError:
            pass
        self.queue.put(None)

    def _write(self) -> None:
        try:
            while True:
                item = self.queue.get()
                if item is None:
                    self.dst.shutdown(socket.SHUT_WR)
                    return
                release, data = item
                wait = release - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self.dst.sendall(data)
        except OSError:
            self.close_all()


def _serve(client: socket.socket, target: tuple[str, int], rng: random.Random, shared: dict) -> None:
    try:
        upstream = socket.create_connection(target, timeout=2)
    except OSError:
        client.close()  # the peer retries (ZeroMQ reconnects by itself)
        return
    upstream.settimeout(None)
    for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    closed = threading.Event()

    def close_all():
        if not closed.is_set():
            closed.set()
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    _Direction(client, upstream, random.Random(rng.random()), shared, close_all)
    _Direction(upstream, client, random.Random(rng.random()), shared, close_all)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def relay_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m services.lab.netlab relay",
                                 description="TCP relay with delay and jitter")
    ap.add_argument("--listen", required=True, help="HOST:PORT to accept on")
    ap.add_argument("--to", required=True, help="HOST:PORT to forward to")
    ap.add_argument("--delay-ms", type=float, default=5.0)
    ap.add_argument("--jitter-ms", type=float, default=3.0, help="uniform in delay ± jitter")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start-off", action="store_true", help="forward without delay until SIGUSR1")
    args = ap.parse_args(argv)
    shared = {"on": not args.start_off, "delay": args.delay_ms, "jitter": args.jitter_ms,
              "lock": threading.Lock(), "chunks": 0, "held_s": 0.0, "connections": 0}
    stopping = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *a: shared.update(on=True))
    signal.signal(signal.SIGUSR2, lambda *a: shared.update(on=False))
    signal.signal(signal.SIGTERM, lambda *a: stopping.set())
    signal.signal(signal.SIGINT, lambda *a: stopping.set())
    rng = random.Random(args.seed)
    target = _address(args.to)
    server = socket.create_server(_address(args.listen))
    server.settimeout(0.2)
    print("listening", flush=True)
    while not stopping.is_set():
        try:
            client, _ = server.accept()
        except (TimeoutError, InterruptedError):
            continue
        shared["connections"] += 1
        client.settimeout(None)
        threading.Thread(target=_serve, args=(client, target, rng, shared), daemon=True).start()
    server.close()
    n = shared["chunks"]
    print(json.dumps({"connections": shared["connections"], "chunks": n,
                      "mean_hold_ms": round(shared["held_s"] / n * 1000, 3) if n else None}), flush=True)
    return 0


# --------------------------------------------------------------------------- pipelines across the link

PORTS = {"audio_in": 5550, "audio_out": 5551, "telemetry_capture": 5560, "telemetry_inference": 5561,
         "telemetry_playback": 5562, "telemetry_monitor": 5563}
RELAY_PORTS = {"audio_in": 6550, "audio_out": 6551}
AUDIO_SERVICES = ("capture", "inference", "playback")


class NetnsObserver(Observer):
    """The harness's observer, tapping telemetry from inside a network namespace (see the module docstring)."""

    def __init__(self, cfg, netns: str):
        super().__init__(cfg)
        self.netns = netns
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            enter_netns(self.netns)  # before Bus() makes the context and its I/O threads
        except OSError as exc:
            self.error = exc
            self.ready.set()
            return
        super()._run()

    def start(self) -> NetnsObserver:
        super().start()
        if self.error is not None:
            raise RuntimeError(f"observer cannot enter {self.netns}: {self.error}")
        return self


def lan_sets(lab: NetLab, keys_dir: Path, relayed: bool) -> list[str]:
    """``--set`` overrides for both hosts: inference binds on the GPU box's veth address, the capture
    host's services on its loopback; CURVE on (one keys folder serves both "hosts": one machine)."""
    sets = []
    for name, port in PORTS.items():
        host = lab.gpu_ip if name in ("audio_in", "audio_out", "telemetry_inference") else "127.0.0.1"
        if relayed and name in RELAY_PORTS:  # capture/playback reach inference through the relay
            sets += [f"endpoints.{name}.connect=tcp://127.0.0.1:{RELAY_PORTS[name]}",
                     f"endpoints.{name}.bind=tcp://{host}:{port}"]
        else:
            sets.append(f"endpoints.{name}.connect=tcp://{host}:{port}")
    # playback.target_ms as in config/lan-capture-host.toml: a LAN adds jitter.
    return [*sets, "security.curve=true", f"security.keys_dir={keys_dir}", "monitor.metrics_port=0",
            "playback.target_ms=8.0"]


class LanPipeline:
    """Inference in the GPU box, monitor/playback/capture on the capture host, CURVE on; all torn down on exit."""

    def __init__(self, tmp: Path, *, model_args: list[str] | None = None, relay: tuple[float, float] | None = None,
                 extra_sets: list[str] | None = None, seed: int = 1):
        self.tmp = Path(tmp)
        self.model_args = model_args if model_args is not None else ["--passthrough"]
        self.relay_spec = relay
        self.extra_sets = extra_sets or []
        self.seed = seed
        self.lab = NetLab()
        self.relays: list[Relay] = []
        self.gpu_run: RunningPipeline | None = None
        self.cap_run: RunningPipeline | None = None
        self.report: dict | None = None
        self.sets: list[str] = []
        self.notes: dict = {}  # what a fault wants to report (e.g. packets dropped)

    def __enter__(self) -> LanPipeline:
        self.lab.__enter__()
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        keys = self.tmp / "keys"
        _run(str(Path(sys.executable).parent / "llvc"), "keys", "init", str(keys))
        self.sets = [*lan_sets(self.lab, keys, self.relay_spec is not None), *self.extra_sets]
        if self.relay_spec is not None:
            delay, jitter = self.relay_spec
            for i, name in enumerate(RELAY_PORTS):
                self.relays.append(self.lab.relay(RELAY_PORTS[name], f"{self.lab.gpu_ip}:{PORTS[name]}",
                                                  delay_ms=delay, jitter_ms=jitter, seed=self.seed + i,
                                                  start_off=True))
        common = [*self.model_args, "--source", "tone", "--sink", "null"]
        self.gpu_run = RunningPipeline(self.tmp / "run-gpu", [*common, "--services", "inference"], self.sets,
                                       wrapper=self.lab.exec_prefix(self.lab.gpu), observe=False).start()
        self.cap_run = RunningPipeline(self.tmp / "run-cap", [*common, "--services", "monitor,playback,capture"],
                                       self.sets, wrapper=self.lab.exec_prefix(self.lab.cap), observe=False)
        from common.config import load_pipeline_config

        self.cap_run.observer = NetnsObserver(load_pipeline_config(None, env={}, overrides=self.sets), self.lab.cap)
        self.cap_run.start()

    @property
    def observer(self) -> NetnsObserver:
        return self.cap_run.observer

    def close(self) -> None:
        """Stop the capture host (its monitor writes the report), then the GPU box, then the lab."""
        try:
            if self.cap_run is not None and self.cap_run.proc is not None:
                self.report = self.cap_run.stop()
        finally:
            try:
                if self.gpu_run is not None and self.gpu_run.proc is not None:
                    self.gpu_run.stop()
            finally:
                self.lab.close()

    def __exit__(self, *exc) -> None:
        self.close()

    def pids(self) -> dict[str, int]:
        """Service → pid on both hosts (supervisord's unix sockets work across namespaces)."""
        out = {}
        for run, names in ((self.gpu_run, ("inference",)), (self.cap_run, ("monitor", "playback", "capture"))):
            pids = run.pids()
            out.update({n: pids[n] for n in names})
        return out

    def counters_at(self, t_ns: int) -> dict[str, dict]:
        """Each audio service's counters from its last heartbeat received at or before ``t_ns``."""
        out = {}
        for service in AUDIO_SERVICES:
            beats = [m for t, m in self.observer.select(Heartbeat, service) if t <= t_ns]
            out[service] = dict(beats[-1].counters) if beats else {}
        return out


# --------------------------------------------------------------------------- one fault, measured
@dataclass
class FaultResult:
    scenario: str
    before: dict
    during: dict
    after: dict
    underruns: int                # playback underruns from the fault's start to the end of the run
    drops: dict[str, int]         # dropped_* counters over the same span, by cause
    recovery_ms: float | None     # first chunk played that was captured after the fault ended, minus its end
    pids_before: dict[str, int]
    pids_after: dict[str, int]
    played_pct: float             # of the chunks captured during the fault, the share whose start was played
    notes: dict = field(default_factory=dict)

    def row(self) -> str:
        def f(x):
            return "-" if x is None else f"{x:.1f}"
        parts = [f"{self.scenario:<18}"]
        for s in (self.before, self.during, self.after):
            parts.append(f"{f(s['p50']):>6} {f(s['p99']):>7}")
        parts.append(f"{self.played_pct:>7.0f} {self.underruns:>9} {sum(self.drops.values()):>6} "
                     f"{f(self.recovery_ms):>9}")
        return " ".join(parts)


TABLE_HEAD = (f"{'':<18} {'e2e ms before':>14} {'e2e ms during':>14} {'e2e ms after':>14} {'played':>7} "
              f"{'':>9} {'':>6} {'recovery':>9}\n"
              f"{'scenario':<18} {'p50':>6} {'p99':>7} {'p50':>6} {'p99':>7} {'p50':>6} {'p99':>7} "
              f"{'during':>7} {'underruns':>9} {'drops':>6} {'ms':>9}")
CHUNK_NS = round(ModelSpec.resolve(None, None).geometry.chunk_s * 1e9)  # the default model's, chunk factor 1


def _delta(after: dict[str, dict], before: dict[str, dict], key) -> dict[str, int]:
    out = {}
    for service, counts in after.items():
        for name, value in counts.items():
            if key(name):
                out[name] = out.get(name, 0) + value - before.get(service, {}).get(name, 0)
    return out


def run_fault(lp: LanPipeline, scenario: str, apply, clear, *, before_s: float, fault_s: float, after_s: float,
              recovery_timeout: float = 30.0, settle_s: float = 1.0) -> FaultResult:
    """Play ``before_s`` clean, ``apply()`` the fault for ``fault_s``, ``clear()`` it, then measure recovery
    and ``after_s`` more. e2e windows by capture time: before = the ``before_s`` before the fault; during =
    captured while it lasted (and played at all); after = captured from ``settle_s`` after recovery on."""
    obs = lp.observer
    pids_before = lp.pids()
    t0 = time.monotonic_ns()
    time.sleep(before_s)
    t_fault = time.monotonic_ns()
    counts_fault = lp.counters_at(t_fault)
    apply()
    try:
        time.sleep(fault_s)
    finally:
        clear()
    t_end = time.monotonic_ns()
    recovery_ms = None
    try:
        good = lp.cap_run.first_good_chunk(t_end, timeout=recovery_timeout)
        recovery_ms = (good.t_ns - t_end) / 1e6
        t_after = good.t_capture_ns + int(settle_s * 1e9)
    except AssertionError:
        t_after = t_end + int(settle_s * 1e9)
    time.sleep(max(0.0, (t_after - time.monotonic_ns()) / 1e9 + after_s))
    t_stop = time.monotonic_ns()
    pids_after = lp.pids()
    time.sleep(0.6)  # one more heartbeat from everybody carries the counters up to t_stop
    counts_end = lp.counters_at(time.monotonic_ns())

    def window(lo: int, hi: int) -> list[Played]:
        return [p for p in obs.played(t0) if lo <= p.t_capture_ns < hi]

    during = window(t_fault, t_end)
    return FaultResult(
        scenario, e2e_stats(window(t0, t_fault)), e2e_stats(during), e2e_stats(window(t_after, t_stop)),
        played_pct=100.0 * len(during) * CHUNK_NS / (t_end - t_fault),
        underruns=_delta(counts_end, counts_fault, lambda n: n == "underruns").get("underruns", 0),
        drops={k: v for k, v in _delta(counts_end, counts_fault, lambda n: n.startswith("dropped_")).items() if v},
        recovery_ms=recovery_ms, pids_before=pids_before, pids_after=pids_after)


# --------------------------------------------------------------------------- the scenarios
def scenarios(fault_s: float) -> dict[str, dict]:
    """name → how to make the fault on a :class:`LanPipeline` (``apply``/``clear`` take it), and its options."""
    def loss(percent):
        def apply(lp):
            for ns in (lp.lab.cap, lp.lab.gpu):  # both directions lose ``percent`` %
                lp.lab.loss(ns, percent)

        def clear(lp):
            lp.notes["packets_dropped"] = sum(lp.lab.dropped_packets(ns) for ns in (lp.lab.cap, lp.lab.gpu))
            for ns in (lp.lab.cap, lp.lab.gpu):
                lp.lab.clear_loss(ns)
        return {"apply": apply, "clear": clear, "fault_s": fault_s}

    return {
        "no fault": {"apply": lambda lp: None, "clear": lambda lp: None, "fault_s": fault_s},
        "loss 5%": loss(5),
        "loss 20%": loss(20),
        **{f"link down {d:g} s": {"apply": lambda lp: lp.lab.link_down(), "clear": lambda lp: lp.lab.link_up(),
                                  "fault_s": d} for d in sorted({2.0, fault_s})},
        "relay 5±3 ms": {"apply": lambda lp: [r.delay_on() for r in lp.relays],
                         "clear": lambda lp: [r.delay_off() for r in lp.relays], "fault_s": fault_s,
                         "relay": (5.0, 3.0)},
    }


def run_scenario(tmp: Path, name: str, spec: dict, *, warmup_s: float, before_s: float,
                 after_s: float) -> tuple[FaultResult, dict | None]:
    """A fresh two-host pipeline, one fault measured; returns the result and the monitor's report."""
    with LanPipeline(tmp, relay=spec.get("relay")) as lp:
        lp.cap_run.wait_streaming(warmup_s)
        result = run_fault(lp, name, lambda: spec["apply"](lp), lambda: spec["clear"](lp),
                           before_s=before_s, fault_s=spec["fault_s"], after_s=after_s)
    result.notes.update(lp.notes)
    if lp.relays:
        result.notes["relays"] = [r.stats for r in lp.relays]  # stopped by now: their statistics
    return result, lp.report


def main(argv: list[str]) -> int:
    if argv and argv[0] == "relay":
        return relay_main(argv[1:])
    print("usage: python -m services.lab.netlab relay --listen HOST:PORT --to HOST:PORT [--delay-ms 5 --jitter-ms 3]",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
