"""Where a sweep's tasks run: Ray (a local cluster or one joined by address), or this process.

An executor takes ``submit(key, function, args, name)`` and hands back finished tasks from
``wait()`` as ``(key, value, error)``: ``error`` is ``None`` or the exception's text once the
retries (Ray: of a task whose worker or node died) are spent.
"""

from __future__ import annotations

import os
import traceback
from typing import Any, Callable, Optional

__all__ = ["RayExecutor", "SerialExecutor"]


class SerialExecutor:
    """Runs each task in this process, one after another, when ``wait()`` asks for it."""

    def __init__(self) -> None:
        self._queue: list[tuple[Any, Callable, tuple]] = []

    @property
    def num_running(self) -> int:
        return min(len(self._queue), 1)

    def put(self, value: Any) -> Any:
        return value

    def submit(self, key: Any, function: Callable, args: tuple, name: str = "", num_cpus: int = 1) -> None:
        self._queue.append((key, function, args))

    def wait(self) -> list[tuple[Any, Any, Optional[str]]]:
        key, function, args = self._queue.pop(0)
        try:
            return [(key, function(*args), None)]
        except Exception as error:  # recorded in the store with its traceback, as Ray records a failed task
            return [(key, None, f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=8)}")]

    def close(self) -> None:
        self._queue.clear()


class RayExecutor:
    """Runs each task as a Ray task that declares ``num_cpus`` CPUs.

    Args:
        address: a running cluster (``"127.0.0.1:6379"``, ``"auto"``); ``None`` joins
            ``$RAY_ADDRESS`` if set, else starts a local cluster that ends with the sweep.
        max_retries: reruns of a task whose worker process or node died. Exceptions raised by a
            task are not retried: given its seed a task is deterministic and would fail again.
        num_cpus: CPUs of a local cluster (``None``: all of this machine's).
    """

    def __init__(self, address: Optional[str] = None, max_retries: int = 2, num_cpus: Optional[int] = None) -> None:
        import ray

        self._ray = ray
        self._max_retries = max_retries
        self._pending: dict[Any, Any] = {}
        self._remotes: dict[Callable, Any] = {}
        self._owns = not ray.is_initialized()
        self._dashboard = None
        if self._owns:
            # Workers import user models (module:attr) the way the driver does, from its path.
            path = os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH", "")] if p)
            context = ray.init(
                address=address,
                num_cpus=num_cpus if address is None and not os.environ.get("RAY_ADDRESS") else None,
                runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}},
                logging_level="WARNING",
                configure_logging=True,
            )
            self._dashboard = getattr(context, "dashboard_url", None) or None  # none without ray[default]

    @property
    def num_running(self) -> int:
        return len(self._pending)

    @property
    def dashboard_url(self) -> Optional[str]:
        """``host:port`` of Ray's dashboard, where one runs."""
        return self._dashboard

    def put(self, value: Any) -> Any:
        return self._ray.put(value)

    def submit(self, key: Any, function: Callable, args: tuple, name: str = "", num_cpus: int = 1) -> None:
        if function not in self._remotes:
            self._remotes[function] = self._ray.remote(function)
        options = {"num_cpus": num_cpus, "max_retries": self._max_retries, "retry_exceptions": False}
        if name:
            options["name"] = name  # what the dashboard's task table shows
        self._pending[self._remotes[function].options(**options).remote(*args)] = key

    def wait(self) -> list[tuple[Any, Any, Optional[str]]]:
        ready, _ = self._ray.wait(list(self._pending), num_returns=1)
        finished = []
        for ref in ready:
            key = self._pending.pop(ref)
            try:
                finished.append((key, self._ray.get(ref), None))
            except self._ray.exceptions.RayError as error:
                finished.append((key, None, f"{type(error).__name__}: {error}"))
        return finished

    def close(self) -> None:
        for ref in self._pending:
            self._ray.cancel(ref, force=True)
        self._pending.clear()
        if self._owns:
            self._ray.shutdown()
