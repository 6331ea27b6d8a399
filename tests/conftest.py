import os
import secrets
import socket
import threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Ray reads RAY_AUTH_MODE once, when Python first imports it. The Ray that effnetv2.serve starts needs
# token authentication, so it is on for the whole session (set here, before any test module imports ray).
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

import pytest
import torch

# OMP_NUM_THREADS, when set, is honoured (training-based tests must hold at 1 thread too, see
# CONTRIBUTING.md); otherwise at most 2, the CI machine's cores.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def torchvision_home(tmp_path_factory):
    """A torch cache (for ``TORCH_HOME``) holding a file under the name of torchvision's EfficientNetV2-S
    weights: random weights, as no download is possible here (the ImageNet labels come from
    torchvision's metadata). Made once for the session: an 85 MB file."""
    import torchvision

    home = tmp_path_factory.mktemp("torch-home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.efficientnet_v2_s().state_dict(),
               home / "hub" / "checkpoints" / "efficientnet_v2_s-dd5fe13b.pth")
    return home


@pytest.fixture()
def silent_proxy(monkeypatch):
    """Every HTTP(S) request of this process goes through a loopback proxy that accepts connections
    and never answers (a hung download); yields its port."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.1)
        accepted, stop = [], threading.Event()  # connections stay open: a closed one would answer (a reset)

        def accept():
            while not stop.is_set():
                try:
                    accepted.append(server.accept()[0])
                except TimeoutError:
                    pass
        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        port = server.getsockname()[1]
        for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{port}")
        for name in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        try:
            yield port
        finally:
            stop.set()
            thread.join()
            for connection in accepted:
                connection.close()


@pytest.fixture()
def hung_load(monkeypatch):
    """``effnetv2.loading.load`` replaced by a load that hangs until ``release`` is set, then fails with an
    error naming server paths and settings (which visitors must never see); yields ``(release, calls)``,
    ``calls`` the sources asked for. Released at teardown, so no load outlives its test."""
    from effnetv2 import loading

    release, calls = threading.Event(), []

    def load(source, backend="auto"):
        calls.append(source)
        release.wait(120)
        raise OSError("could not download the weights: put that file at /srv/torch/hub (or set TORCH_HOME, "
                      "unset HF_HUB_OFFLINE)")
    monkeypatch.setattr(loading, "load", load)
    try:
        yield release, calls
    finally:
        release.set()
