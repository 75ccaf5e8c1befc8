"""Open + KVM association + device fd + release, per device, on each VFIO path.

Runs inside the lab's L1 (real VFIO, iommufd, KVM)::

    kvmvfio lab run -- python3 bench/bench_vfio_open.py [--rounds N]

For each path it times a :class:`kvmvfio.vfio.VfioSession` (with a KVM
VM's kvm-vfio device, coherency check off, so both sides do the same kernel
work) against the floor: the same ioctl sequence written inline with bare
``os.open``/``fcntl.ioctl`` and no checks. It also times the session with
the coherency check on (``warn``), which costs a probe open on the iommufd
paths. Prints a Markdown table; the figures go to docs/BENCHMARKS.md.
Timings are under TCG, so absolute numbers are far slower than on hardware;
the ratio is what matters.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import struct
from collections.abc import Callable

from labkit import bind, lab_topology, median_ms

from kvmvfio import uapi
from kvmvfio.kvm import KvmVfioDevice, KvmVm
from kvmvfio.vfio import VfioSession

# -- the floor: bare ioctls, numbers from the uAPI table, structs packed inline ----


def _kvm_file(kvm_fd: int, attr: int, fd: int) -> None:
    value = struct.pack("i", fd)
    buf = bytearray(value)
    addr = uapi.ffi.cast("uint64_t", uapi.ffi.from_buffer(buf))
    attr_buf = struct.pack("IIQQ", 0, uapi.KVM_DEV_VFIO_FILE, attr, int(addr))
    fcntl.ioctl(kvm_fd, uapi.KVM_SET_DEVICE_ATTR.number, attr_buf)


def bare_group(addr: str, group_no: int, kvm_fd: int, iommufd: bool) -> None:
    ctx = os.open("/dev/iommu" if iommufd else "/dev/vfio/vfio", os.O_RDWR | os.O_CLOEXEC)
    group = os.open(f"/dev/vfio/{group_no}", os.O_RDWR | os.O_CLOEXEC)
    fcntl.ioctl(group, uapi.VFIO_GROUP_SET_CONTAINER.number, struct.pack("i", ctx))
    if not iommufd:
        fcntl.ioctl(ctx, uapi.VFIO_SET_IOMMU.number, uapi.VFIO_TYPE1v2_IOMMU)
    _kvm_file(kvm_fd, uapi.KVM_DEV_VFIO_FILE_ADD, group)
    # An int argument is passed as is and the ioctl's result comes back (a
    # bytes argument would lose it): point it at the name by hand.
    name = uapi.ffi.new("char[]", addr.encode())
    pointer = int(uapi.ffi.cast("uintptr_t", name))
    device = fcntl.ioctl(group, uapi.VFIO_GROUP_GET_DEVICE_FD.number, pointer)
    os.close(device)
    _kvm_file(kvm_fd, uapi.KVM_DEV_VFIO_FILE_DEL, group)
    os.close(group)
    os.close(ctx)


def bare_cdev(cdev: str, kvm_fd: int) -> None:
    device = os.open(cdev, os.O_RDWR | os.O_CLOEXEC)
    _kvm_file(kvm_fd, uapi.KVM_DEV_VFIO_FILE_ADD, device)
    iommufd = os.open("/dev/iommu", os.O_RDWR | os.O_CLOEXEC)
    alloc = bytearray(struct.pack("III", 12, 0, 0))
    fcntl.ioctl(iommufd, uapi.IOMMU_IOAS_ALLOC.number, alloc)
    ioas = struct.unpack("III", alloc)[2]
    bind = bytearray(struct.pack("IIiI", 16, 0, iommufd, 0))
    fcntl.ioctl(device, uapi.VFIO_DEVICE_BIND_IOMMUFD.number, bind)
    attach = bytearray(struct.pack("III", 12, 0, ioas))
    fcntl.ioctl(device, uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT.number, attach)
    _kvm_file(kvm_fd, uapi.KVM_DEV_VFIO_FILE_DEL, device)
    os.close(device)
    os.close(iommufd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the coherency warning, once per round
    topology = lab_topology()
    addr = topology.guest_address("edu0")
    bind(addr, "vfio-pci")
    # Unbinding vfio-pci while a device fd is open blocks until it is closed,
    # so a failure below must not leave one open: every step closes its fds.
    try:
        group_no = int(os.path.basename(os.readlink(f"/sys/bus/pci/devices/{addr}/iommu_group")))
        (cdev_name,) = os.listdir(f"/sys/bus/pci/devices/{addr}/vfio-dev")
        cdev = f"/dev/vfio/devices/{cdev_name}"
        with KvmVm() as vm, vm.vfio_device() as kvm:
            rows = _measure(addr, group_no, cdev, kvm, args.rounds)
    finally:
        bind(addr, None)
    print(f"Lab topology {topology.name}, device {addr} (edu), median of {args.rounds} rounds.\n")
    print("| path | bare ioctls (floor) | VfioSession | ratio | VfioSession + coherency check |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for path, floor, session, checked in rows:
        print(
            f"| {path} | {floor:.2f} ms | {session:.2f} ms | {session / floor:.2f}x "
            f"| {checked:.2f} ms ({checked / floor:.2f}x) |"
        )


def _measure(
    addr: str, group_no: int, cdev: str, kvm: KvmVfioDevice, rounds: int
) -> list[tuple[str, float, float, float]]:
    kvm_fd = kvm.fileno()
    floors: dict[str, Callable[[], None]] = {
        "group": lambda: bare_group(addr, group_no, kvm_fd, iommufd=False),
        "group-iommufd": lambda: bare_group(addr, group_no, kvm_fd, iommufd=True),
        "cdev": lambda: bare_cdev(cdev, kvm_fd),
    }
    rows = []
    for path, floor_fn in floors.items():

        def session(coherency: str, path: str = path) -> None:
            with VfioSession([addr], backend=path, kvm=kvm, coherency=coherency):
                pass

        floor = median_ms(floor_fn, rounds)
        plain = median_ms(lambda: session("ignore"), rounds)
        checked = median_ms(lambda: session("warn"), rounds)
        rows.append((path, floor, plain, checked))
    return rows


if __name__ == "__main__":
    main()
