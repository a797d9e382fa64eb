"""A real MLflow tracking server on loopback (SQLite store, served artifacts), as the README's cluster
section starts one, behind a gate the tests close and open: closed, it refuses connections and drops
the open ones, which is what a client sees of a stopped server."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_below_the_ephemeral_range() -> int:
    """A free loopback port for a listener that closes and opens again on it. A port from the
    ephemeral range may meanwhile become the local end of any process's outgoing connection (in CI a
    Ray process took the gate's port during an outage); below the range only explicit binds take
    ports, and above 20000 Ray's worker ports (10002-19999) do not."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = list(range(20000, low))
    random.Random().shuffle(candidates)  # unseeded: parallel test workers must not try the same ports
    for port in candidates[:200]:
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            return port
    return free_port()  # no such range on this machine: the old risk, rarely met


@contextlib.contextmanager
def mlflow_server(folder: Path):
    """`mlflow server` on a free loopback port; yields its URL once /health answers."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{folder / 'mlflow.db'}"
    # the schema made here: the server's processes racing to migrate a new database can fail or hang
    MlflowClient(store).search_experiments()
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
               "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    with open(folder / "server.log", "w") as log:
        # its own process group, killed whole at the end (in a new session instead, it took 60 s to answer);
        # without MLflow's job executor (GenAI jobs), unused here
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, process_group=0, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (folder / "server.log").read_text()[-3000:]
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            assert time.monotonic() < deadline, "mlflow server did not answer within 120 s"
            time.sleep(0.2)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


class Gate:
    """A TCP relay from its own loopback port to `target`'s; `close()` stops it as a stopped server
    would be stopped (new connections refused, open ones dropped), `open()` starts it again."""

    def __init__(self, target: str):
        self.target_port = int(target.rsplit(":", 1)[1])
        self.port = port_below_the_ephemeral_range()
        self.url = f"http://127.0.0.1:{self.port}"
        self.listener: socket.socket | None = None
        self.connections: list[socket.socket] = []
        self.lock = threading.Lock()
        self.open()

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        with self.lock:
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
            self.listener.close()
            for connection in self.connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
                connection.close()
            self.connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
