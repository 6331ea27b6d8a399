"""The processes of a Ray that a test started, what they listen on, and stopping them."""
from __future__ import annotations

import contextlib
import ipaddress
import os
import re
from typing import NamedTuple

import psutil


def ray_processes(temp_dir: str, address: str = "") -> list[psutil.Process]:
    """The processes of the Ray whose temp folder is ``temp_dir`` or whose GCS is at ``address`` (the Ray
    Client server names only that), and their children; never this one."""
    found = {}
    # the folder itself, not a longer name it begins; the address whole, not a longer port
    ours = re.compile("(" + "|".join(re.escape(key) for key in (temp_dir, address) if key) + r")(/|\s|$)")
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid != os.getpid() and ours.search(" ".join(proc.info["cmdline"] or [])):
            for member in [proc, *proc.children(recursive=True)]:
                found[member.pid] = member
    return list(found.values())


def stop_ray(temp_dir: str, address: str = "") -> None:
    """Stop the Ray started with ``temp_dir`` (and ``address``): SIGTERM, SIGKILL what is left after 2 s."""
    procs = ray_processes(temp_dir, address)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=2)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)


class Listener(NamedTuple):
    ip: str
    port: int
    pid: int
    process: str


def listeners(procs: list[psutil.Process]) -> list[Listener]:
    """Every listening TCP socket (IPv4 and IPv6) of ``procs``, from the kernel's table, not from any
    setting: ``::`` or ``0.0.0.0`` means every interface."""
    names = {}
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            names[proc.pid] = proc.name()
    return [Listener(conn.laddr.ip, conn.laddr.port, conn.pid, names[conn.pid])
            for conn in psutil.net_connections(kind="inet")
            if conn.status == psutil.CONN_LISTEN and conn.pid in names]


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8 or ::1, also as an IPv4-mapped IPv6 address (``::ffff:127.0.0.1``, how gRPC's dual-stack
    sockets show an IPv4 bind)."""
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback
