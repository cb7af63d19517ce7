"""A real multi-node Ray cluster on this machine, on loopback only, started and stopped by the test.

Each node is a ``ray start --block`` process: the head on 127.0.0.2 (``--head --port``), node
``i`` on 127.0.0.``i+2`` (``--address``), all of them loopback addresses, as separate machines
would be. (Ray swaps 127.0.0.1 itself for the machine's outward address, so it is not used.)
Every process runs with token authentication (``RAY_AUTH_MODE=token``), as ``ray start`` does
by default. The test ends exactly the processes it started, by their ids, and kills one node's
raylet to make that node die mid-sweep; ``ray stop`` is not used: it stops every Ray process of
the machine, the test's or not.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
HEAD_IP = "127.0.0.2"
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "OMP_NUM_THREADS": "1"}
ENV.pop("RAY_ADDRESS", None)


def free_port(host: str = HEAD_IP) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LocalCluster:
    """``num_nodes`` Ray nodes of ``cpus_per_node`` CPUs on loopback; ``address`` joins them
    (with :data:`ENV` in the driver's environment)."""

    def __init__(self, num_nodes: int = 2, cpus_per_node: int = 1) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="vr", dir="/tmp")  # short: Ray's socket paths are length-limited
        self.port = free_port()
        self.address = f"{HEAD_IP}:{self.port}"
        self.nodes: list[subprocess.Popen] = []
        self.logs = []
        common = [f"--num-cpus={cpus_per_node}", "--block", "--disable-usage-stats"]
        try:
            self._start(
                [
                    RAY,
                    "start",
                    "--head",
                    f"--node-ip-address={HEAD_IP}",
                    f"--port={self.port}",
                    f"--temp-dir={self.temp_dir}",
                    "--include-dashboard=false",
                    *common,
                ]
            )
            self.wait_for_nodes(1)
            for index in range(1, num_nodes):
                self._start(
                    [RAY, "start", f"--address={self.address}", f"--node-ip-address=127.0.0.{index + 2}", *common]
                )
            self.wait_for_nodes(num_nodes)
        except BaseException:
            self.stop(keep_logs=True)
            raise

    def _start(self, command) -> None:
        log = open(os.path.join(self.temp_dir, f"node{len(self.nodes)}.log"), "w")
        self.logs.append(log)
        self.nodes.append(
            subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
        )

    def alive_nodes(self) -> list[str]:
        """Addresses of the nodes the cluster reports alive."""
        script = (
            f"import ray; ray.init(address='{self.address}', logging_level='ERROR'); "
            "print(' '.join(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))"
        )
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=120)
        lines = done.stdout.strip().splitlines()
        return lines[-1].split() if done.returncode == 0 and lines else []

    def wait_for_nodes(self, count: int, timeout: float = 150) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.alive_nodes()) >= count:
                return
            time.sleep(2)
        raise TimeoutError(f"Ray cluster: expected {count} nodes alive after {timeout} s; logs in {self.temp_dir}")

    def kill_node(self, index: int) -> None:
        """Kill node ``index``'s raylet (SIGKILL), as a machine that dies would: its workers go with it."""
        node = psutil.Process(self.nodes[index].pid)
        raylets = [p for p in node.children(recursive=True) if p.name() == "raylet"]
        assert raylets, f"node {index} has no raylet process"
        for raylet in raylets:
            raylet.kill()

    def stop(self, keep_logs: bool = False) -> None:
        """End every process this cluster started (each node's process tree), by id, and
        remove its temporary folder (``keep_logs``: leave it, to read why a start failed)."""
        for node in reversed(self.nodes):
            try:
                tree = psutil.Process(node.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                tree = []
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)  # ray start --block stops its own processes on SIGTERM
                try:
                    node.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    node.kill()
            for process in tree:
                try:
                    process.kill()
                except psutil.NoSuchProcess:
                    pass
        for log in self.logs:
            log.close()
        if not keep_logs:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
