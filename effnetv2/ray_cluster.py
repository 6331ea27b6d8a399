"""Starting or joining Ray, for batch prediction (``effnetv2.batch_ray``) and serving (``effnetv2.serve``).

Without an address (nor ``$RAY_ADDRESS``), a new Ray for this machine alone, without its dashboard, at node
address ``127.0.0.1``: the one address at which Ray binds its servers to loopback only. With ``token_auth``,
also with Ray's token authentication, for the servers Ray binds to every interface whatever the node address
(Ray Serve's replicas). With an address, that cluster, checked first (Ray retries a dead address for minutes).
"""
from __future__ import annotations

import os
import secrets
import socket
import sys

LOCAL_NODE_IP = "127.0.0.1"


def check_reachable(address: str | None) -> None:
    """ConnectionError naming ``--address`` when nothing listens at a ``HOST:PORT`` (or ``ray://``) address."""
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except (OSError, ValueError) as err:
        raise ConnectionError(f"--address {address}: no Ray cluster answers there ({err}); start one with "
                              f"`ray start --head`, or give the head node's HOST:PORT") from None


def require_token_auth() -> None:
    """Ray's token authentication on in this process and the Ray processes it starts: ``RAY_AUTH_MODE=token``
    and, unless given, a random ``RAY_AUTH_TOKEN``. RuntimeError when ``ray`` was imported before without it
    (Ray reads ``RAY_AUTH_MODE`` once, on import)."""
    if "ray" not in sys.modules and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    if not is_token_auth_enabled():
        raise RuntimeError(
            "a Ray that effnetv2.serve starts needs Ray's token authentication (Serve's replicas listen on every "
            "interface), which Ray reads from $RAY_AUTH_MODE when first imported (it is "
            f"{os.environ.get('RAY_AUTH_MODE', 'unset')}, and ray is imported): set RAY_AUTH_MODE=token, or call "
            "effnetv2.ray_cluster.require_token_auth() before anything imports ray, or serve on a secured --address")


def starts_ray(address: str | None) -> bool:
    """Whether :func:`init_ray` with ``address`` starts a Ray of its own (no address, no ``$RAY_ADDRESS``)."""
    return not (address or os.environ.get("RAY_ADDRESS"))


def init_ray(address: str | None = None, *, token_auth: bool = False, **options) -> str | None:
    """``ray.init``: the cluster at ``address`` (else ``$RAY_ADDRESS``), or a new Ray on loopback only (with
    ``token_auth``: :func:`require_token_auth`); ``options`` that are not None go to ``ray.init``.
    Returns the address joined, or None for a Ray started here (``ray.shutdown()`` stops it)."""
    if starts_ray(address) and token_auth:
        require_token_auth()  # sets it up if ray is not imported yet, else checks it is on
    address = address or os.environ.get("RAY_ADDRESS") or None
    check_reachable(address)
    import ray

    options = {name: value for name, value in options.items() if value is not None}
    if address is not None:
        ray.init(address=address, **options)
        return address
    # Ray swaps 127.0.0.1 for the host's network address on Linux unless it believes clusters are off
    from ray._private import ray_constants

    options.setdefault("include_dashboard", False)  # its job API runs any code for whoever reaches it
    clusters, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        ray.init(address="local", _node_ip_address=LOCAL_NODE_IP, **options)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = clusters
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOCAL_NODE_IP:  # a Ray whose rules changed: never run one open to the network
        ray.shutdown()
        raise RuntimeError(f"Ray {ray.__version__} put the Ray started here at {node_ip}, not {LOCAL_NODE_IP}: "
                           f"its servers would listen on every interface; start a Ray you secured (RAY_AUTH_MODE=token) "
                           f"and pass its --address")
    return None
