"""Start ``python app.py`` in a subprocess on a free loopback port, and put it under load through
``gradio_client``: for the end-to-end app tests and ``benchmarks/app_latency.py``."""
from __future__ import annotations

import itertools
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradio_client import Client, handle_file

APP = Path(__file__).resolve().parents[1] / "app.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_app(log_path: Path, *args: str, timeout: float = 120.0, env: dict[str, str] | None = None):
    """Run the app (bundled model unless ``--model`` is in ``args``) offline, with ``env`` added to its
    environment; yield its URL. Its temporary files (Gradio's cache, the served pictures) go to the folder
    of ``log_path``."""
    port = free_port()
    app_env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
               "TMPDIR": str(log_path.parent)}
    app_env.pop("EFFNETV2_MODEL", None)
    app_env.pop("GRADIO_TEMP_DIR", None)
    app_env.update(env or {})
    url = f"http://127.0.0.1:{port}/"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(APP), "--port", str(port), *args], env=app_env,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"app.py exited with {proc.returncode}:\n{log_path.read_text()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"app.py did not answer within {timeout}s:\n{log_path.read_text()}")
                try:
                    with urllib.request.urlopen(url + "config", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    time.sleep(0.3)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class Call:
    """One request of :func:`mixed_load`: what was asked, how long it took, and its result or error."""
    api_name: str
    image: str
    seconds: float
    result: Any = None
    error: str | None = None


def mixed_load(url: str, images: list[str], clients: int, calls_each: int, download_dir: Path,
               timeout: float = 300.0) -> list[Call]:
    """``clients`` gradio_client users at once (threads), each making ``calls_each`` calls that
    alternate /classify and /attention over ``images`` (files are downloaded, as a user's would be).
    Every call is returned; a failed one carries its error instead of raising."""
    def one_user(user: int) -> list[Call]:
        # httpx's default 5 s timeout on the upload and queue-join posts would count a slow, loaded
        # machine as a failure; this test is about broken responses, so the client waits.
        client = Client(url, verbose=False, download_files=str(download_dir / f"user{user}"),
                        httpx_kwargs={"timeout": 120.0})
        calls = []
        for i in range(calls_each):
            api_name = ("/classify", "/attention")[(user + i) % 2]
            image = images[(user * calls_each + i) % len(images)]
            args = (handle_file(image),) if api_name == "/classify" else (handle_file(image), "pooled", 0, 0)
            start = time.perf_counter()
            try:
                result, error = client.predict(*args, api_name=api_name), None
            except Exception as err:  # noqa: BLE001 -- every failure is counted, whatever its type
                result, error = None, f"{type(err).__name__}: {err}"
            calls.append(Call(api_name, image, time.perf_counter() - start, result, error))
        return calls

    pool = ThreadPoolExecutor(clients)
    futures = [pool.submit(one_user, user) for user in range(clients)]
    _, not_done = wait(futures, timeout=timeout)
    pool.shutdown(wait=not not_done, cancel_futures=True)  # stuck calls end when the server is stopped
    if not_done:
        raise TimeoutError(f"{len(not_done)} of {clients} clients did not finish within {timeout:.0f}s")
    return list(itertools.chain.from_iterable(future.result() for future in futures))


def percentile(values: list[float], q: int) -> float:
    """The ``q``-th percentile (inclusive method, as numpy's default)."""
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]
