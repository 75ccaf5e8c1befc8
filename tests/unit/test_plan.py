"""The planning layer on a fake host and a fake VFIO kernel (the real kernel's answers: lab).

A plan is made once and acted on: these tests check what a plan decides
for each opener and path, that planning leaves nothing open and writes
nothing, that every way in (session, attach, cold plug, check) acts on the
same plan, and that the one path vocabulary reads the old spellings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fakeqmp import FakeQmp
from fakesysfs import Dev, Mediated, Parent, ParentType, Topology
from fakevfio import FakeVfio

from kvmvfio import uapi
from kvmvfio.cli import run
from kvmvfio.errors import (
    CoherencyRefused,
    InvalidMdevUuid,
    KernelUnsupported,
    MdevNotFound,
    MdevNotReady,
    MixedVfioBackends,
    NoIommuRefused,
    UsageError,
)
from kvmvfio.host import Host
from kvmvfio.libvirt.metadata import MetadataError, parse_domain
from kvmvfio.qemu import coldplug, handoff, plan_attach, plan_coldplug
from kvmvfio.qemu.qmp import Qemu
from kvmvfio.vfio import Opener, Plan, VfioPath, VfioSession, make_plan

EDU = {"vendor": 0x1234, "device": 0x11E8, "cls": 0x00FF00}
BuildHost = Callable[[Topology], Host]
A, B, C = "0000:00:03.0", "0000:00:04.0", "0000:00:05.0"


@pytest.fixture
def kernel() -> Iterator[FakeVfio]:
    with uapi.using_backend(FakeVfio()) as fake:
        yield fake


@pytest.fixture
def host(build_host: BuildHost) -> Host:
    """Two devices on vfio-pci in group 1, one in group 2, and an e1000e in group 3."""
    return build_host(
        Topology(
            devices=[
                Dev(A, driver="vfio-pci", group=1, **EDU),
                Dev(B, driver="vfio-pci", group=1, **EDU),
                Dev(C, driver="vfio-pci", group=2, **EDU),
                Dev("0000:00:06.0", driver="e1000e", group=3),
            ]
        )
    )


def _tree(root: Path) -> str:
    """A digest of every file's name, mode and content under ``root`` (links not followed)."""
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            st = path.lstat()
            digest.update(f"{path}:{st.st_mode}".encode())
            if path.is_file() and not path.is_symlink():
                digest.update(path.read_bytes())
    return digest.hexdigest()


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# -- what a plan decides -------------------------------------------------------------------


def test_a_plan_names_the_path_the_files_and_the_answers(host: Host, kernel: FakeVfio) -> None:
    plan = make_plan([C, A], host=host)
    assert plan.path is VfioPath.CDEV
    assert plan.requested is VfioPath.AUTO
    assert plan.why == "the kernel has /dev/iommu and VFIO device cdevs"
    assert plan.addresses == (C, A)
    assert [g.number for g in plan.groups] == [2, 1]
    assert plan.group(1).members == (A, B)
    cdevs = {d.address: d.cdev for d in plan.devices}
    assert plan.files == (
        host.devfs / "iommu",
        host.devfs / "vfio" / "devices" / str(cdevs[C]),
        host.devfs / "vfio" / "devices" / str(cdevs[A]),
    )
    assert plan.coherent is True
    assert plan.notes == ()
    assert plan.accepted == ()
    # cdev: the question is asked once per device, each on its own scratch iommufd.
    assert kernel.asked_coherency() == 2
    assert kernel.names().count("VFIO_DEVICE_BIND_IOMMUFD") == 2


@pytest.mark.parametrize(
    ("path", "context"), [(VfioPath.GROUP, "vfio/vfio"), (VfioPath.GROUP_IOMMUFD, "iommu")]
)
def test_the_group_paths_open_groups(
    host: Host, kernel: FakeVfio, path: VfioPath, context: str
) -> None:
    plan = make_plan([A, B, C], path=path, host=host)
    assert plan.path is path
    assert plan.why == "asked for"
    assert plan.files == (host.devfs / context, host.devfs / "vfio/1", host.devfs / "vfio/2")
    assert [d.file for d in plan.devices] == [host.devfs / "vfio/1"] * 2 + [host.devfs / "vfio/2"]
    # one question per group: the group is the unit on these paths
    assert kernel.asked_coherency() == 2


def test_not_coherent_under_warn_is_noted_and_accepted(host: Host, kernel: FakeVfio) -> None:
    kernel.coherent = False
    plan = make_plan([A, B], path="group", host=host)
    note = "IOMMU group 1: the IOMMU does not enforce DMA cache coherency"
    assert plan.coherent is False
    assert [d.notes for d in plan.devices] == [(note,), (note,)]
    assert plan.notes == (note,)
    assert plan.accepted == ("IOMMU group 1: no enforced DMA cache coherency (policy warn)",)
    with pytest.raises(CoherencyRefused, match="IOMMU group 1"):
        make_plan([A, B], path="group", coherency="require", host=host)


def test_ignore_asks_nothing(host: Host, kernel: FakeVfio) -> None:
    plan = make_plan([A], coherency="ignore", host=host)
    assert plan.coherent is None
    assert plan.device(A).coherent is None
    assert kernel.calls == []


def test_noiommu_is_refused_or_accepted_by_name(build_host: BuildHost, kernel: FakeVfio) -> None:
    host = build_host(
        Topology(devices=[Dev(A, driver="vfio-pci", group=7, **EDU)], noiommu_groups=[7])
    )
    with pytest.raises(NoIommuRefused):
        make_plan([A], path="group", coherency="ignore", host=host)
    plan = make_plan([A], path="group", coherency="ignore", allow_noiommu=True, host=host)
    assert plan.group(7).noiommu
    assert plan.files[1] == host.devfs / "vfio" / "noiommu-7"
    assert plan.accepted == ("IOMMU group 7 is a no-IOMMU group (no DMA isolation)",)
    assert plan.notes == ("IOMMU group 7 is a no-IOMMU group: no DMA isolation",)


def test_planning_leaves_nothing_open_and_writes_nothing(host: Host, kernel: FakeVfio) -> None:
    root = host.sysfs.parent
    before, fds = _tree(root), _fds()
    for path in ("cdev", "group", "group-iommufd"):
        make_plan([A, C], path=path, host=host)
    assert _tree(root) == before
    assert _fds() == fds


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"addresses": []}, UsageError, "no device to plan for"),
        ({"addresses": [A, "00:03.0"]}, UsageError, "a device is named twice"),
        ({"addresses": [A], "opener": Opener.QEMU, "path": "group-iommufd"}, UsageError,
         "QEMU opens a group only in a container"),
        ({"addresses": [A], "opener": Opener.COLDPLUG, "path": "group"}, UsageError,
         "cold plug passes file descriptors"),
        ({"addresses": [A], "opener": Opener.QEMU, "path": "cdev", "qemu_iommufd": False},
         KernelUnsupported, "QEMU's vfio-pci has no iommufd/fd properties"),
    ],
)  # fmt: skip
def test_bad_requests_are_refused_with_a_sentence(
    host: Host, kernel: FakeVfio, kwargs: dict[str, object], error: type[Exception], words: str
) -> None:
    addresses = kwargs.pop("addresses")
    with pytest.raises(error, match=words):
        make_plan(addresses, host=host, **kwargs)  # type: ignore[arg-type]
    assert kernel.calls == []


def test_auto_for_a_qemu_without_iommufd_is_the_group_path(host: Host, kernel: FakeVfio) -> None:
    plan = make_plan([A], opener=Opener.QEMU, qemu_iommufd=False, host=host)
    assert plan.path is VfioPath.GROUP
    assert plan.why == "QEMU's vfio-pci has no iommufd/fd properties (QEMU < 9)"


def test_a_plan_prints_as_json(host: Host, kernel: FakeVfio) -> None:
    doc = make_plan([A], host=host).to_json()
    assert json.loads(json.dumps(doc)) == doc
    assert doc["path"] == "cdev"
    assert doc["files"] == [str(host.devfs / "iommu"), doc["devices"][0]["file"]]  # type: ignore[index]


# -- every way in acts on the same plan -------------------------------------------------------


def _same(a: Plan, b: Plan) -> None:
    """Equal decisions, whoever they were made for."""
    for name in ("path", "devices", "groups", "files", "coherent", "notes", "accepted"):
        assert getattr(a, name) == getattr(b, name), name


def test_a_session_opens_what_its_plan_names_without_asking_again(
    host: Host, kernel: FakeVfio
) -> None:
    plan = make_plan([A, C], path="group", host=host)
    kernel.calls.clear()
    with VfioSession.from_plan(plan, host=host) as session:
        assert session.plan is plan
        opened = {os.readlink(f"/proc/self/fd/{g.fileno()}") for g in session.groups.values()}
        assert opened == {str(f) for f in plan.files[1:]}
    assert kernel.asked_coherency() == 0  # the plan's answer, not a second question
    with VfioSession([A, C], backend="group", host=host) as session:
        assert session.plan is not None
        _same(session.plan, plan)


async def test_attach_and_coldplug_plan_as_a_session_does(
    host: Host, kernel: FakeVfio, tmp_path: Path
) -> None:
    session = make_plan([A, C], host=host)
    cold = plan_coldplug([A, C], host=host)
    assert cold.opener is Opener.COLDPLUG
    _same(cold, session)
    with coldplug(cold) as plug:
        assert plug.plan is cold
        assert [os.readlink(f"/proc/self/fd/{fd}") for fd in plug.pass_fds] == [
            str(f) for f in cold.files
        ]
    peer = await FakeQmp(tmp_path / "qmp.sock").start()
    peer.replies["qom-list-types"] = [{"name": "iommufd"}]
    peer.replies["qom-list"] = []  # no VFIO device in QEMU yet
    try:
        async with Qemu(peer.path) as qemu:
            attach = await plan_attach(qemu, [A, C], host=host)
            with pytest.raises(UsageError, match="make it with plan_attach"):
                await handoff.attach(qemu, cold)
    finally:
        await peer.stop()
    assert attach.opener is Opener.QEMU
    _same(attach, session)


def test_check_prints_the_plan_it_acted_on(
    host: Host, kernel: FakeVfio, capsys: pytest.CaptureFixture[str]
) -> None:
    roots = ["--sysfs-root", str(host.sysfs), "--dev-root", str(host.devfs)]
    code = run(["check", A, "--no-kvm", "--path", "group", "--json", *roots])
    out = capsys.readouterr().out
    doc = json.loads(out[: out.rindex("}") + 1])
    assert doc["plan"] == make_plan([A], path="group", host=host).to_json()
    assert code == 0


# -- one vocabulary ----------------------------------------------------------------------------


def test_old_spellings_name_the_same_paths() -> None:
    assert VfioPath("iommufd") is VfioPath.CDEV is VfioPath.IOMMUFD
    assert VfioPath("legacy") is VfioPath.GROUP is VfioPath.LEGACY
    assert [p.value for p in VfioPath] == ["auto", "cdev", "group", "group-iommufd"]
    from kvmvfio.qemu import HandoffPath  # noqa: PLC0415
    from kvmvfio.vfio import Backend  # noqa: PLC0415

    assert HandoffPath is VfioPath is Backend


def test_the_cli_reads_an_old_spelling_with_a_notice(
    host: Host, kernel: FakeVfio, capsys: pytest.CaptureFixture[str]
) -> None:
    roots = ["--sysfs-root", str(host.sysfs), "--dev-root", str(host.devfs)]
    run(["check", A, "--no-kvm", "--path", "legacy", "--json", *roots])
    captured = capsys.readouterr()
    assert captured.err.splitlines()[0] == (
        "kvmvfio: --path legacy is now spelled --path group (the old spelling still works)"
    )
    assert json.loads(captured.out[: captured.out.rindex("}") + 1])["plan"]["path"] == "group"


def _domain(attrs: str) -> str:
    return (
        "<domain><name>vm</name><metadata>"
        '<kvmvfio:devices xmlns:kvmvfio="urn:kvmvfio:libvirt:1">'
        f'<kvmvfio:device address="03:00.0" handoff="agent" {attrs}/>'
        "</kvmvfio:devices></metadata></domain>"
    )


def test_metadata_takes_the_same_vocabulary(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "kvmvfio.libvirt.metadata")
    for attrs in ("", 'path="auto"', 'path="cdev"', 'path="iommufd"'):
        request = parse_domain(_domain(attrs))
        assert request is not None
        assert request.devices[0].path is VfioPath.CDEV
    assert "path=iommufd is now spelled path=cdev" in caplog.text
    with pytest.raises(MetadataError, match="no QEMU opens a group on iommufd"):
        parse_domain(_domain('path="group-iommufd"'))


# -- VF tokens -------------------------------------------------------------------------------

PF, VF0, VF1 = "0000:00:08.0", "0000:00:09.0", "0000:00:09.1"
TOKEN = "2c0d4ab4-7a5d-4b84-9a4a-0b5cbbd1c9a1"


@pytest.fixture
def sriov_host(build_host: BuildHost) -> Host:
    """A PF on vfio-pci (a userspace PF driver) with two VFs on vfio-pci, each in its group."""
    pf = Dev(PF, driver="vfio-pci", group=8, vfs=2, vf_offset=8, vf_group=9, vf_driver="vfio-pci")
    return build_host(Topology(devices=[pf]))


def test_a_vf_of_a_vfio_pf_needs_the_token(sriov_host: Host, kernel: FakeVfio) -> None:
    from kvmvfio.vfio.plan import VfTokenNeeded  # noqa: PLC0415

    with pytest.raises(VfTokenNeeded, match=f"VF {VF0}: its PF {PF} is on vfio-pci"):
        make_plan([VF0], path="group", host=sriov_host)
    assert kernel.calls == []
    plan = make_plan([VF0], path="group", vf_token=TOKEN, host=sriov_host)
    assert plan.device(VF0).vf_token
    assert str(plan.token_for(VF0)) == TOKEN
    assert TOKEN not in repr(plan)
    assert TOKEN not in json.dumps(plan.to_json())
    with VfioSession.from_plan(plan, host=sriov_host):
        pass
    # The kernel reads the token from the device name at each open (the group
    # path's coherency question opens no device; group-iommufd's does).
    assert kernel.opened == [f"{VF0} vf_token={TOKEN}"]
    kernel.opened.clear()
    with VfioSession([VF0], backend="group-iommufd", vf_token=TOKEN, host=sriov_host):
        pass
    assert kernel.opened == [f"{VF0} vf_token={TOKEN}"] * 2


def test_the_cdev_path_says_it_checks_no_token(sriov_host: Host, kernel: FakeVfio) -> None:
    plan = make_plan([VF0, VF1], path="cdev", vf_token=TOKEN, host=sriov_host)
    assert all("checks no VF token" in d.notes[0] for d in plan.devices)


def test_a_malformed_token_is_refused(sriov_host: Host, kernel: FakeVfio) -> None:
    with pytest.raises(UsageError, match="a VF token is a UUID"):
        make_plan([VF0], vf_token="not-a-uuid", host=sriov_host)
    assert kernel.calls == []


def test_a_token_no_device_takes_is_refused(host: Host, kernel: FakeVfio) -> None:
    with pytest.raises(UsageError, match="no device is a VF whose PF is on vfio-pci"):
        make_plan([A], vf_token=TOKEN, host=host)
    assert kernel.calls == []


async def test_qemu_gets_the_token_on_the_group_path(
    sriov_host: Host, kernel: FakeVfio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def ensure_memlock(qemu: object, *, raise_it: bool = True, memory: object = None) -> int:
        return 0

    monkeypatch.setattr(handoff, "ensure_memlock", ensure_memlock)
    monkeypatch.setattr(handoff, "grant", lambda node, uid: False)
    peer = await FakeQmp(tmp_path / "qmp.sock").start()
    peer.replies.update(
        {
            "qom-list-types": [],
            "query-memory-size-summary": {"base-memory": 1 << 30},
            "qom-list": lambda a: (
                [{"name": "rp0", "type": "child<pcie-root-port>"}]
                if a["path"] == "/machine/peripheral"
                else []
            ),
            "device_add": {},
        }
    )
    try:
        async with Qemu(peer.path) as qemu:
            (done,) = await handoff.attach(qemu, [VF0], vf_token=TOKEN, host=sriov_host)
    finally:
        await peer.stop()
    assert done.path == "group"  # this QEMU has no iommufd
    adds = [args for cmd, args in peer.received if cmd == "device_add"]
    assert adds
    assert adds[0]["vf-token"] == TOKEN
    assert adds[0]["host"] == VF0


# -- one VM, one VFIO backend ----------------------------------------------------------------


@pytest.mark.parametrize(("link", "there"), [("", "group"), ("/objects/iommufd0", "cdev")])
async def test_attach_keeps_to_the_backend_qemu_uses(
    host: Host, kernel: FakeVfio, tmp_path: Path, link: str, there: str
) -> None:
    """QEMU 10.0 aborts on a VM with legacy and iommufd VFIO devices (the lab saw it)."""
    peer = await FakeQmp(tmp_path / "qmp.sock").start()
    peer.replies["qom-list-types"] = [{"name": "iommufd"}]
    peer.replies["query-memory-size-summary"] = {"base-memory": 1 << 30}
    peer.replies["qom-list"] = lambda args: (
        [{"name": "hostdev0", "type": "child<vfio-pci>"}]
        if args["path"] == "/machine/peripheral"
        else []
    )
    peer.replies["qom-get"] = link
    other = "cdev" if there == "group" else "group"
    try:
        async with Qemu(peer.path) as qemu:
            auto = await plan_attach(qemu, [A], host=host)
            assert auto.path.value == there
            with pytest.raises(MixedVfioBackends) as refused:
                await handoff.attach(qemu, [A], path=other, host=host)
    finally:
        await peer.stop()
    assert str(refused.value).startswith(
        f"QEMU pid {refused.value.pid} already has VFIO devices on the {there} path "
        f"(/machine/peripheral/hostdev0); adding one on the {other} path would mix"
    )
    # Refused before anything reached QEMU: no fd, no device_add, no object-add.
    assert [c for c, _ in peer.received if c in ("getfd", "device_add", "object-add")] == []
    assert peer.fds_received == 0


# -- mediated devices ------------------------------------------------------------------------

MDEV, LOST = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001", "5c3f0d2e-1111-4a4a-9b9b-000000000001"


@pytest.fixture
def mdev_host(build_host: BuildHost) -> Host:
    """An edu on vfio-pci, an mtty parent with one mdev in group 20 and one without a group."""
    return build_host(
        Topology(
            devices=[Dev(A, driver="vfio-pci", group=1, **EDU)],
            mdev_parents=[Parent("mtty", types=[ParentType("mtty-2", "Dual port serial")])],
            mdevs=[
                Mediated(MDEV, "mtty", "mtty-2", driver="mtty", group=20),
                Mediated(LOST, "mtty", "mtty-2", driver="mtty"),
            ],
        )
    )


@pytest.mark.parametrize("path", ["cdev", "group", "group-iommufd"])
def test_a_plan_covers_an_mdev_by_its_uuid(mdev_host: Host, path: str) -> None:
    plan = make_plan([MDEV.upper(), A], path=path, coherency="ignore", host=mdev_host)
    mdev, edu = plan.devices
    assert (mdev.address, mdev.group, mdev.mdev, edu.mdev) == (MDEV, 20, True, False)
    assert mdev.sysfsdev == f"/sys/bus/mdev/devices/{MDEV}"
    assert plan.device(MDEV.upper()) is mdev
    group = plan.group(20)
    assert group.members == (MDEV,)
    assert not group.noiommu  # the kernel names it vfio-noiommu; it is an emulated group
    assert group.node == mdev_host.devfs / "vfio" / "20"
    if path == "cdev":
        assert mdev.file == mdev_host.devfs / "vfio" / "devices" / str(mdev.cdev)
    else:
        assert mdev.file == group.node
    assert plan.to_json()["devices"][0]["mdev"] is True  # type: ignore[index]


def test_an_mdevs_coherency_is_the_kernels_rule_not_a_probe(
    mdev_host: Host, kernel: FakeVfio
) -> None:
    plan = make_plan([MDEV], path="cdev", host=mdev_host)
    assert plan.coherent is False
    assert plan.notes == (
        f"mediated device {MDEV} (it has no IOMMU of its own): the IOMMU does not enforce "
        "DMA cache coherency",
    )
    assert kernel.calls == []  # nothing opened to ask
    with pytest.raises(CoherencyRefused, match=f"mediated device {MDEV}"):
        make_plan([MDEV], path="group", coherency="require", host=mdev_host)


@pytest.mark.parametrize(
    ("name", "error", "words"),
    [
        (LOST, MdevNotReady, f"mediated device {LOST} has no IOMMU group"),
        ("5c3f0d2e-1111-4a4a-9b9b-00000000000f", MdevNotFound, "no mediated device 5c3f0d2e"),
        ("5c3f0d2e-1111-4a4a-9b9b", InvalidMdevUuid, "is not a mediated device's UUID"),
    ],
)
def test_an_mdev_that_cannot_be_opened_is_named(
    mdev_host: Host, name: str, error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words):
        make_plan([name], host=mdev_host)


def test_group_takes_an_mdevs_uuid(mdev_host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    roots = ["--sysfs-root", str(mdev_host.sysfs), "--dev-root", str(mdev_host.devfs)]
    assert run(["group", MDEV.upper(), "--json", *roots]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["group"]["number"] == 20
    assert run(["group", LOST, *roots]) == 1
    assert f"mediated device {LOST} has no IOMMU group" in capsys.readouterr().err
    assert run(["group", "5c3f0d2e-1111-zz", *roots]) == 2
    assert "is not a mediated device's UUID" in capsys.readouterr().err
