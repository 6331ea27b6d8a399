"""Starting or joining Ray, for batch prediction (``effnetv2.batch_ray``) and serving (``effnetv2.serve``).

Without an address (and no ``$RAY_ADDRESS``, which ``ray job submit`` sets for its jobs), a new Ray for this machine alone, whose processes talk over loopback only: its node
address is ``LOCAL_NODE_IP``, because Ray swaps ``127.0.0.1`` and ``localhost`` for the host's network
address (``ray._private.services.resolve_ip_for_localhost``), but keeps any other loopback address. With
an address (``auto``: the Ray that ``ray start`` runs here; ``HOST:PORT``; ``ray://HOST:PORT``), that
cluster, checked first: Ray itself retries an address where nothing listens for minutes.
"""
from __future__ import annotations

import os
import socket

LOCAL_NODE_IP = "127.0.0.2"


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


def init_ray(address: str | None = None, **options) -> str | None:
    """``ray.init``: the cluster at ``address`` (else ``$RAY_ADDRESS``), or a new loopback-only Ray.
    ``options`` (those not None) go to ``ray.init``: ``num_cpus``, ``object_store_memory``, ``_temp_dir``, ...
    Returns the address joined, or None for a Ray started here (``ray.shutdown()`` stops it)."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    check_reachable(address)
    options = {name: value for name, value in options.items() if value is not None}
    if address is None:
        options.setdefault("_node_ip_address", LOCAL_NODE_IP)
    ray.init(address=address or "local", **options)
    return address
