"""The lab demo, run inside L1 by ``kvmvfio lab demo``: the story a user cares about.

It uses kvmvfio itself on the L1 kernel's real VFIO, iommufd and KVM:
what the host supports, the inventory, which IOMMU groups are viable and
why not, moving a device to vfio-pci, opening it on each of the kernel's
three paths with the KVM association made first, the kernel's answer on
DMA cache coherency, the release, a device handed by fd to an
unprivileged L2 QEMU over QMP and taken back, and libvirt: a domain whose
metadata asks kvmvfio for the NIC starts with it prepared by the hook and
gives it back when it stops, and one asking for a coherency the IOMMU cannot
give does not start, with kvmvfio's sentence in libvirt's error. What
kvmvfio cannot do yet is said so, not hidden. Exit status 0 when every step
did what it should.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from pathlib import Path

from kvmvfio.cli.host_cmds import render_inventory
from kvmvfio.errors import KvmvfioError
from kvmvfio.host import Host
from kvmvfio.kvm import KvmVm
from kvmvfio.lab import topology as topo_mod
from kvmvfio.lab.l2 import NOBODY, L2Qemu
from kvmvfio.prepare import prepare, release
from kvmvfio.qemu import Qemu, attach, detach
from kvmvfio.vfio import Coherency, VfioPath, VfioSession

DEMO_ROOT = Path("/run/kvmvfio-demo")


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def _say(text: str = "") -> None:
    print(f"   {text}" if text else "", flush=True)


def main() -> int:
    """Run the demo; return the exit status."""
    logging.basicConfig(level=logging.WARNING, format="   kvmvfio warns: %(message)s")
    topology = topo_mod.booted()
    name = topology.name
    host = Host()
    edu0 = topology.guest_address("edu0")
    results: list[tuple[str, bool]] = []

    _step(f"L1 on topology {name}: {topology.description}")
    support = host.support()
    for field, present in support.as_dict().items():
        _say(f"{field:16} {'yes' if present else 'no'}")
    results.append(("host supports VFIO, iommufd and KVM", support.usable and support.iommufd))

    _step("inventory (kvmvfio inventory)")
    for line in render_inventory(host.inventory()).splitlines():
        _say(line)

    _step("viability: which groups VFIO could use, and why not")
    for group in host.groups():
        members = ", ".join(str(m.address) for m in group.members)
        if group.viable:
            _say(f"group {group.number:>2} viable      ({members})")
        else:
            reasons = "; ".join(str(b) for b in group.blockers)
            _say(f"group {group.number:>2} NOT viable  ({members}): {reasons}")

    _step(f"kvmvfio prepare {edu0} (edu): to vfio-pci, journaled")
    before = host.device(edu0).driver
    (prepared,) = prepare([edu0], "demo", root=DEMO_ROOT)
    _say(f"claimed IOMMU group {prepared.group} for 'demo'; journal under {DEMO_ROOT}")
    after = host.device(edu0)
    _say(f"driver: {before or 'none'} -> {after.driver}; cdev {after.vfio_cdev}")
    group = host.group_of(edu0)
    _say(f"IOMMU group {group.number}: viable={group.viable}, node {group.dev_node()}")
    results.append(("edu0 on vfio-pci with a viable group", group.viable))

    try:
        for backend in (VfioPath.GROUP, VfioPath.GROUP_IOMMUFD, VfioPath.CDEV):
            _step(f"a VM's view of {edu0} on the {backend.value} path")
            ok = _session(edu0, backend)
            results.append((f"{backend.value} path: open, KVM, info, release", ok))
        _step("handing the device to an unprivileged L2 QEMU by fd over QMP")
        results.append(("L2 QEMU got the device by fd, and gave it back", _handoff(edu0)))
    finally:
        restored = release([edu0], "demo", root=DEMO_ROOT)
        for r in restored:
            _say(f"kvmvfio release: {r.address} back on {r.driver or 'no driver'}")
    results.append(("edu0 back as it was", host.device(edu0).driver == before))

    _step("libvirt: a domain asks kvmvfio for the NIC in its <metadata> (the hook)")
    results += _libvirt(topology)

    _step("report")
    for text, ok in results:
        _say(f"{'ok  ' if ok else 'FAIL'} {text}")
    return 0 if all(ok for _, ok in results) else 1


def _libvirt(topology: topo_mod.Topology) -> list[tuple[str, bool]]:
    from kvmvfio.lab import libvirtd  # noqa: PLC0415 (only this step needs it)
    from kvmvfio.libvirt import install  # noqa: PLC0415
    from kvmvfio.libvirt.metadata import NAMESPACE  # noqa: PLC0415

    nic, edu1 = topology.guest_address("nic0"), topology.guest_address("edu1")
    hook = install.install(python=sys.executable)
    _say(f"kvmvfio hook install: {hook.path}")
    daemon = libvirtd.Libvirtd()
    daemon.start()
    out: list[tuple[str, bool]] = []
    xml_dir = Path("/run/kvmvfio-demo")
    xml_dir.mkdir(parents=True, exist_ok=True)
    try:
        meta = (
            f'<kvmvfio:devices xmlns:kvmvfio="{NAMESPACE}">'
            f'<kvmvfio:device address="{nic}"/></kvmvfio:devices>'
        )
        (xml_dir / "vm1.xml").write_text(libvirtd.domain_xml("vm1", metadata=meta, hostdevs=[nic]))
        before = Host().device(nic).driver
        _say(f"{nic} is on {before}; virsh create vm1.xml --paused (a <hostdev managed='no'>)")
        started = libvirtd.virsh("create", str(xml_dir / "vm1.xml"), "--paused", check=False)
        during = Host().device(nic).driver
        _say(f"domain vm1 {'runs' if started.returncode == 0 else 'FAILED'}; {nic} is on {during}")
        libvirtd.virsh("destroy", "vm1", check=False)
        after = Host().device(nic).driver
        _say(f"virsh destroy vm1: the hook gave {nic} back to {after}")
        ok = started.returncode == 0 and during == "vfio-pci" and after == before
        out.append(("libvirt domain started with the NIC prepared by the hook, gave it back", ok))

        strict = (
            f'<kvmvfio:devices xmlns:kvmvfio="{NAMESPACE}" coherency="require">'
            f'<kvmvfio:device address="{edu1}" handoff="agent"/></kvmvfio:devices>'
        )
        (xml_dir / "vm2.xml").write_text(libvirtd.domain_xml("vm2", metadata=strict))
        _say(f"vm2 asks for {edu1} with coherency='require'")
        refused = libvirtd.virsh("create", str(xml_dir / "vm2.xml"), "--paused", check=False)
        said = refused.stderr.strip().splitlines()[-1:] or [""]
        _say(f"virsh create vm2.xml: exit {refused.returncode}; libvirt says ...{said[0][-160:]}")
        coherent = topology.viommu == "intel-iommu" and topology.snoop_control
        libvirtd.virsh("destroy", "vm2", check=False)
        ok = (refused.returncode == 0) == coherent and Host().device(edu1).driver is None
        out.append(("coherency='require' honoured by libvirt's start", ok))
    finally:
        daemon.stop()
        install.uninstall()
    return out


def _handoff(addr: str) -> bool:
    l2 = L2Qemu(ports=1)
    try:
        return asyncio.run(_handoff_steps(addr, l2))
    except KvmvfioError as err:
        _say(f"FAILED: {err}")
        return False
    finally:
        l2.kill()


async def _handoff_steps(addr: str, l2: L2Qemu) -> bool:
    _say(f"L2 QEMU pid {l2.pid} runs as uid {NOBODY}: it cannot open /dev/vfio or /dev/iommu")
    async with Qemu(l2.qmp, pid=l2.pid) as qemu:
        _say(f"QMP socket peer checked: pid {qemu.pid}, uid {qemu.uid} (SO_PEERCRED)")
        start = time.perf_counter()
        (done,) = await attach(qemu, [addr])
        took = (time.perf_counter() - start) * 1000
        _say(f"attached as {done.qdev_id} on {done.bus} by {done.path.value} in {took:.0f} ms")
        held = [
            f for f in l2.fds() if f.startswith(("/dev/vfio", "/dev/iommu", "anon_inode:kvm-vfio"))
        ]
        _say(f"QEMU now holds: {', '.join(sorted(set(held)))}")
        ok = "anon_inode:kvm-vfio" in held and "/dev/iommu" in held
        await detach(qemu, [addr])
        _say("detached (device_del, DEVICE_DELETED); the device is free again")
    return ok


def _session(addr: str, backend: VfioPath) -> bool:
    fds_before = len(os.listdir("/proc/self/fd"))
    start = time.perf_counter()
    try:
        with (
            KvmVm() as vm,
            vm.vfio_device() as kvm,
            VfioSession([addr], backend=backend, kvm=kvm, coherency=Coherency.WARN) as session,
        ):
            report = session.report()
            (dev,) = report.devices
            _say(f"opened on {report.backend.value}; KVM was given the files before any open")
            for held in kvm.files:
                _say(f"KVM holds {held.subject}")
            coherent = "enforced" if report.coherent else "NOT enforced"
            _say(f"DMA cache coherency: {coherent} (the answer KVM gets from VFIO)")
            regions = ", ".join(f"#{r.index} {r.size:#x}" for r in dev.regions if r.size)
            _say(f"device: {dev.info.num_regions} regions ({regions}); irqs {len(dev.irqs)}")
    except KvmvfioError as err:
        _say(f"FAILED: {err}")
        return False
    elapsed = (time.perf_counter() - start) * 1000
    leaked = len(os.listdir("/proc/self/fd")) - fds_before
    _say(f"released in order; fds left open: {leaked}; took {elapsed:.1f} ms under TCG")
    return leaked == 0


if __name__ == "__main__":
    sys.exit(main())
