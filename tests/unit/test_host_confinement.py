"""AppArmor confinement (kvmvfio.host.confinement); the handoff's refusal: test_qemu_qmp.py.

The kernel's side (a confined QEMU refusing a group node, receiving passed
fds) is shown in the lab's `distro` topology (tests/lab/test_distro.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmvfio.host import confinement as conf
from kvmvfio.qemu import handoff


def _proc(tmp_path: Path, pid: int, label: str | None) -> Path:
    attr = tmp_path / str(pid) / "attr"
    attr.mkdir(parents=True)
    if label is not None:
        (attr / "apparmor").mkdir()
        (attr / "apparmor" / "current").write_text(label)
    return tmp_path


@pytest.mark.parametrize(
    ("label", "expected", "enforcing"),
    [
        (
            "libvirt-7c2d1a52-0f0e-4c1a-9a57-1b2c3d4e5f60 (enforce)\n",
            "libvirt-7c2d1a52-0f0e-4c1a-9a57-1b2c3d4e5f60",
            True,
        ),
        ("libvirtd (complain)\n", "libvirtd", False),
        ("unconfined\n", "unconfined", False),
    ],
)
def test_the_label_and_mode_are_read(
    tmp_path: Path, label: str, expected: str, enforcing: bool
) -> None:
    found = conf.confinement(7, _proc(tmp_path, 7, label))
    assert found is not None
    assert found.label == expected
    assert found.enforcing is enforcing
    assert found.confined is (expected != "unconfined")


def test_no_apparmor_is_none_and_an_odd_label_is_named(tmp_path: Path) -> None:
    assert conf.confinement(7, _proc(tmp_path, 7, None)) is None
    assert conf.confinement(8, tmp_path) is None  # gone
    _proc(tmp_path, 9, "two words (x) y\n")
    with pytest.raises(conf.PolicyUnreadable, match="not an AppArmor label"):
        conf.confinement(9, tmp_path)


def test_the_kernels_answer_is_read_bit_by_bit() -> None:
    both = conf.MAY_READ | conf.MAY_WRITE
    answer = "allow 0x{:08x}\ndeny 0x{:08x}\naudit 0x00000000\nquiet 0x00000000\n"
    assert conf.answer_allows(answer.format(0x6, 0), both)
    assert not conf.answer_allows(answer.format(0x4, 0), both)  # read only
    assert not conf.answer_allows(answer.format(0x6, 0x2), both)  # an explicit deny wins
    with pytest.raises(conf.PolicyUnreadable, match="answered"):
        conf.answer_allows("allow everything\n", both)


def test_an_unreachable_policy_is_named(tmp_path: Path) -> None:
    with pytest.raises(conf.PolicyUnreadable, match=r"\.access"):
        conf.allows("libvirt-x", "/dev/iommu", access=tmp_path / ".access")


def test_fds_from_an_unconfined_kvmvfio_are_not_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    plan_paths: list[list[str]] = []

    def refused(pid: int, paths: list[str]) -> None:
        plan_paths.append(paths)

    monkeypatch.setattr(handoff, "confinement", lambda pid: conf.Confinement("unconfined", None))
    monkeypatch.setattr(handoff, "refused_paths", refused)

    class Plan:  # what refuse_confined reads of a plan
        path = handoff.VfioPath.CDEV
        devices = (object(),)

    handoff.refuse_confined(object(), Plan())  # type: ignore[arg-type]
    assert plan_paths == []
