"""VFs asked for by count (``<kvmvfio:vfs pf= count=>``): which are picked, and the refusals.

The same through a real libvirtd, the hook and the agent, with the kernel's
VFs of QEMU's NVMe controller: tests/lab/test_sriov_libvirt.py.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
from fakesysfs import Dev, Topology

from kvmvfio.errors import UsageError
from kvmvfio.host import Host
from kvmvfio.libvirt import hook
from kvmvfio.libvirt.metadata import (
    NAMESPACE,
    DeviceRequest,
    Handoff,
    MetadataError,
    VfPool,
    parse_domain,
    resolve,
    to_xml,
)
from kvmvfio.prepare import sriov, status
from kvmvfio.prepare.journal import Entry, Journal, Record
from kvmvfio.vfio.policy import VfioPath

BuildHost = Callable[[Topology], Host]
PF = "0000:00:04.0"
VFS = ["0000:00:10.0", "0000:00:10.1", "0000:00:10.2"]
NS = f'xmlns:k="{NAMESPACE}"'


def _host(build_host: BuildHost, vf_driver: str | None = None) -> Host:
    pf = Dev(
        PF, driver="igb", group=4, vfs=3, totalvfs=8, vf_offset=0x60, vf_group=10,
        vf_driver=vf_driver,
    )  # fmt: skip
    return build_host(Topology(devices=[pf], drivers=("vfio-pci", "igb", "igbvf")))


def _claim(root: Path, index: int, owner: str) -> None:
    """What prepare leaves for ``owner`` holding VF ``index`` (its group is 10 + index)."""
    Journal(root).write(Record(10 + index, owner, 0, devices=[Entry(VFS[index], None, None)]))


def _domain(inner: str, name: str = "vm1") -> str:
    return (
        f"<domain type='kvm'><name>{name}</name><metadata><k:devices {NS}>{inner}"
        "</k:devices></metadata><devices/></domain>"
    )


def test_free_vfs_are_picked_in_order_and_the_owners_own_first(
    build_host: BuildHost, tmp_path: Path
) -> None:
    host = _host(build_host)
    assert sriov.pick_vfs(PF, 2, "vm1", host=host, root=tmp_path) == tuple(VFS[:2])
    _claim(tmp_path, 0, "vm2")
    _claim(tmp_path, 2, "vm1")
    # vm1's own VF first, then the free one; vm2's is never picked.
    assert sriov.pick_vfs(PF, 2, "vm1", host=host, root=tmp_path) == (VFS[2], VFS[1])
    assert sriov.pick_vfs(PF, 1, "vm1", host=host, root=tmp_path) == (VFS[2],)
    assert sriov.pick_vfs(PF, 2, "vm1", held_only=True, host=host, root=tmp_path) == (VFS[2],)
    assert sriov.pick_vfs(PF, 1, "vm1", exclude={VFS[2]}, host=host, root=tmp_path) == (VFS[1],)
    with pytest.raises(sriov.NotEnoughVfs) as refused:
        sriov.pick_vfs(PF, 2, "vm3", host=host, root=tmp_path)
    text = str(refused.value)
    assert text.startswith(f"2 VFs of PF {PF} were asked for and 1 of its VFs is free: ")
    assert f"VF {VFS[0]} is claimed by 'vm2'" in text
    assert f"kvmvfio sriov set {PF} N --owner OWNER" in text


def test_vfs_on_a_host_driver_are_never_picked(build_host: BuildHost, tmp_path: Path) -> None:
    host = _host(build_host, vf_driver="igbvf")
    with pytest.raises(sriov.NotEnoughVfs, match=r"is on its host driver igbvf \(name it"):
        sriov.pick_vfs(PF, 1, "vm1", host=host, root=tmp_path)


@pytest.mark.parametrize(
    ("pf", "count", "error", "words"),
    [
        (VFS[0], 1, sriov.NotSriovCapable, f"PCI device {VFS[0]} is a VF (of PF {PF})"),
        (PF, 0, UsageError, "must be 1 or more, not 0"),
        (PF, "2", UsageError, "must be 1 or more, not '2'"),
        (PF, 4, sriov.NotEnoughVfs, "4 VFs of PF 0000:00:04.0 were asked for and 3 of"),
    ],
)
def test_bad_requests_are_refused_by_name(
    build_host: BuildHost, tmp_path: Path, pf: str, count: object, error: type, words: str
) -> None:
    host = _host(build_host)
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        sriov.pick_vfs(pf, count, "vm1", host=host, root=tmp_path)  # type: ignore[arg-type]


def test_the_metadata_reads_a_pool_and_writes_it_back() -> None:
    req = parse_domain(_domain('<k:vfs pf="00:04.0" count="2" handoff="agent" reset="yes"/>'))
    assert req is not None
    assert req.devices == ()
    (pool,) = req.pools
    assert (pool.pf, pool.count) == (PF, 2)
    assert pool.device(VFS[1]) == DeviceRequest(
        VFS[1], Handoff.AGENT, pool.template.path, reset=True
    )
    xml = f"<domain><name>vm1</name><metadata>{to_xml((), pools=req.pools)}</metadata></domain>"
    again = parse_domain(xml)
    assert again is not None
    assert again.pools == req.pools


@pytest.mark.parametrize(
    ("inner", "words"),
    [
        ('<k:vfs count="2" handoff="agent"/>', "<kvmvfio:vfs> has no pf attribute"),
        ('<k:vfs pf="00:04.0" handoff="agent"/>', "has no count attribute"),
        ('<k:vfs pf="00:04.0" count="0" handoff="agent"/>', "count='0'; expected a whole number"),
        ('<k:vfs pf="00:04.0" count="x" handoff="agent"/>', "count='x'"),
        ('<k:vfs pf="00:04.0" count="70000" handoff="agent"/>', "from 1 to 65535"),
        ('<k:vfs pf="00:04.0" count="1"/>', "no <hostdev> can name a VF that is picked"),
        ('<k:vfs pf="zz" count="1" handoff="agent"/>', "<kvmvfio:vfs pf='zz'>"),
        ('<k:vfs pf="00:04.0" count="1" handoff="agent" address="00:10.0"/>',
         "unknown attribute 'address'"),
        ('<k:vfs pf="00:04.0" count="1" handoff="agent"><k:device/></k:vfs>', "must be empty"),
        ('<k:vfs pf="00:04.0" count="1" handoff="agent"/>'
         '<k:vfs pf="0000:00:04.0" count="1" handoff="none"/>', "has two <kvmvfio:vfs>"),
    ],
)  # fmt: skip
def test_bad_pools_are_refused_by_name(inner: str, words: str) -> None:
    with pytest.raises(MetadataError) as refused:
        parse_domain(_domain(inner))
    assert words in str(refused.value)


def test_a_vf_named_by_address_is_not_picked_again(build_host: BuildHost, tmp_path: Path) -> None:
    host = _host(build_host)
    inner = (
        f'<k:device address="{VFS[0]}" handoff="none"/><k:vfs pf="{PF}" count="2" handoff="none"/>'
    )
    req = parse_domain(_domain(inner))
    assert req is not None
    done = resolve(req, host=host, root=tmp_path)
    assert [d.address for d in done.devices] == VFS
    assert done.pools == ()


def test_the_hook_and_its_release_agree_on_the_vfs(build_host: BuildHost, tmp_path: Path) -> None:
    host = _host(build_host)
    first = parse_domain(_domain(f'<k:vfs pf="{PF}" count="2" handoff="none"/>', "vm1"))
    second = parse_domain(_domain(f'<k:vfs pf="{PF}" count="2" handoff="none"/>', "vm2"))
    assert first is not None
    assert second is not None
    _claim(tmp_path, 1, "libvirt:vm1")
    _claim(tmp_path, 2, "libvirt:vm1")
    # What the hook's prepare, the agent and the release each ask: the same two.
    assert [d.address for d in resolve(first, host=host, root=tmp_path).devices] == VFS[1:]
    held = resolve(first, held_only=True, host=host, root=tmp_path)
    assert [d.address for d in held.devices] == VFS[1:]
    # A second domain asking for two finds one free: refused before any change.
    before = status(root=tmp_path)
    with pytest.raises(sriov.NotEnoughVfs, match="claimed by 'libvirt:vm1'"):
        hook.prepare_domain(second, host=host, root=tmp_path)
    assert status(root=tmp_path) == before
    assert host.device(VFS[0]).driver is None
    # The hook's main says it in one sentence.
    err = io.StringIO()
    stdin = io.BytesIO(_domain(f'<k:vfs pf="{PF}" count="2" handoff="none"/>', "vm2").encode())
    code = hook.main(["vm2", "prepare", "begin", "-"], stdin, err, host=host, root=tmp_path)
    assert code == 1
    assert err.getvalue().startswith(f"kvmvfio: 2 VFs of PF {PF} were asked for and 1 of its")
    assert "Traceback" not in err.getvalue()


def test_a_pool_is_its_own_element_in_the_xml() -> None:
    pool = VfPool(PF, 3, DeviceRequest(PF, Handoff.AGENT, VfioPath.CDEV))
    text = to_xml((), pools=(pool,), naked=True)
    assert f'<vfs pf="{PF}" count="3" handoff="agent"/>' in text
