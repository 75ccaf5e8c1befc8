"""Cold plug: QEMU arguments and fds for a VM that starts with its devices.

For launchers that start QEMU themselves. The same checks as a hot attach
run first; then kvmvfio opens ``/dev/iommu`` (made to charge what QEMU
pins to QEMU's own process, not to its user: see
:func:`kvmvfio.vfio.iommufd.open_for_vmm`) and each device's cdev
(unbound: QEMU binds it and makes the KVM association itself) and returns
the arguments that name them by number, to be inherited with
``subprocess``'s ``pass_fds``. QEMU never opens a VFIO path::

    with coldplug(["0000:03:00.0"]) as plug:
        subprocess.Popen([qemu, *base_args, *plug.args], pass_fds=plug.pass_fds,
                         preexec_fn=plug.memlock_preexec(ram_bytes))
    # our copies are closed here; QEMU keeps its own
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from kvmvfio._closing import Closing
from kvmvfio.errors import UsageError
from kvmvfio.host import Host, PciAddress
from kvmvfio.qemu.handoff import IOMMUFD_OBJECT, MEMLOCK_MARGIN, qdev_id, rom_options
from kvmvfio.vfio.files import OwnedFd, open_node
from kvmvfio.vfio.iommufd import open_for_vmm
from kvmvfio.vfio.plan import Opener, Plan, make_plan
from kvmvfio.vfio.policy import Coherency


@dataclass
class ColdPlug(Closing):
    """QEMU arguments and the fds they name; closing drops our copies."""

    args: list[str] = field(default_factory=list)
    fds: list[OwnedFd] = field(default_factory=list)
    unsafe: list[str] = field(default_factory=list)
    #: The plan the arguments were made from.
    plan: Plan | None = None

    @property
    def pass_fds(self) -> tuple[int, ...]:
        """The fd numbers to pass to QEMU (``subprocess.Popen(pass_fds=...)``)."""
        return tuple(fd.fileno() for fd in self.fds)

    @staticmethod
    def memlock_preexec(ram: int) -> Callable[[], None]:
        """A ``preexec_fn`` that lets the child lock ``ram`` plus VFIO's margin.

        VFIO pins all guest RAM at device realize; with the default limit
        (8 MiB) QEMU fails with "vfio_container_dma_map(...) = -12". Run as
        root before QEMU drops privileges (setpriv, ``-run-with user=``).
        """
        needed = ram + MEMLOCK_MARGIN

        def setup() -> None:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (needed, needed))

        return setup

    def close(self) -> None:
        """Close our copies (after QEMU started with its own); safe twice."""
        for fd in self.fds:
            fd.close()


def plan_coldplug(
    addresses: Sequence[str | PciAddress],
    *,
    coherency: Coherency | str = Coherency.WARN,
    allow_noiommu: bool = False,
    host: Host | None = None,
) -> Plan:
    """The plan for starting a QEMU with the devices at ``addresses``; nothing is opened.

    Cold plug passes fds, which QEMU takes on the cdev path only. Raises
    what :func:`~kvmvfio.vfio.plan.make_plan` raises.
    """
    return make_plan(
        addresses,
        coherency=coherency,
        allow_noiommu=allow_noiommu,
        opener=Opener.COLDPLUG,
        host=host,
    )


def coldplug(
    addresses: Sequence[str | PciAddress] | Plan,
    *,
    coherency: Coherency | str = Coherency.WARN,
    buses: Sequence[str] | None = None,
    allow_noiommu: bool = False,
    host: Host | None = None,
    romfiles: Mapping[str, str | os.PathLike[str]] | None = None,
    no_rombar: Collection[str] | None = None,
) -> ColdPlug:
    """Plan (unless given a plan) and return ``-object iommufd``/``-device vfio-pci`` args with fds.

    ``romfiles`` gives a device (by address) an option ROM file instead of
    its own: each is checked with :func:`~kvmvfio.host.rom.check_romfile`
    before anything is opened and passed as QEMU's ``romfile=``, by its
    resolved absolute path (QEMU would otherwise also look for a relative
    name in its data folders). ``no_rombar`` names devices QEMU shows
    without a ROM BAR (``rombar=0``; :func:`~kvmvfio.qemu.handoff.rom_options`).

    Raises what :func:`~kvmvfio.vfio.plan.make_plan` raises (the devices'
    checks, :class:`~kvmvfio.errors.CoherencyRefused` under ``require``,
    :class:`~kvmvfio.errors.KernelUnsupported` without ``/dev/iommu`` or
    device cdevs: start QEMU with ``host=`` and access to the group node
    instead), and :class:`~kvmvfio.vfio.iommufd.RlimitModeRefused` when the
    iommufd may not count per process (kvmvfio lacks ``CAP_SYS_RESOURCE``),
    and :class:`~kvmvfio.host.rom.InvalidRom` for a ROM file that is not one
    for its device.
    """
    if isinstance(addresses, Plan):
        plan = addresses.made_for(Opener.COLDPLUG, "plan_coldplug")
    else:
        plan = plan_coldplug(addresses, coherency=coherency, allow_noiommu=allow_noiommu, host=host)
    if buses is not None and len(buses) != len(plan.devices):
        raise UsageError(f"{len(plan.devices)} devices but {len(buses)} buses")
    roms = rom_options(plan, romfiles, no_rombar, host or Host())
    cold = ColdPlug(unsafe=list(plan.notes), plan=plan)
    try:
        iommufd = open_for_vmm(plan.devfs, "the QEMU to start with these arguments")
        cold.fds.append(iommufd)
        cold.args += ["-object", f"iommufd,id={IOMMUFD_OBJECT},fd={iommufd.fileno()}"]
        for i, dev in enumerate(plan.devices):
            fd = open_node(
                dev.file,
                f"device {dev.address} ({dev.cdev})",
                related=[plan.group(dev.group).node],
            )
            cold.fds.append(fd)
            opts = f"vfio-pci,id={qdev_id(dev.address)},iommufd={IOMMUFD_OBJECT},fd={fd.fileno()}"
            if dev.sysfsdev is not None:
                opts += f",sysfsdev={dev.sysfsdev}"  # an mdev: see handoff._attach_fd
            for prop, value in roms.get(dev.address, {}).items():
                opts += f",{prop}={str(value).replace(',', ',,')}"
            if buses is not None:
                opts += f",bus={buses[i]}"
            cold.args += ["-device", opts]
    except BaseException:
        cold.close()
        raise
    return cold
