"""Ray Serve against one Gradio app process: the same classification load on loopback, both reported.

    python benchmarks/serve_load.py                       # 2 replicas vs app.py, 32 clients x 4 calls
    python benchmarks/serve_load.py --replicas 2 --clients 32 --calls-each 8 --max-batch-size 8
    python benchmarks/serve_load.py --skip-gradio         # Ray Serve alone

One server at a time, each on a free loopback port, offline, the same model (default: the bundled one):
1. `python -m effnetv2.serve`'s application (`effnetv2.serve.serving`): `--replicas` replicas of one CPU
   each, in a Ray instance of its own (temp folder under /tmp, free GCS port); clients POST the file;
2. `python app.py` (`tests/app_server.running_app`), one process; clients call /classify through
   gradio_client (upload, queue, answer), as its API users do.
Each server is warmed up (one call per image), then `--clients` users start together, each making
`--calls-each` calls over the example images. A call that fails, or whose top label differs from the
Predictor's in this process, is an error. Prints requests, errors, p50 / p95 latency and requests/s.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # app.py and tests/app_server.py are scripts, not in the package
from app_server import free_port, percentile, running_app  # noqa: E402
from effnetv2.inference import Predictor  # noqa: E402
from effnetv2.ray_cluster import require_token_auth  # noqa: E402
from effnetv2.serve import build_app, serving  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

MODEL = str(ROOT / "assets" / "model")
IMAGES = sorted(str(p) for p in (ROOT / "assets" / "examples").glob("*.png"))

Classify = Callable[[str], str]  # an image path → the top label the server gave


def run_load(make_user: Callable[[int], Classify], expected: dict[str, str], clients: int, calls_each: int,
             timeout: float) -> tuple[list[float], list[str], float]:
    """``clients`` users (threads, each its own ``make_user(i)`` connection, made before the clock starts)
    each classifying ``calls_each`` images at once. Returns the seconds of every successful call, the
    errors, and the wall time from the start to the last answer."""
    start_line = threading.Barrier(clients + 1)
    times, errors, lock = [], [], threading.Lock()

    def user(i: int) -> None:
        classify = make_user(i)
        start_line.wait()
        for j in range(calls_each):
            image = IMAGES[(i * calls_each + j) % len(IMAGES)]
            begin = time.perf_counter()
            try:
                label = classify(image)
                error = None if label == expected[image] else f"{Path(image).name}: {label}, not {expected[image]}"
            except Exception as err:  # noqa: BLE001 -- every failure is counted, whatever its type
                error = f"{Path(image).name}: {type(err).__name__}: {err}"
            seconds = time.perf_counter() - begin
            with lock:
                if error:
                    errors.append(error)
                else:
                    times.append(seconds)

    pool = ThreadPoolExecutor(clients)
    futures = [pool.submit(user, i) for i in range(clients)]
    start_line.wait(timeout=120)
    begin = time.perf_counter()
    _, not_done = wait(futures, timeout=timeout)
    wall = time.perf_counter() - begin
    pool.shutdown(wait=not not_done, cancel_futures=True)  # stuck calls end when the server is stopped
    for future in futures:
        if future.done() and future.exception():
            errors.append(f"client failed: {future.exception()}")
    if not_done:
        errors.append(f"{len(not_done)} of {clients} clients did not finish within {timeout:.0f}s")
    return times, errors, wall


def report(name: str, times: list[float], errors: list[str], wall: float) -> None:
    requests_made = len(times) + len(errors)
    p50, p95 = (f"{percentile(times, q) * 1e3:7.0f}" for q in (50, 95)) if times else ("      -",) * 2
    print(f"  {name:<32} {requests_made:5d} requests  {len(errors):3d} errors  p50 {p50} ms  p95 {p95} ms  "
          f"{len(times) / wall:6.1f} req/s")
    for error in errors[:5]:
        print(f"    error: {error}")


def serve_user(url: str, batch_sizes: list[int]) -> Callable[[int], Classify]:
    """Users that POST the file to Serve's /classify; each answer's batch size goes to ``batch_sizes``."""
    def make_user(_: int) -> Classify:
        session = requests.Session()

        def classify(image: str) -> str:
            answer = session.post(url + "classify", data=Path(image).read_bytes(), timeout=120)
            answer.raise_for_status()
            batch_sizes.append(answer.json()["batch_size"])
            return answer.json()["predictions"][0]["label"]
        return classify
    return make_user


def gradio_user(url: str, downloads: Path) -> Callable[[int], Classify]:
    """Users that upload the file to the app's /classify through gradio_client."""
    def make_user(i: int) -> Classify:
        client = Client(url, verbose=False, download_files=str(downloads / f"user{i}"))
        return lambda image: client.predict(handle_file(image), api_name="/classify")["label"]
    return make_user


def measure(name: str, make_user: Callable[[int], Classify], expected: dict[str, str], args) -> None:
    warm = make_user(-1)
    for image in IMAGES:
        warm(image)
    report(name, *run_load(make_user, expected, args.clients, args.calls_each, args.timeout))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MODEL, help="what both servers serve (default: the bundled model)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=32, help="users at once")
    parser.add_argument("--calls-each", type=int, default=4, help="calls per user")
    parser.add_argument("--timeout", type=float, default=300.0, help="longest a load run may take (s)")
    parser.add_argument("--skip-gradio", action="store_true")
    args = parser.parse_args(argv)

    predictor = Predictor(args.model)
    expected = {image: top[0][0] for image, top in zip(IMAGES, predictor.predict(IMAGES, top_k=1))}
    print(f"{args.model}: {len(IMAGES)} example images, {os.cpu_count()} CPUs; {args.clients} clients x "
          f"{args.calls_each} calls each; latency per call, throughput over the whole run")
    temp_dir = tempfile.mkdtemp(dir="/tmp", prefix="ray-")  # Ray's socket paths must stay under 108 characters
    os.environ["RAY_GCS_SERVER_PORT"] = str(free_port())  # never 6379: another Ray may run on this machine
    require_token_auth()  # before build_app imports ray: serving's own Ray needs it
    app = build_app(args.model, replicas=args.replicas, max_batch_size=args.max_batch_size,
                    batch_wait_timeout_s=args.batch_wait_ms / 1000)
    try:
        with serving(app, port=free_port(), num_cpus=max(os.cpu_count() or 1, args.replicas), include_dashboard=False,
                     object_store_memory=80 * 1024 * 1024, _temp_dir=temp_dir,
                     log_to_driver=False) as url:
            batch_sizes: list[int] = []
            measure(f"Ray Serve, {args.replicas} replicas, batch <= {args.max_batch_size}",
                    serve_user(url, batch_sizes), expected, args)
            under_load = batch_sizes[len(IMAGES):]  # after the warm-up calls
            print(f"    requests were served in batches of {sum(under_load) / len(under_load):.1f} on average "
                  f"(largest {max(under_load)})")
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    if not args.skip_gradio:
        with tempfile.TemporaryDirectory() as tmp, running_app(Path(tmp) / "app.log", "--model", args.model) as url:
            measure("Gradio app.py, one process", gradio_user(url, Path(tmp)), expected, args)


if __name__ == "__main__":
    main()
