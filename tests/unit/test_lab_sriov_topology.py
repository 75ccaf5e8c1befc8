"""The ``sriov`` lab topology: QEMU 7.2's nvme with SR-IOV, as QEMU will accept it.

QEMU checks the SR-IOV properties of ``nvme`` only when it starts (hw/nvme/ctrl.c,
``nvme_check_params``); a topology edit that breaks them fails the lab boot. These
checks say the same on the host, in a second.
"""

from __future__ import annotations

from kvmvfio.lab import topology as topo_mod


def _props(driver: str) -> dict[str, str]:
    (dev,) = [d for d in topo_mod.load("sriov").devices if d.driver == driver]
    return dict(dev.props)


def test_the_sriov_topology() -> None:
    topo = topo_mod.load("sriov")
    assert topo.viommu == "intel-iommu"
    assert topo.guest_address("edu0") == "0000:00:03.0"  # the tests every topology runs
    assert topo.guest_address("sriov0") == "0000:00:04.0"
    drivers = [d.driver for d in topo.devices]
    # QEMU creates devices in order: the subsystem before the controller naming it.
    assert drivers.index("nvme-subsys") < drivers.index("nvme")
    (subsys,) = [d for d in topo.devices if d.driver == "nvme-subsys"]
    assert subsys.addr is None  # not a PCI device
    assert _props("nvme")["subsys"] == subsys.id


def test_the_pf_meets_qemu_7_2_sriov_constraints() -> None:
    props = _props("nvme")
    vfs = int(props["sriov_max_vfs"])
    vq, vi = int(props["sriov_vq_flexible"]), int(props["sriov_vi_flexible"])
    assert 2 <= vfs <= 4  # what the lab tests make; QEMU allows up to 127
    assert vq >= 2 * vfs
    assert int(props["max_ioqpairs"]) >= vq + 2
    assert vi >= vfs
    assert int(props["msix_qsize"]) >= vi + 1
    # VFs sit at functions 1.. of the PF's slot: QEMU realizes a function > 0
    # only when function 0 is multifunction.
    assert props["multifunction"] == "on"


def test_the_pf_on_the_qemu_command_line() -> None:
    (pf,) = [d for d in topo_mod.load("sriov").devices if d.driver == "nvme"]
    arg = pf.qemu_arg()
    assert arg.startswith("nvme,id=sriov0,addr=0x04,multifunction=on,")
    assert ",subsys=subsys0," in arg
