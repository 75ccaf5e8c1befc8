"""Helpers for lab tests with a real libvirtd in L1: domains, QEMU's files, the agent.

The fixtures that start libvirtd (with kvmvfio's hook installed) and the
agent are in conftest.py; a test asks for ``libvirtd``, ``clean`` or
``agent`` on any topology.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from kvmvfio.lab.libvirtd import Libvirtd, domain_xml, virsh
from kvmvfio.libvirt import install
from kvmvfio.libvirt.metadata import NAMESPACE
from kvmvfio.prepare import recover

HOOKS = Path("/etc/libvirt/hooks")


def qemu_fds(pid: int) -> list[str]:
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out.append(os.readlink(f"/proc/{pid}/fd/{name}"))
    return out


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout:g} s: {what}")


def metadata(*devices: str, **defaults: str) -> str:
    """kvmvfio's metadata element; each device is ``ADDR`` or ``ADDR attr=value ...``."""
    attrs = "".join(f' {k}="{v}"' for k, v in defaults.items())
    lines = [f'<kvmvfio:devices xmlns:kvmvfio="{NAMESPACE}"{attrs}>']
    for dev in devices:
        addr, *opts = dev.split()
        extra = "".join(f' {o.split("=")[0]}="{o.split("=")[1]}"' for o in opts)
        lines.append(f'<kvmvfio:device address="{addr}"{extra}/>')
    lines.append("</kvmvfio:devices>")
    return "".join(lines)


def create(
    tmp_path: Path, name: str, *, paused: bool = True, **kw: object
) -> subprocess.CompletedProcess[str]:
    xml = tmp_path / f"{name}.xml"
    xml.write_text(domain_xml(name, **kw))  # type: ignore[arg-type]
    args = ["create", str(xml)] + (["--paused"] if paused else [])
    return virsh(*args, check=False)


def destroy(name: str) -> None:
    virsh("destroy", name, check=False)


@contextlib.contextmanager
def hooked_libvirtd() -> Iterator[Libvirtd]:
    """libvirtd started with the hook already in place (libvirt looks for hooks then).

    At the end every domain is destroyed, libvirtd stopped, the hook removed
    and the journal recovered.
    """
    daemon = Libvirtd()
    daemon.start()
    try:
        yield daemon
    finally:
        for name in virsh("list", "--name", check=False).stdout.split():
            destroy(name)
        daemon.stop()
        install.uninstall(HOOKS)
        recover()


class AgentProcess:
    """``kvmvfio agent`` as its own process, as systemd would run it."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                ["kvmvfio", "-v", "agent", "--resync", "5"], stdout=out, stderr=out
            )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def text(self) -> str:
        return self.log.read_text(errors="replace")
