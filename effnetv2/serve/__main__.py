"""``python -m effnetv2.serve``: the command line of :mod:`effnetv2.serve` (usage in its docstring)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from effnetv2 import serve as serving_module
from effnetv2.inference import BACKENDS
from effnetv2.ray_cluster import require_token_auth, starts_ray
from effnetv2.serve import BODY_TIMEOUT_S, MIN_BODY_RATE, build_app, serving
from effnetv2.sources import load_model, parse_source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effnetv2.serve", description=serving_module.__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="folder, Hub id org/name[@revision], or torchvision:<variant>")
    parser.add_argument("--replicas", type=int, default=1, help="replicas (the minimum when autoscaling)")
    parser.add_argument("--max-replicas", type=int, default=None,
                        help="autoscale between --replicas and this many (default: a fixed --replicas)")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs, and model threads, per replica")
    parser.add_argument("--max-batch-size", type=int, default=8, help="images in one forward at most")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0, help="longest wait for a batch to fill")
    parser.add_argument("--top-k", type=int, default=5, help="labels returned when a request does not say")
    parser.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT_S,
                        help=f"seconds a request body has to arrive, plus 1 per {MIN_BODY_RATE // 1024} KiB received")
    parser.add_argument("--backend", default="auto", choices=("auto",) + BACKENDS)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: your network)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--address", default=None,
                        help="a running Ray cluster (e.g. auto, or HOST:6379); default: start one on this machine")
    args = parser.parse_args(argv)
    for flag in ("replicas", "max_batch_size", "top_k"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.max_replicas is not None and args.max_replicas < args.replicas:
        parser.error(f"--max-replicas {args.max_replicas} is below --replicas {args.replicas}")
    if args.batch_wait_ms < 0 or args.cpus_per_replica <= 0 or args.body_timeout <= 0:
        parser.error("--batch-wait-ms must be 0 or more, --cpus-per-replica and --body-timeout more than 0")
    try:
        source = parse_source(args.model)
        if source.path is not None:  # replicas run in other processes, maybe in another folder
            source = dataclasses.replace(source, path=source.path.resolve())
        load_model(source)  # a wrong source is said here in one line, not as every replica's traceback
    except (ValueError, OSError) as err:
        print(f"error: --model {args.model}: {err}", file=sys.stderr)
        return 2

    if starts_ray(args.address):
        try:
            require_token_auth()  # before build_app imports ray
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    app = build_app(source, replicas=args.replicas, max_replicas=args.max_replicas, max_batch_size=args.max_batch_size,
                    batch_wait_timeout_s=args.batch_wait_ms / 1000, top_k=args.top_k, backend=args.backend,
                    cpus_per_replica=args.cpus_per_replica, body_timeout_s=args.body_timeout)
    with serving(app, host=args.host, port=args.port, address=args.address) as url:
        print(f"serving {args.model} at {url}classify (GET {url}health); Ctrl-C stops", file=sys.stderr)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
