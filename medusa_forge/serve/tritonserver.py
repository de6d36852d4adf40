"""Start, wait for and stop a real ``tritonserver`` (found by :mod:`medusa_forge.serve.triton_install`).

Servers are started in their own session so that only we signal them (a terminal's Ctrl-C reaches
us, and we forward it once), with a parent-death signal so a crashed parent leaves no orphan, and
with a Python-backend shared-memory prefix of their own so several servers can share a machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from medusa_forge.errors import ForgeError
from medusa_forge.serve.triton_install import TritonInstall, find_tritonserver

READY_TIMEOUT_S = 300.0
_PORT_RETRIES = 3
_serial = itertools.count()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class ServerConfig:
    repo: Path
    host: str = "0.0.0.0"  # tritonserver's own default; tests and the load test use 127.0.0.1
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    world_size: int = 1  # > 1: one tritonserver per rank under mpirun (scripts/launch_triton_server.py)
    log_verbose: int = 0
    exit_on_error: bool = True  # False: start even when a model fails to load (it stays UNAVAILABLE)
    exit_timeout_s: int = 30  # on SIGINT/SIGTERM: wait this long for in-flight requests, then exit anyway
    trtllm_models: tuple[str, ...] = ("tensorrt_llm",)  # what ranks > 0 load
    extra_args: tuple[str, ...] = ()

    @property
    def client_host(self) -> str:
        return "127.0.0.1" if self.host == "0.0.0.0" else self.host

    @property
    def grpc_url(self) -> str:
        return f"{self.client_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.client_host}:{self.http_port}"


def server_command(install: TritonInstall, cfg: ServerConfig, shm_prefix: str = "mf") -> list[str]:
    """tritonserver's argv; for world_size > 1 the mpirun line of tensorrtllm_backend v0.11.0's
    scripts/launch_triton_server.py (rank 0 loads every model, other ranks only the TensorRT-LLM ones)."""

    def rank_args(rank: int) -> list[str]:
        args = [str(install.binary), f"--model-repository={Path(cfg.repo).absolute()}"]
        if install.backend_dir is not None:
            args.append(f"--backend-directory={install.backend_dir}")
        if rank > 0:
            args += ["--model-control-mode=explicit", *(f"--load-model={m}" for m in cfg.trtllm_models)]
        args += [
            f"--grpc-port={cfg.grpc_port}",
            f"--http-port={cfg.http_port}",
            f"--metrics-port={cfg.metrics_port}",
            f"--grpc-address={cfg.host}",
            f"--http-address={cfg.host}",
            f"--metrics-address={cfg.host}",
            f"--exit-on-error={'true' if cfg.exit_on_error else 'false'}",
            f"--exit-timeout-secs={cfg.exit_timeout_s}",
        ]
        if cfg.log_verbose:
            args.append(f"--log-verbose={cfg.log_verbose}")
        # Our configs are complete; auto-completion would start (and import torch in) a throw-away stub.
        args.append("--disable-auto-complete-config")
        args.append(f"--backend-config=python,shm-region-prefix-name={shm_prefix}r{rank}_")
        return args + list(cfg.extra_args)

    if cfg.world_size <= 1:
        return rank_args(0)
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise ForgeError(f"world size {cfg.world_size} needs mpirun (one tritonserver per rank); it is not on PATH")
    cmd = [mpirun, "--allow-run-as-root"]
    for rank in range(cfg.world_size):
        cmd += ["-n", "1", *rank_args(rank), ":"]
    return cmd[:-1]


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM the server if the process that started it dies (Linux prctl)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class TritonServer:
    """A real tritonserver on a model repository; as a context manager: started, ready, then stopped.

    ``TritonServer(repo)`` binds 127.0.0.1 on three free ports (any port left at 0 is picked free; a
    lost race for one is retried with new ports). ``.grpc_url`` is what clients connect to. Output
    goes to ``log_path`` (default: a new file in the temp dir) unless ``console`` is set; errors
    quote its last error line. ``models``: wait for these to be READY instead of the whole server
    (with ``exit_on_error=False`` a model that failed to load leaves the server up but not ready).
    """

    def __init__(
        self,
        repo: str | Path,
        *,
        grpc_port: int = 0,
        http_port: int = 0,
        metrics_port: int = 0,
        host: str = "127.0.0.1",
        world_size: int | None = None,
        log_path: str | Path | None = None,
        console: bool = False,
        log_verbose: int = 0,
        exit_on_error: bool = True,
        exit_timeout_s: int = 30,
        models: Sequence[str] | None = None,
        ready_timeout: float = READY_TIMEOUT_S,
        extra_args: Sequence[str] = (),
        install: TritonInstall | None = None,
    ):
        from medusa_forge.serve.triton_repo import RepoInfo

        repo = Path(repo).absolute()
        if not repo.is_dir():
            raise ForgeError(f"model repository {repo} does not exist; run `medusa-forge triton-repo` first")
        info = RepoInfo.load(repo)
        self.info = info
        self.requested_ports = (grpc_port, http_port, metrics_port)
        self.cfg = ServerConfig(
            repo,
            host,
            grpc_port,
            http_port,
            metrics_port,
            world_size or (info.world_size if info else 1),
            log_verbose,
            exit_on_error,
            exit_timeout_s,
            tuple(info.trtllm_llm_models()) if info and info.trtllm_llm_models() else ("tensorrt_llm",),
            tuple(extra_args),
        )
        self.install = install or find_tritonserver()
        self.console = console
        self.log_path = Path(log_path) if log_path else None
        self.models = tuple(models or ())
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None
        self._log: IO | None = None

    # ----------------------------------------------------------------- addresses
    @property
    def grpc_url(self) -> str:
        return self.cfg.grpc_url

    @property
    def http_url(self) -> str:
        return self.cfg.http_url

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> TritonServer:
        if self.proc is not None and self.proc.poll() is None:
            raise ForgeError("this tritonserver is already running")
        self._pick_ports()
        out = None
        if not self.console:
            if self.log_path is None:
                fd, name = tempfile.mkstemp(prefix=f"tritonserver-{os.getpid()}-", suffix=".log")
                os.close(fd)
                self.log_path = Path(name)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = out = open(self.log_path, "ab")
        prefix = f"mf{os.getpid()}x{next(_serial)}"
        # In the repository: TensorRT-LLM repositories hold paths relative to it (relocatable).
        self.proc = subprocess.Popen(
            server_command(self.install, self.cfg, prefix),
            env=self.install.environ(),
            cwd=Path(self.cfg.repo).absolute(),
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        return self

    def _pick_ports(self) -> None:
        grpc, http, metrics = self.requested_ports
        taken: set[int] = set()

        def pick(port: int) -> int:
            while not port or port in taken:
                port = free_port("127.0.0.1" if self.cfg.host in ("0.0.0.0", "127.0.0.1") else self.cfg.host)
            taken.add(port)
            return port

        self.cfg.grpc_port, self.cfg.http_port, self.cfg.metrics_port = pick(grpc), pick(http), pick(metrics)

    @property
    def auto_ports(self) -> bool:
        return not any(self.requested_ports)

    def is_ready(self) -> bool:
        """Server ready (every model READY), or the ``models`` given at construction READY."""
        paths = [f"/v2/models/{m}/ready" for m in self.models] or ["/v2/health/ready"]
        return all(_http_ok(f"{self.http_url}{p}") for p in paths)

    def is_live(self) -> bool:
        return _http_ok(f"{self.http_url}/v2/health/live")

    def wait_ready(self, timeout: float | None = None, ready: Callable[[], bool] | None = None) -> None:
        """Block until ready; a server that exits or stays unready raises ForgeError (and is stopped)."""
        timeout = self.ready_timeout if timeout is None else timeout
        ready = ready or self.is_ready
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive("before becoming ready")
            if ready():
                return
            time.sleep(0.1)
        self.stop()
        raise ForgeError(f"tritonserver was not ready within {timeout:.0f} s{self._log_hint()}")

    def check_alive(self, when: str = "") -> None:
        """Raise a ForgeError naming the exit status and the log's last error if the server has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            code = self.proc.returncode
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            raise ForgeError(f"tritonserver {how}{' ' + when if when else ''}{self._log_hint()}")

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return self.log_path.read_text(errors="replace")

    def _log_hint(self) -> str:
        if self.log_path is None:
            return " (see its output above)"
        errors = [ln for ln in self.log_text().splitlines() if ln.startswith(("E", "error:"))]
        return f": {errors[-1][:400]} (log: {self.log_path})" if errors else f" (log: {self.log_path})"

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGINT (Triton drains in-flight requests, then unloads), SIGKILL if it has not exited
        ``timeout`` s later (default: its own exit timeout plus 10 s)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.signal(signal.SIGINT)
            try:
                self.proc.wait(self.cfg.exit_timeout_s + 10 if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait()
        self._kill_leftovers()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, no draining: what a crash looks like to clients."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def _kill_leftovers(self) -> None:
        """SIGKILL what is left of the server's process group (its own session): the Python-backend
        stubs of a server that was killed outlive it, orphaned, unless someone ends them."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def __enter__(self) -> TritonServer:
        for attempt in range(_PORT_RETRIES if self.auto_ports else 1):
            self.start()
            try:
                self.wait_ready()
                return self
            except ForgeError:
                self.stop()
                lost_port_race = "already in use" in self.log_text() or "Failed to listen" in self.log_text()
                if not (self.auto_ports and lost_port_race) or attempt == _PORT_RETRIES - 1:
                    raise
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def __exit__(self, *exc) -> None:
        self.stop()


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def serve_foreground(server: TritonServer, echo: Callable[[str], None] = print) -> int:
    """Run until tritonserver exits, forwarding SIGINT/SIGTERM/SIGHUP to it; returns its exit status
    (negative: killed by that signal)."""
    forwarded: list[int] = []

    def forward(signum, _frame):
        forwarded.append(signum)
        server.signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        server.start()
        deadline = time.monotonic() + server.ready_timeout
        while not server.is_ready():
            if server.proc.poll() is not None:
                return server.proc.returncode
            if time.monotonic() > deadline:
                echo(f"tritonserver not ready after {server.ready_timeout:.0f} s; stopping it")
                server.stop()
                return 1
            time.sleep(0.1)
        if not forwarded:
            echo(f"ready: gRPC {server.grpc_url}, HTTP {server.http_url}, metrics :{server.cfg.metrics_port}")
        return server.proc.wait()  # PEP 475: signal handlers run, the wait resumes
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if server.proc is not None and server.proc.poll() is None:
            server.stop()
