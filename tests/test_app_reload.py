"""`gradio app.py` (Gradio's reload mode, as in its own examples): the app starts from $EFFNETV2_MODEL,
and an edit of the file is served without a restart. Run on a copy of app.py, so the edit is the test's."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from app_server import free_port

from effnetv2 import EfficientNetV2

ROOT = Path(__file__).resolve().parents[1]
GRADIO_CLI = "import sys; from gradio.cli import cli; sys.argv[0] = 'gradio'; sys.exit(cli())"


def served_page(url: str) -> tuple[str, list[str]] | None:
    """(title, the labels /classify gives an example) of the app served at ``url``, or None while nothing
    answers: the labels say which model it serves."""
    try:
        with urllib.request.urlopen(url + "config", timeout=2) as response:
            title = json.load(response)["title"]
    except OSError:
        return None
    from gradio_client import Client, handle_file

    top = Client(url, verbose=False).predict(handle_file(str(ROOT / "assets" / "examples" / "star.png")),
                                             api_name="/classify")
    return title, [c["label"] for c in top["confidences"]]


def wait_for(url: str, proc: subprocess.Popen, log: Path, title: str, save=None, timeout: float = 120.0) -> list[str]:
    """The labels it gives once the page at ``url`` has ``title``; the log in the error otherwise. ``save()``
    is called every few seconds meanwhile: Gradio notes the files' times only once its reload thread has run
    the file again after the start, and an edit saved before that goes unseen until the next save."""
    deadline, saved = time.monotonic() + timeout, 0.0
    while time.monotonic() < deadline and proc.poll() is None:
        page = served_page(url)
        if page and page[0] == title:
            return page[1]
        if save and time.monotonic() - saved > 3:
            save()
            saved = time.monotonic()
        time.sleep(0.5)
    raise AssertionError(f"no page titled {title!r} at {url} (exit status {proc.poll()}):\n{log.read_text()}")


def test_gradio_reload_mode_serves_the_edited_file(tmp_path):
    app = tmp_path / "app.py"
    shutil.copy(ROOT / "app.py", app)
    shutil.copytree(ROOT / "assets" / "examples", tmp_path / "assets" / "examples")  # the page's examples
    model = tmp_path / "tiny-model"
    EfficientNetV2("b0", num_classes=2, image_size=64, id2label={0: "cat", 1: "dog"}).save_pretrained(model)
    port, log = free_port(), tmp_path / "gradio.log"
    env = {**os.environ, "EFFNETV2_MODEL": str(model), "GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "TMPDIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("GRADIO_SERVER_NAME", None)  # app.py's default: loopback
    url = f"http://127.0.0.1:{port}/"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", GRADIO_CLI, "app.py"], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # its app.py child: same group
    try:
        assert sorted(wait_for(url, proc, log, "EfficientNetV2 demo")) == ["cat", "dog"]  # $EFFNETV2_MODEL's
        edited = app.read_text().replace('title="EfficientNetV2 demo"', 'title="edited demo"')
        assert sorted(wait_for(url, proc, log, "edited demo", save=lambda: app.write_text(edited))) == ["cat", "dog"]
        assert proc.poll() is None
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
