"""The app's latency: each endpoint through gradio_client against the model alone, then under load.

    python benchmarks/app_latency.py                          # bundled model, star.png, 20 calls each
    python benchmarks/app_latency.py --repeats 50 --clients 24 --calls-each 4
    python benchmarks/app_latency.py --model ./my-model --image assets/examples/photo_cat.jpg --clients 0
    python benchmarks/app_latency.py --stand-in s --only-answer --repeats 10   # ImageNet S@384, random weights

Starts `python app.py` on a free loopback port (offline), then prints p50 / p95 of:
1. /answer (the page's one step: the labels, the explanation picture, the sentence; the picture
   downloaded), then /classify, /attention and /explain, called one at a time through gradio_client
   (upload, queue, handler, answer, pictures downloaded);
2. the same work without the server: the one step's parts (decode and the backbone forward; the head's
   attribution, Grad-CAM and four deletion curves; drawing the picture; its PNG), the eager forward, the
   Predictor's forward (the app's runtime), `app.attention_parts` and `app.explain_parts` on the same image;
3. `--clients` users at once, each making `--calls-each` calls alternating /classify and /attention
   over the example images (the test suite's mixed load), with the throughput and the error count.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # app.py and tests/app_server.py are scripts, not in the package
import app  # noqa: E402
from app_server import mixed_load, percentile, running_app  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

from effnetv2 import EfficientNetV2  # noqa: E402
from effnetv2.loading import load  # noqa: E402
from effnetv2 import explain as why  # noqa: E402


def timings(run: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``run``, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def report(name: str, times: list[float]) -> None:
    print(f"  {name:<44} p50 {percentile(times, 50) * 1e3:8.1f} ms   p95 {percentile(times, 95) * 1e3:8.1f} ms")


def report_answer_parts(predictor, path: str, repeats: int) -> None:
    """The one step's parts in-process, in order: where its time goes."""
    image = Image.open(path)  # in-process, a picture: the app opens only uploads and its examples
    seen = app.look(predictor, image)
    parts = {"decode + preprocess + backbone forward": lambda: app.look(predictor, image),
             "head: attribution, Grad-CAM, 4 deletion curves": lambda: why.why(predictor.model, seen["feats"]),
             "the answer's picture, drawn": lambda: app.answer_parts(predictor, {**seen, "why": dict(seen["why"])}),
             "its PNG, written": lambda: app.picture_file(picture)}
    picture = app.answer_parts(predictor, seen)[1]
    for name, run in parts.items():
        report(f"  {name}", timings(run, repeats))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=app.DEFAULT_MODEL, help="what app.py serves (default: the bundled model)")
    parser.add_argument("--image", default=str(ROOT / "assets" / "examples" / "star.png"))
    parser.add_argument("--repeats", type=int, default=20, help="calls per measurement (default 20)")
    parser.add_argument("--clients", type=int, default=24, help="users at once in the load run (0: skip it)")
    parser.add_argument("--calls-each", type=int, default=4, help="calls per user in the load run")
    parser.add_argument("--stand-in", metavar="VARIANT", help="serve a random-weight VARIANT at its eval size "
                        "with 1000 classes instead of --model (e.g. s: ImageNet S@384's cost, no download)")
    parser.add_argument("--only-answer", action="store_true", help="measure /answer and its parts only")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.stand_in:
            args.model = str(tmp / f"random-{args.stand_in}")
            EfficientNetV2(args.stand_in, num_classes=1000).eval().save_pretrained(args.model)
        predictor = load(args.model)
        model = predictor.model
        x = predictor.preprocess([args.image])
        print(f"EfficientNetV2-{model.variant.upper()} at {x.shape[-1]}px, {Path(args.image).name}, "
              f"{torch.get_num_threads()} torch threads, app concurrency {app.CONCURRENCY}")
        with running_app(tmp / "app.log", "--model", args.model) as url:
            client = Client(url, verbose=False, download_files=str(tmp / "downloads"))
            print(f"one call at a time, {args.repeats} calls each:")
            report("/answer (one step) through gradio_client", timings(
                lambda: client.predict(handle_file(args.image), api_name="/answer"), args.repeats))
            report_answer_parts(predictor, args.image, args.repeats)
            if args.only_answer:
                return
            report("/classify through gradio_client", timings(
                lambda: client.predict(handle_file(args.image), api_name="/classify"), args.repeats))
            report("/attention through gradio_client", timings(
                lambda: client.predict(handle_file(args.image), app.POOLED, 0, 0, api_name="/attention"),
                args.repeats))
            report("/explain through gradio_client", timings(
                lambda: client.predict(handle_file(args.image), "", api_name="/explain"), args.repeats))
            with torch.inference_mode():
                report("bare forward, eager PyTorch", timings(lambda: model(x), args.repeats))
                report(f"bare forward, Predictor ({predictor.backend})", timings(lambda: predictor(x), args.repeats))
            report("app.attention_parts in-process (no server)", timings(
                lambda: app.as_files(app.attention_parts(predictor, app.look(predictor, Image.open(args.image)))), args.repeats))
            report("app.explain_parts in-process (no server)", timings(
                lambda: app.as_files(app.explain_parts(predictor, app.look(predictor, Image.open(args.image)))), args.repeats))
            if args.clients:
                start = time.perf_counter()
                calls = mixed_load(url, app.EXAMPLES, args.clients, args.calls_each, tmp / "load")
                wall = time.perf_counter() - start
                errors = [call for call in calls if call.error]
                print(f"{args.clients} clients x {args.calls_each} calls = {len(calls)} requests in {wall:.1f}s "
                      f"({len(calls) / wall:.1f} req/s), {len(errors)} errors:")
                for name in ("/classify", "/attention"):
                    report(f"{name} under load", [call.seconds for call in calls if call.api_name == name])
                for call in errors:
                    print(f"  error: {call.api_name} {Path(call.image).name}: {call.error}")


if __name__ == "__main__":
    main()
