"""L2 QEMUs inside L1: unprivileged, with KVM, paused or running a tiny guest.

Used by the lab demo, the handoff tests and the benchmarks; runs in L1 only.

QEMU runs as ``nobody`` (uid 65534), which cannot open ``/dev/vfio`` or
``/dev/iommu``: every VFIO file it gets comes from kvmvfio. It may open
``/dev/kvm`` (an ACL entry, what udev's ``kvm`` group would give it).
The running guest is L1's own kernel with a busybox initramfs written
here; ``-global ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off`` makes
q35 use native PCIe hotplug, which the lab kernel has (pciehp), so the
guest answers hot-unplug requests.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from kvmvfio.errors import LabError
from kvmvfio.lab.stall import cpu_seconds

NOBODY = 65534
READY = "KVMVFIO-L2-READY"
#: What the guest's kernel prints when its timer interrupts stop arriving (RCU's stall check).
STALLED = ("rcu: INFO: rcu_preempt self-detected stall", "rcu: INFO: rcu_preempt detected stalls")
PCI_EVENT = "KVMVFIO-L2-PCI"
#: QEMU's edu device, as the guest's uevents name it (vendor:device).
EDU_ID = "1234:11e8"

_INIT = f"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
# From here on the kernel keeps to itself what is not an emergency: a warning
# printed in the middle of one of our lines would garble it.
echo 1 > /proc/sys/kernel/printk
/bin/busybox uevent /bin/busybox sh -c \
    '[ "$SUBSYSTEM" = pci ] && echo "{PCI_EVENT} $ACTION $PCI_SLOT_NAME $PCI_ID" >/dev/ttyS0' &
echo {READY} > /dev/ttyS0
while true; do /bin/busybox sleep 3600; done
"""


def parse_pci_events(text: str) -> tuple[Counter[tuple[str, str]], list[str]]:
    """The PCI uevents in lines the guest's init printed, by (action, vendor:device).

    Also returns the lines that name an event but do not read as one (a
    kernel message printed into the middle of a line garbles it), so that a
    count that falls short can be told from an event the guest never sent.
    """
    counts: Counter[tuple[str, str]] = Counter()
    garbled = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 4 and fields[0] == PCI_EVENT:
            counts[fields[1], fields[3].lower()] += 1
        elif PCI_EVENT in line:
            garbled.append(line)
    return counts, garbled


def _cpio_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> bytes:
    fields = [
        0,  # ino
        mode,
        0,  # uid
        0,  # gid
        1,  # nlink
        0,  # mtime
        len(data),
        0,  # devmajor
        0,  # devminor
        rdev[0],
        rdev[1],
        len(name) + 1,
        0,  # check
    ]
    header = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
    out = header + name.encode() + b"\0"
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out


def build_initramfs(target: Path) -> Path:
    """A newc initramfs with busybox and an init that reports readiness on ttyS0."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise LabError("busybox is missing in L1 (vm-images/rootfs/packages.txt has it)")
    entries = [_cpio_entry(d, stat.S_IFDIR | 0o755) for d in ("bin", "dev", "proc", "sys")]
    entries.append(_cpio_entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    entries.append(_cpio_entry("bin/busybox", stat.S_IFREG | 0o755, Path(busybox).read_bytes()))
    entries.append(_cpio_entry("init", stat.S_IFREG | 0o755, _INIT.encode()))
    entries.append(_cpio_entry("TRAILER!!!", 0))
    target.write_bytes(b"".join(entries))
    return target


#: The L2 guest's command line (here and in libvirt's domains, lab.libvirtd).
#: lapic=notscdeadline: the guest's LAPIC timer in one-shot mode. L1's TSC
#: runs at TCG's pace and is often marked unstable; KVM turns TSC-deadline
#: timers into host time through it, and the lab's stalled boots
#: (docs/lab.md) waited on such a timer. libvirt's domains booted without it
#: until 2026-12-03, and stalled on a busy machine.
GUEST_CMDLINE = "console=ttyS0 panic=-1 quiet lapic=notscdeadline"


class L2Qemu:
    """One L2 QEMU process as ``nobody``, with a QMP socket and a pid file."""

    def __init__(
        self,
        *,
        ports: int = 4,
        guest: bool = False,
        extra: Sequence[str] = (),
        pass_fds: Sequence[int] = (),
        preexec_fn: Callable[[], None] | None = None,
        append: str = "",
        acpi_hotplug: bool = False,
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kvmvfio-l2-"))
        os.chmod(self.dir, 0o777)
        self.qmp = self.dir / "qmp.sock"
        self.pidfile = self.dir / "qemu.pid"
        self.serial = self.dir / "serial.log"
        self._console_pos = 0
        self._pci_counts: Counter[tuple[str, str]] = Counter()
        #: Lines that name a PCI event but do not read as one (the last few).
        self.garbled_pci_lines: list[str] = []
        self.guest = guest
        subprocess.run(["setfacl", "-m", f"u:{NOBODY}:rw", "/dev/kvm"], check=True)
        argv = [
            "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            "qemu-system-x86_64",
            "-machine", "q35", "-accel", "kvm", "-cpu", "host", "-m", "256",
            "-nodefaults", "-display", "none", "-no-user-config",
            "-qmp", f"unix:{self.qmp},server=on,wait=off",
            "-pidfile", str(self.pidfile),
            "-serial", f"file:{self.serial}",
        ]  # fmt: skip
        if not acpi_hotplug:
            # Native PCIe hotplug on the root ports (pciehp in the guest; an
            # unplug waits for its 5 s attention button). With acpi_hotplug,
            # q35's default: ACPI hotplug, which the guest answers at once.
            argv += ["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"]
        for i in range(ports):
            argv += ["-device", f"pcie-root-port,id=rp{i},chassis={i + 1}"]
        if guest:
            # A copy nobody may read (the job share is root's only).
            kernel = self.dir / "bzImage"
            shutil.copyfile(os.environ["KVMVFIO_LAB_KERNEL"], kernel)
            initrd = build_initramfs(self.dir / "initramfs.cpio")
            for path in (kernel, initrd):
                os.chmod(path, 0o644)
            argv += ["-kernel", str(kernel), "-initrd", str(initrd)]
            args = f"{GUEST_CMDLINE} {append}"
            argv += ["-append", args.strip()]
        else:
            argv.append("-S")
        argv += list(extra)
        self.stderr = self.dir / "stderr.log"
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                argv,
                stdout=subprocess.DEVNULL,
                stderr=err,
                pass_fds=tuple(pass_fds),
                preexec_fn=preexec_fn,  # noqa: PLW1509 (tests: no threads)
            )
        self._wait_for(lambda: self.qmp.exists() and self.pidfile.exists(), 60, "QMP socket")
        self.pid = int(self.pidfile.read_text().strip())

    def _wait_for(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if self.proc.poll() is not None:
                err = self.stderr.read_text(errors="replace")
                raise RuntimeError(f"L2 QEMU exited ({self.proc.returncode}): {err}")
            time.sleep(0.1)
        raise TimeoutError(f"L2 QEMU: no {what} within {timeout} s")

    @classmethod
    def booted(cls, *, timeouts: Sequence[float] = (180.0, 480.0), **kwargs: object) -> L2Qemu:
        """An L2 QEMU whose guest has booted: one try per entry of ``timeouts``.

        The lab's known stall (docs/lab.md): now and then the guest's timer
        interrupts stop arriving during boot; its kernel prints RCU stall
        warnings and QEMU sits nearly idle. A fresh QEMU boots as usual, so a
        stalled try is killed and the next one started; the stalled try's
        serial tail goes to stderr, where the test's output keeps it. The
        last try's failure is raised.
        """
        for i, limit in enumerate(timeouts):
            qemu = cls(guest=True, **kwargs)  # type: ignore[arg-type]
            try:
                qemu.wait_guest(timeout=limit, stop_on_stall=i + 1 < len(timeouts))
            except TimeoutError as err:
                qemu.kill()
                if i + 1 == len(timeouts):
                    raise
                print(f"lab: L2 guest boot try {i + 1} failed, starting another: {err}",
                      file=sys.stderr)  # fmt: skip
                continue
            return qemu
        raise ValueError("timeouts is empty")

    def wait_guest(self, timeout: float = 300, *, stop_on_stall: bool = False) -> None:
        """Wait until the guest's init reported on the serial port (slow under TCG).

        On a timeout the error ends with the guest's last serial lines and
        QEMU's CPU time: a guest that printed nothing for minutes while QEMU
        used no CPU is stuck (waiting for an interrupt), not slow.
        ``stop_on_stall``: give up as soon as the guest's kernel reports an
        RCU stall (a boot that will not finish), with the same error.
        """

        def done() -> bool:
            text = self.console()
            if READY in text:
                return True
            if stop_on_stall and any(mark in text for mark in STALLED):
                raise TimeoutError("L2 QEMU: the guest's kernel reports an RCU stall")
            return False

        try:
            self._wait_for(done, timeout, "guest boot")
        except TimeoutError as e:
            tail = "\n".join(f"  | {line}" for line in self.console().splitlines()[-15:])
            cpu = self.cpu_seconds()
            raise TimeoutError(f"{e}; QEMU used {cpu:.0f} s of CPU; serial:\n{tail}") from None

    def console(self) -> str:
        """What the guest printed on its serial port so far."""
        try:
            return self.serial.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def pci_event_counts(self) -> Counter[tuple[str, str]]:
        """How many PCI uevents of each (action, vendor:device) the guest sent so far.

        The guest's init runs busybox ``uevent`` and prints each PCI uevent
        on the serial port, so a test sees what the guest itself saw: a
        device it enumerated (``add``) and one it let go of (``remove``).
        Reads only what the guest printed since the last call (a soak's
        console grows by thousands of lines; reading it whole at every
        sample would grow this process's heap with it).
        """
        try:
            with open(self.serial, "rb") as f:
                f.seek(self._console_pos)
                chunk = f.read()
        except FileNotFoundError:
            return Counter(self._pci_counts)
        end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next call
        self._console_pos += end
        counts, garbled = parse_pci_events(chunk[:end].decode(errors="replace"))
        self._pci_counts.update(counts)
        self.garbled_pci_lines = [*self.garbled_pci_lines, *garbled][-10:]
        return Counter(self._pci_counts)  # a copy: the running count stays ours

    def wait_pci_events(
        self,
        pci_id: str,
        want: tuple[int, int],
        *,
        since: tuple[int, int] = (0, 0),
        timeout: float = 30,
    ) -> tuple[int, int]:
        """Wait until the guest added and removed ``pci_id`` as often as ``want`` says.

        ``want`` and the result are (adds, removes), counted beyond ``since``
        (a result of an earlier call). Returns once both reach ``want``, or
        as they are at the timeout: the guest prints its uevents a moment
        after QEMU's side of the (un)plug.
        """
        deadline = time.monotonic() + timeout
        while True:
            counts = self.pci_event_counts()
            seen = (
                counts["add", pci_id.lower()] - since[0],
                counts["remove", pci_id.lower()] - since[1],
            )
            if (seen[0] >= want[0] and seen[1] >= want[1]) or time.monotonic() > deadline:
                return seen
            time.sleep(0.2)

    def cpu_seconds(self) -> float:
        """CPU time QEMU used so far (user + system), from /proc; 0 once it is gone."""
        try:
            return cpu_seconds(self.pid)
        except OSError:
            return 0.0

    def fds(self) -> list[str]:
        """What QEMU has open, as /proc shows it."""
        fd_dir = f"/proc/{self.pid}/fd"
        out = []
        for name in os.listdir(fd_dir):
            try:
                out.append(os.readlink(f"{fd_dir}/{name}"))
            except OSError:
                continue
        return out

    def kill(self) -> None:
        """Stop QEMU (SIGKILL) and remove its folder; safe twice."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)
