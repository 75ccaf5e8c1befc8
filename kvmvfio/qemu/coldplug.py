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

import resource
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvmvfio._closing import Closing
from kvmvfio.errors import KernelUnsupported, UsageError
from kvmvfio.host import Host, PciAddress
from kvmvfio.qemu.handoff import IOMMUFD_OBJECT, MEMLOCK_MARGIN, qdev_id
from kvmvfio.vfio import Coherency
from kvmvfio.vfio.files import OwnedFd, open_node
from kvmvfio.vfio.iommufd import open_for_vmm
from kvmvfio.vfio.policy import apply_coherency
from kvmvfio.vfio.session import check_devices, probe_cdev_coherency


@dataclass
class ColdPlug(Closing):
    """QEMU arguments and the fds they name; closing drops our copies."""

    args: list[str] = field(default_factory=list)
    fds: list[OwnedFd] = field(default_factory=list)
    unsafe: list[str] = field(default_factory=list)

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


def coldplug(
    addresses: Sequence[str | PciAddress],
    *,
    coherency: Coherency | str = Coherency.WARN,
    buses: Sequence[str] | None = None,
    allow_noiommu: bool = False,
    host: Host | None = None,
) -> ColdPlug:
    """Check the devices and return ``-object iommufd``/``-device vfio-pci`` args with fds.

    Raises what :func:`kvmvfio.vfio.session.check_devices` raises,
    :class:`~kvmvfio.errors.CoherencyRefused` under ``require``,
    :class:`KernelUnsupported` without ``/dev/iommu`` or device cdevs
    (start QEMU with ``host=`` and access to the group node instead), and
    :class:`~kvmvfio.vfio.iommufd.RlimitModeRefused` when the iommufd may
    not count per process (kvmvfio lacks ``CAP_SYS_RESOURCE``).
    """
    host = host or Host()
    policy = Coherency(coherency)
    addrs = [str(PciAddress.coerce(a)) for a in addresses]
    if buses is not None and len(buses) != len(addrs):
        raise UsageError(f"{len(addrs)} devices but {len(buses)} buses")
    devices, groups, unsafe = check_devices(host, addrs, allow_noiommu=allow_noiommu)
    if not (host.devfs / "iommu").exists() or not all(d.vfio_cdev for d in devices):
        raise KernelUnsupported(
            "cold plug by fd", "it needs /dev/iommu and VFIO device cdevs (CONFIG_IOMMUFD)"
        )
    plug = ColdPlug(unsafe=list(unsafe))
    try:
        for dev in devices:
            if policy is not Coherency.IGNORE:
                coherent = probe_cdev_coherency(host, dev)
                note = apply_coherency(
                    policy, coherent, f"device {dev.address}", [str(dev.address)]
                )
                if note:
                    plug.unsafe.append(note)
        iommufd = open_for_vmm(host.devfs, "the QEMU to start with these arguments")
        plug.fds.append(iommufd)
        plug.args += ["-object", f"iommufd,id={IOMMUFD_OBJECT},fd={iommufd.fileno()}"]
        group_of = {str(m.address): g for g in groups.values() for m in g.members}
        for i, dev in enumerate(devices):
            assert dev.vfio_cdev is not None
            addr = str(dev.address)
            fd = open_node(
                host.devfs / "vfio" / "devices" / dev.vfio_cdev,
                f"device {addr} ({dev.vfio_cdev})",
                related=[group_of[addr].dev_node(host.devfs)],
            )
            plug.fds.append(fd)
            opts = f"vfio-pci,id={qdev_id(addr)},iommufd={IOMMUFD_OBJECT},fd={fd.fileno()}"
            if buses is not None:
                opts += f",bus={buses[i]}"
            plug.args += ["-device", opts]
    except BaseException:
        plug.close()
        raise
    return plug
