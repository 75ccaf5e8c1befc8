"""SR-IOV VF counts on a fake tree: the record before each change, refusals, reset, recover.

The fake tree is not a kernel: a write to ``sriov_numvfs`` changes the file
and nothing else, so these tests stay within the VFs the tree was built
with (0 and the built count). What the kernel makes of the writes (VFs
appearing, EBUSY from M to N) is shown in the lab (tests/lab/test_sriov*.py).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fakesysfs import Dev, Topology

from kvmvfio import prepare
from kvmvfio.cli import run
from kvmvfio.errors import JournalError, UsageError
from kvmvfio.host import Host
from kvmvfio.prepare import sriov
from kvmvfio.prepare.journal import Entry, Journal, Record
from kvmvfio.prepare.owners import OwnerWatch

BuildHost = Callable[[Topology], Host]
PF, VF0, VF1 = "0000:00:04.0", "0000:00:10.0", "0000:00:10.1"


def _pf(**kw: object) -> Dev:
    args: dict[str, object] = {
        "driver": "igb", "group": 4, "vfs": 2, "totalvfs": 4, "vf_offset": 0x60,
        "vf_stride": 1, "vf_group": 10, "vf_device": 0x10CA,
    }  # fmt: skip
    args.update(kw)
    return Dev(PF, **args)  # type: ignore[arg-type]


@pytest.fixture
def host(build_host: BuildHost) -> Host:
    return build_host(Topology(devices=[_pf(), Dev("0000:00:03.0", driver="e1000e", group=3)]))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    folder.mkdir(mode=0o700)
    return folder


@pytest.fixture
def live() -> OwnerWatch:
    return OwnerWatch(proc=Path("/proc"))


@pytest.fixture
def hook() -> Iterator[list[int]]:
    calls: list[int] = []
    old = prepare.set_change_hook(calls.append)
    yield calls
    prepare.set_change_hook(old)


def _attr(host: Host, name: str) -> str:
    return (host.sysfs / "bus/pci/devices" / PF / name).read_text().strip()


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                h.update(str(path).encode() + path.read_bytes())
    return h.hexdigest()


def test_the_count_changes_after_its_record_and_reset_puts_it_back(
    host: Host, root: Path, hook: list[int]
) -> None:
    seen: list[sriov.VfRecord | None] = []
    prepare.set_change_hook(lambda n: seen.append(sriov.VfJournal(root).read(PF)))
    done = sriov.set_vfs(PF, 0, "vm1", host=host, root=root)
    assert done == sriov.VfChange(PF, before=2, after=0, autoprobe=False, vfs=())
    assert (_attr(host, "sriov_numvfs"), _attr(host, "sriov_drivers_autoprobe")) == ("0", "0")
    # Two host changes (autoprobe off, count 0), each made with the record already there.
    assert len(seen) == 2
    assert all(r == sriov.VfRecord(PF, "vm1", 0, None, 2, True, 0) for r in seen)
    again = sriov.reset_vfs(PF, "vm1", host=host, root=root)
    assert again is not None
    assert (again.before, again.after, again.vfs) == (0, 2, (VF0, VF1))
    assert (_attr(host, "sriov_numvfs"), _attr(host, "sriov_drivers_autoprobe")) == ("2", "1")
    assert sriov.VfJournal(root).read(PF) is None
    assert sriov.reset_vfs(PF, "vm1", host=host, root=root) is None


def test_setting_what_is_there_changes_nothing(host: Host, root: Path, hook: list[int]) -> None:
    done = sriov.set_vfs(PF, 2, "vm1", host_drivers=True, host=host, root=root)
    assert (done.before, done.after, done.vfs) == (2, 2, (VF0, VF1))
    assert hook == []
    assert sriov.VfJournal(root).read(PF) is None


@pytest.mark.parametrize(
    ("pf", "count", "owner", "error", "words"),
    [
        ("0000:00:03.0", 1, "vm1", sriov.NotSriovCapable, "has no SR-IOV capability"),
        (VF0, 0, "vm1", sriov.NotSriovCapable, f"is a VF (of PF {PF}), not a PF"),
        (PF, 5, "vm1", UsageError, "can have 0 to 4 VFs, not 5"),
        (PF, -1, "vm1", UsageError, "can have 0 to 4 VFs, not -1"),
        (PF, True, "vm1", UsageError, "must be a whole number"),
        (PF, "2", "vm1", UsageError, "must be a whole number"),
        (PF, 1, "two words", UsageError, "short name"),
        ("0000:00:09.0", 1, "vm1", Exception, "0000:00:09.0"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_and_changes_nothing(
    host: Host, root: Path, pf: str, count: object, owner: str, error: type[Exception], words: str
) -> None:
    before = _digest(host.sysfs), _digest(root)
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        sriov.set_vfs(pf, count, owner, host=host, root=root)  # type: ignore[arg-type]
    assert (_digest(host.sysfs), _digest(root)) == before


def test_vfs_in_use_keep_their_count(build_host: BuildHost, root: Path) -> None:
    host = build_host(Topology(devices=[_pf(vf_driver="vfio-pci")]))
    before = _digest(host.sysfs)
    with pytest.raises(sriov.VfsInUse, match=f"VF {VF0} is on vfio-pci") as refused:
        sriov.set_vfs(PF, 0, "vm1", host=host, root=root)
    assert [vf for vf, _ in refused.value.uses] == [VF0, VF1]
    assert "Release them first" in str(refused.value)
    assert _digest(host.sysfs) == before
    assert sriov.VfJournal(root).read(PF) is None


def test_a_vf_open_by_its_device_file_alone_is_named(build_host: BuildHost, root: Path) -> None:
    """No node under /dev says so; the kernel's count of enables does."""
    host = build_host(Topology(devices=[_pf(vf_driver="vfio-pci")]))
    (host.sysfs / "bus" / "pci" / "devices" / VF1 / "enable").write_bytes(b"1\n")
    uses = dict(sriov.vf_uses(host, host.device(PF), root=root, uid=None))
    assert uses[VF0] == "is on vfio-pci"
    assert uses[VF1].startswith(
        f"is on vfio-pci and is open in a process that has {VF1} open by its device file alone"
    )


def test_a_live_owners_vfs_are_not_taken(host: Host, root: Path, live: OwnerWatch) -> None:
    sriov.set_vfs(PF, 0, "vm1", owner_pid=os.getpid(), host=host, root=root, watch=live)
    with pytest.raises(sriov.PfClaimed, match="were made for 'vm1'"):
        sriov.set_vfs(PF, 2, "vm2", host=host, root=root, watch=live)
    with pytest.raises(sriov.PfClaimed):
        sriov.reset_vfs(PF, "vm2", host=host, root=root)
    kept = sriov.recover_vfs(host=host, root=root, watch=live)
    assert kept.restored == ()
    assert [pf for pf, _ in kept.skipped] == [PF]
    assert _attr(host, "sriov_numvfs") == "0"


def test_recover_puts_back_what_a_gone_owner_left(host: Host, root: Path) -> None:
    sriov.set_vfs(PF, 0, "vm1", owner_pid=os.getpid(), host=host, root=root, watch=OwnerWatch())
    # In the fake tree's /proc no process runs: the owner is gone.
    done = sriov.recover_vfs(host=host, root=root)
    assert [(c.pf, c.after) for c in done.restored] == [(PF, 2)]
    assert _attr(host, "sriov_numvfs") == "2"
    assert sriov.VfJournal(root).pfs() == []


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"[]", b'{"version": 1}', b'{"version": 1, "pf": "0000:00:04.0", "owner": "a", '
     b'"pid": 0, "pid_start": null, "before": 1e9, "autoprobe_before": true, "count": 0}',
     b'{"version": 1, "pf": "0000:00:05.0", "owner": "a", "pid": 0, "pid_start": null, '
     b'"before": 1, "autoprobe_before": 1, "count": 0}'],
)  # fmt: skip
def test_a_damaged_record_is_named_and_not_acted_on(host: Host, root: Path, raw: bytes) -> None:
    vfj = sriov.VfJournal(root)
    vfj.folder.write(vfj.file_name(PF), raw)
    with pytest.raises(JournalError, match=vfj.file_name(PF)):
        vfj.read(PF)
    done = sriov.recover_vfs(host=host, root=root)
    assert [pf for pf, _ in done.failed] == [PF]
    assert _attr(host, "sriov_numvfs") == "2"


def _cli(host: Host, root: Path, *args: str) -> int:
    roots = ["--sysfs-root", str(host.sysfs), "--dev-root", str(host.devfs), "--root", str(root)]
    return run(["sriov", *args, *roots])


def test_the_cli_says_what_it_did(
    host: Host, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli(host, root, "show", PF) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"PF {PF} (igb): 2 of 4 VFs, autoprobe on"
    assert f"VF 1: {VF1} (no driver), IOMMU group 11" in out
    assert _cli(host, root, "set", PF, "0", "--owner", "vm1") == 0
    assert capsys.readouterr().out == f"PF {PF}: 0 VFs (had 2) for vm1; VFs: none\n"
    assert _cli(host, root, "reset", PF, "--owner", "vm1") == 0
    assert capsys.readouterr().out == f"PF {PF}: 2 VFs again (had 0)\n"


@pytest.mark.parametrize("count", ["-1", "x", "1e3", "0x2", "\uff12", "99999999"])
def test_the_cli_refuses_a_count_that_is_not_one(
    host: Host, root: Path, count: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli(host, root, "set", PF, count, "--owner", "vm1") == 2
    err = capsys.readouterr().err
    assert "a VF count is a whole number from 0 to 65535" in err
    assert "Traceback" not in err
    assert _attr(host, "sriov_numvfs") == "2"


def test_a_pf_with_vfs_is_not_handed_out(host: Host, root: Path) -> None:
    before = _digest(host.sysfs)
    with pytest.raises(sriov.PfHasVfs, match=f"PF {PF} \\(igb\\) has 2 VFs: unbinding igb"):
        prepare.prepare([PF], "vm1", host=host, root=root)
    assert _digest(host.sysfs) == before
    assert prepare.status(host=host, root=root) == []


def test_a_pf_whose_vfs_are_in_use_is_not_handed_out(build_host: BuildHost, root: Path) -> None:
    host = build_host(Topology(devices=[_pf(vf_driver="vfio-pci")]))
    with pytest.raises(sriov.VfsInUse, match=f"VF {VF0} is on vfio-pci"):
        prepare.prepare([PF], "vm1", host=host, root=root)


def test_a_vf_of_a_pf_another_owner_holds_is_not_handed_out(host: Host, root: Path) -> None:
    # What prepare leaves when "pfuser" took the PF (a user-space PF driver).
    Journal(root).write(Record(4, "pfuser", 0, devices=[Entry(PF, "igb", None)]))
    before = _digest(host.sysfs)
    with pytest.raises(sriov.PfInUse) as refused:
        prepare.prepare([VF0], "vm1", host=host, root=root)
    assert str(refused.value).startswith(
        f"VF {VF0} is not handed out: its PF {PF} is held by 'pfuser'"
    )
    assert _digest(host.sysfs) == before
    assert [r.owner for r in prepare.status(host=host, root=root)] == ["pfuser"]
