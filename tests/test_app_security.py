"""`python app.py` opens only the files uploaded to it: every event that takes an image, called by raw HTTP
(Gradio's queue protocol, hidden events by their index) and as an MCP tool, with paths to the server's
own files, existing or not, reached directly, by '..' or by a link from the upload folder."""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from PIL import Image

import app
from app_server import running_app

FILE_META = {"_type": "gradio.FileData"}  # what marks a value as a file for Gradio's own check
IMAGE_ENDPOINTS = {"answer", "classify", "attention", "explain"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("app") / "app.log") as url:
        yield url


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def image_events(http) -> list[tuple[int, str, list, int]]:
    """Every event of the page that runs Python on an image: (fn_index, name, its inputs' default
    values, the image's position among them), from the page's config, hidden events included."""
    config = http.get("config").json()
    components = {component["id"]: component for component in config["components"]}
    events = []
    for dependency in config["dependencies"]:
        kinds = [components[i]["type"] for i in dependency["inputs"]]
        endpoint = dependency["api_name"] in IMAGE_ENDPOINTS  # gr.api: its image is its first argument
        if dependency["backend_fn"] and ("image" in kinds or endpoint):
            defaults = [components[i]["props"].get("value") for i in dependency["inputs"]]
            events.append((dependency["id"], dependency["api_name"], defaults, 0 if endpoint else kinds.index("image")))
    return events


@pytest.fixture(scope="module")
def files(http, tmp_path_factory) -> dict:
    """An upload (through Gradio's upload route), and outside the upload folder a text file with a
    marker, an image, and a missing name; links and '..' paths from the upload's folder to them."""
    outside = tmp_path_factory.mktemp("outside")
    text, picture = outside / "secret.txt", outside / "secret.png"
    marker = f"secret-{uuid.uuid4().hex}"
    text.write_text(marker)
    Image.open(app.EXAMPLES[-1]).save(picture)  # an image the app would answer for, were it opened
    star = Path(app.EXAMPLES[0])
    [uploaded] = http.post("gradio_api/upload", files=[("files", (star.name, star.read_bytes()))]).json()
    folder = Path(uploaded).parent
    (folder / "link.png").symlink_to(picture)
    (folder / "dangling.png").symlink_to(outside / "missing.png")
    up = "../" * len(folder.parts)
    refused = [str(text), str(picture), str(outside / "missing.png"), "/etc/passwd", "/proc/self/environ",
               f"{folder}/{up}{str(picture).lstrip('/')}", f"{folder}/{up}{str(outside / 'gone.png').lstrip('/')}",
               str(folder / "link.png"), str(folder / "dangling.png")]
    # what any of them would leave in an answer: the text, a served picture, the server's environment
    return {"uploaded": uploaded, "refused": refused, "secrets": [marker, "file=", "HF_HUB_OFFLINE"]}


def run_event(http, fn_index: int, data: list) -> tuple[dict, str]:
    """One event through ``/gradio_api/queue/join`` and its SSE stream: its ``process_completed``
    message and the whole stream's text."""
    session = uuid.uuid4().hex
    joined = http.post("gradio_api/queue/join", json={"data": data, "fn_index": fn_index, "session_hash": session,
                                                     "event_data": None, "trigger_id": None})
    assert joined.status_code == 200, joined.text
    lines = []
    with http.stream("GET", "gradio_api/queue/data", params={"session_hash": session}) as stream:
        for line in stream.iter_lines():
            lines.append(line)
            if line.startswith("data:") and json.loads(line[5:]).get("msg") == "process_completed":
                return json.loads(line[5:]), "\n".join(lines)
    raise AssertionError(f"event {fn_index} never completed:\n" + "\n".join(lines))


def with_image(defaults: list, position: int, value) -> list:
    return [*defaults[:position], value, *defaults[position + 1:]]


def test_every_image_event_refuses_server_files_alike(http, image_events, files):
    """A path outside the upload folder, sent without Gradio's file marker (so Gradio's own check is
    skipped), as a bare string or with the marker: one answer per form whether the file exists or not,
    our message for the unmarked form, and nothing of any file in the stream."""
    names = {name for _, name, _, _ in image_events}
    assert IMAGE_ENDPOINTS <= names and len(image_events) >= 6  # the page's own ones too
    for fn_index, name, defaults, position in image_events:
        for form in (lambda path: {"path": path}, lambda path: path, lambda path: {"path": path, "meta": FILE_META}):
            answers = set()
            for path in files["refused"]:
                done, stream = run_event(http, fn_index, with_image(defaults, position, form(path)))
                assert done["success"] is False and "data" not in done["output"], (name, path, done)
                for secret in files["secrets"]:
                    assert secret not in stream, (name, path)
                answers.add((done["output"].get("error"), done["title"]))
            assert len(answers) == 1, (name, form(""), answers)  # the same for existing and missing files
        done, _ = run_event(http, fn_index, with_image(defaults, position, {"path": files["refused"][1]}))
        assert (done["output"]["error"], done["title"]) == (app.NOT_UPLOADED, "Image not uploaded"), name


def test_every_image_event_still_reads_an_upload(http, image_events, files):
    """The file an upload gave, with Gradio's file marker (as the page and gradio_client send it) or
    without: every image event answers."""
    for fn_index, name, defaults, position in image_events:
        for value in ({"path": files["uploaded"], "meta": FILE_META, "orig_name": "star.png"},
                      {"path": files["uploaded"]}):
            done, _ = run_event(http, fn_index, with_image(defaults, position, value))
            assert done["success"] is True and done["output"]["data"], (name, done)


def test_mcp_tools_refuse_server_files_alike(server, files):
    """The MCP tools that take an image: a server path as a string or as a file object is refused,
    the same whether it exists or not (the path itself aside), with nothing of the file."""
    pytest.importorskip("mcp", reason="Gradio's mcp extra is not installed (pip install 'gradio[mcp]')")
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async def ask():
        async with streamable_http_client(server + "gradio_api/mcp/") as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                tools = [tool.name for tool in (await session.list_tools()).tools
                         if "image" in tool.inputSchema["properties"]]
                answers = {}
                for tool in tools:
                    for path in files["refused"]:
                        for value in (path, {"path": path}, {"path": path, "meta": FILE_META}):
                            answers[tool, path, str(value)] = await session.call_tool(tool, {"image": value})
                return tools, answers
    tools, answers = asyncio.run(ask())
    assert set(tools) == IMAGE_ENDPOINTS
    by_form = {}
    for (tool, path, value), answer in answers.items():
        assert answer.isError and all(content.type == "text" for content in answer.content), (tool, value)
        text = " ".join(content.text for content in answer.content)
        for secret in files["secrets"]:
            assert secret not in text, (tool, value)
        by_form.setdefault((tool, value.replace(path, "<path>")), set()).add(text.replace(path, "<path>"))
    assert all(len(texts) == 1 for texts in by_form.values()), by_form


def test_a_huge_path_holds_no_compute_slot(http, image_events, files):
    """A path of 1 MB (queue/join takes such a body) is refused at once, not resolved: resolving one is
    quadratic in its length (0.5 MB held a compute slot 18 s), so two of them held both slots and a
    visitor's request waited. Two at once, then a visitor's upload: all answered within seconds."""
    [(fn_index, defaults, position)] = [(i, d, p) for i, name, d, p in image_events if name == "classify"]
    answers = {}

    def ask(key, value):
        start = time.monotonic()
        done, _ = run_event(http, fn_index, with_image(defaults, position, value))
        answers[key] = done, time.monotonic() - start

    huge = [threading.Thread(target=ask, args=(key, {"path": path})) for key, path in
            (("from root", "/tmp/" + "a/" * 500_000), ("in uploads", files["uploaded"] + "/.." * 250_000))]
    for thread in huge:
        thread.start()
    time.sleep(1)  # both in their slots
    ask("visitor", {"path": files["uploaded"], "meta": FILE_META})
    for thread in huge:
        thread.join()
    for key in ("from root", "in uploads"):
        done, seconds = answers[key]
        assert (done["output"].get("error"), done["title"]) == (app.NOT_UPLOADED, "Image not uploaded"), key
        assert seconds < 10, (key, seconds)
    done, seconds = answers["visitor"]
    assert done["success"] is True and seconds < 10, (done, seconds)


def test_what_requests_write_is_reclaimed(monkeypatch, tmp_path):
    """Files written for visitors are deleted while the app runs: Gradio's ``delete_cache`` covers uploads and
    its copies of answers (at most a day old), and the app's own pictures older than ``CACHE_AGE_S`` go on a
    write once ``SWEEP_S`` has passed since the last sweep."""
    frequency, age = app.demo.delete_cache
    assert 0 < frequency <= 86400 and 0 < age <= 86400, app.demo.delete_cache
    assert 0 < app.SWEEP_S <= app.CACHE_AGE_S / 10
    monkeypatch.setattr(app, "picture_dir", lambda: tmp_path)
    monkeypatch.setattr(app, "next_sweep", 0.0)
    old = Path(app.picture_file(Image.new("RGB", (4, 4), "red")))
    recent = Path(app.picture_file(Image.new("RGB", (4, 4), "green")))
    stale = time.time() - app.CACHE_AGE_S - 10
    os.utime(old, (stale, stale))
    app.picture_file(Image.new("RGB", (4, 4), "yellow"))
    assert old.exists()  # swept less than SWEEP_S ago: not yet
    monkeypatch.setattr(app, "next_sweep", time.monotonic() - 1)  # SWEEP_S has passed
    new = Path(app.picture_file(Image.new("RGB", (4, 4), "blue")))
    assert not old.exists() and recent.exists() and new.exists()


def test_computing_events_run_only_through_the_queue(http, image_events, files):
    """Every queued event (the computing ones, named or hidden, and the picker's) refuses a direct POST
    that skips the queue, by name and by fn_index: the queue's concurrency limit is the app's memory bound."""
    config = http.get("config").json()
    components = {component["id"]: component for component in config["components"]}
    queued = {dependency["id"]: (dependency["api_name"], [components[i]["props"].get("value") for i in dependency["inputs"]])
              for dependency in config["dependencies"] if dependency["backend_fn"] and dependency["queue"] is not False}
    assert {fn_index for fn_index, *_ in image_events} < set(queued)  # the image events and more (playground)
    for fn_index, _, values, position in image_events:  # what an image event answers today
        queued[fn_index] = queued[fn_index][0], with_image(values, position, {"path": files["uploaded"], "meta": FILE_META})
    for fn_index, (name, data) in queued.items():
        for route, body in ((f"gradio_api/run/{name}", {"data": data}), (f"gradio_api/api/{name}", {"data": data}),
                            ("gradio_api/run/predict", {"data": data, "fn_index": fn_index})):
            answer = http.post(route, json=body)
            assert answer.status_code in (403, 404) and '"data"' not in answer.text, (route, name, answer.text[:200])
