"""libvirtd inside L1, and small domains of type kvm for it to run (lab only).

L1 has no systemd and no udev: :class:`Libvirtd` starts ``virtlogd`` and
``libvirtd`` as daemons of their own, with the two ``qemu.conf`` settings
that a system without systemd's cgroup delegation and udev's /dev needs,
and stops them again. :func:`domain_xml` writes a small q35 domain of
type kvm that boots L1's own kernel with the busybox initramfs of
:mod:`kvmvfio.lab.l2`, with PCIe root ports for hotplug and native PCIe
hotplug in the guest (what the guest kernel has), its serial console in a
file that says when the guest is up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from xml.sax.saxutils import quoteattr

from kvmvfio.errors import LabError
from kvmvfio.lab.l2 import GUEST_CMDLINE, READY, STALLED, build_initramfs

IMAGES = Path("/var/lib/libvirt/images")
SERIAL_DIR = Path("/var/log/libvirt/qemu")
SOCKET = Path("/run/libvirt/libvirt-sock")
URI = "qemu:///system"
_QEMU_CONF = Path("/etc/libvirt/qemu.conf")
_CONF_MARK = "# kvmvfio lab"


def virsh(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``virsh -c qemu:///system ARGS``; raise :class:`LabError` with its words on failure."""
    done = subprocess.run(
        ["virsh", "-q", "-c", URI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and done.returncode != 0:
        raise LabError(f"virsh {' '.join(args[:2])} failed: {done.stderr.strip()}")
    return done


def _pids(name: str) -> list[int]:
    out = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


class Libvirtd:
    """``virtlogd`` and ``libvirtd`` of L1, started and stopped by us."""

    def configure(self) -> None:
        """Append the lab's settings to qemu.conf once (the root disk is a snapshot)."""
        text = _QEMU_CONF.read_text() if _QEMU_CONF.exists() else ""
        if _CONF_MARK not in text:
            # No systemd to delegate cgroups and no udev to make /dev nodes in a
            # per-domain namespace (LAB.md).
            text += f"\n{_CONF_MARK}\nnamespaces = [ ]\ncgroup_controllers = [ ]\n"
            _QEMU_CONF.write_text(text)

    def start(self, timeout: float = 60) -> None:
        """Start the daemons and wait until ``virsh`` gets an answer."""
        self.configure()
        for d in ("/run/libvirt", "/var/log/libvirt/qemu", str(IMAGES)):
            os.makedirs(d, exist_ok=True)
        if not _pids("virtlogd"):
            subprocess.run(["virtlogd", "-d"], check=True)
        subprocess.run(["libvirtd", "-d"], check=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if SOCKET.exists() and virsh("version", check=False, timeout=30).returncode == 0:
                return
            time.sleep(0.2)
        raise LabError(f"libvirtd did not answer within {timeout:g} s")

    def stop(self, timeout: float = 30) -> None:
        """Stop libvirtd (its domains keep running, as with a real restart)."""
        for pid in _pids("libvirtd"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pids("libvirtd") and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in _pids("libvirtd"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # A daemon killed outright leaves its pid file; the next start refuses it.
        with contextlib.suppress(FileNotFoundError):
            Path("/run/libvirtd.pid").unlink()

    def restart(self) -> None:
        """What ``systemctl restart libvirtd`` does."""
        self.stop()
        self.start()


def guest_images() -> tuple[Path, Path]:
    """L1's kernel and the busybox initramfs, where libvirt's QEMU may read them."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    kernel, initrd = IMAGES / "kvmvfio-bzImage", IMAGES / "kvmvfio-initramfs.cpio"
    if not kernel.exists():
        source = os.environ.get("KVMVFIO_LAB_KERNEL")
        if not source:
            raise LabError("KVMVFIO_LAB_KERNEL is not set: run inside the lab")
        shutil.copyfile(source, kernel)
    if not initrd.exists():
        build_initramfs(initrd)
    for path in (kernel, initrd):
        os.chmod(path, 0o644)
    return kernel, initrd


def serial_log(name: str) -> Path:
    """The file the domain's serial console writes to."""
    return SERIAL_DIR / f"{name}-serial.log"


def domain_xml(
    name: str,
    *,
    ports: int = 2,
    metadata: str = "",
    hostdevs: Sequence[str] = (),
    memory_mb: int = 256,
    roms: Mapping[str, str] | None = None,
) -> str:
    """A q35 domain of type kvm booting L1's kernel; ``metadata`` goes in ``<metadata>``.

    ``hostdevs`` are PCI addresses given as ``<hostdev managed='no'>``, and
    mediated devices' UUIDs as libvirt's ``<hostdev type='mdev'>``; ``roms``
    gives a PCI hostdev (by address) a ``<rom file=...>``.
    """
    roms = roms or {}
    kernel, initrd = guest_images()
    serial = serial_log(name)
    serial.unlink(missing_ok=True)
    devs = []
    for i in range(ports):
        devs.append(f"<controller type='pci' index='{i + 1}' model='pcie-root-port'/>")
    for addr in hostdevs:
        if "-" in addr:  # an mdev's UUID
            devs.append(
                "<hostdev mode='subsystem' type='mdev' model='vfio-pci'><source>"
                f"<address uuid='{addr}'/></source></hostdev>"
            )
            continue
        dom, bus, rest = addr.split(":")
        slot, func = rest.split(".")
        devs.append(
            "<hostdev mode='subsystem' type='pci' managed='no'><source>"
            f"<address domain='0x{dom}' bus='0x{bus}' slot='0x{slot}' function='0x{func}'/>"
            "</source>"
            + (f"<rom file={quoteattr(roms[addr])}/>" if addr in roms else "")
            + "</hostdev>"
        )
    devs.append(f"<serial type='file'><source path={quoteattr(str(serial))}/></serial>")
    # Else libvirt puts a balloon and a USB controller on the first root ports.
    devs.append("<memballoon model='none'/>")
    devs.append("<controller type='usb' model='none'/>")
    return f"""<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mb}</memory>
  <vcpu>1</vcpu>
  <metadata>{metadata}</metadata>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{GUEST_CMDLINE}</cmdline>
  </os>
  <cpu mode='host-passthrough'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    {chr(10).join("    " + d for d in devs).strip()}
  </devices>
  <qemu:commandline>
    <qemu:arg value='-global'/>
    <qemu:arg value='ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off'/>
  </qemu:commandline>
</domain>
"""


def wait_guest(name: str, timeout: float = 300) -> None:
    """Wait until the domain's guest reported on its serial console (slow: nested KVM).

    A guest whose kernel reports an RCU stall will not finish booting
    (docs/lab.md): that ends the wait at once, with the serial's tail.
    """
    path = serial_log(name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = ""
        with contextlib.suppress(OSError):
            text = path.read_text(errors="replace")
        if READY in text:
            return
        if any(s in text for s in STALLED):
            tail = "\n".join(text.splitlines()[-15:])
            raise LabError(f"the guest of domain {name} stalled while booting:\n{tail}")
        time.sleep(0.25)
    raise LabError(f"the guest of domain {name} did not come up within {timeout:g} s")


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 -m kvmvfio.lab.libvirtd start|stop|restart`` (L1 has no systemctl)."""
    import sys  # noqa: PLC0415

    args = list(sys.argv[1:] if argv is None else argv)
    daemon = Libvirtd()
    actions = {"start": daemon.start, "stop": daemon.stop, "restart": daemon.restart}
    if len(args) != 1 or args[0] not in actions:
        print("usage: python3 -m kvmvfio.lab.libvirtd start|stop|restart", file=sys.stderr)
        return 2
    actions[args[0]]()
    print(f"libvirtd: {args[0]} done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
