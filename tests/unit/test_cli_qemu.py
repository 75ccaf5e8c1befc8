"""``kvmvfio attach``/``detach``: which QEMU, checked before anything is contacted."""

from __future__ import annotations

import pytest

from kvmvfio.cli import run
from kvmvfio.errors import LibvirtError, UsageError
from kvmvfio.libvirt.monitor import open_domain


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = run(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["attach", "03:00.0"], "say which QEMU: --qmp SOCKET with --pid or --pidfile"),
        (["attach", "03:00.0", "--qmp", "/run/x.qmp"], "say which QEMU"),
        (["detach", "03:00.0", "--pid", "1"], "say which QEMU"),
        (["attach", "03:00.0", "--domain", "vm1", "--qmp", "/run/x.qmp"], "give no --qmp"),
        (["attach", "03:00.0", "--domain", "vm1", "--path", "group"],
         "--path group cannot go through libvirt (domain 'vm1')"),
        (["attach", "03:00.0", "--domain", "vm1", "--path", "legacy"],
         "--path legacy is now spelled --path group (the old spelling still works)\n"
         "kvmvfio: --path group cannot go through libvirt (domain 'vm1')"),
        (["attach", "3:0.9", "--domain", "vm1"], "'3:0.9' is not a PCI address"),
    ],
)  # fmt: skip
def test_bad_arguments_are_refused_before_qemu_or_libvirt_is_contacted(
    args: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run(args, capsys)
    assert code == 2
    assert said in err
    assert "Traceback" not in err


class FakeError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message

    def get_error_code(self) -> int:
        return self.code

    def get_error_message(self) -> str:
        return self.message


class FakeConn:
    def __init__(self, names: tuple[str, ...]) -> None:
        self.names, self.closed = names, False

    def lookupByName(self, name: str) -> str:
        if name not in self.names:
            raise FakeError(42, f"Domain not found: no domain with matching name '{name}'")
        return f"dom:{name}"

    def close(self) -> int:
        self.closed = True
        return 0


def test_open_domain_names_the_uri_and_domain_and_always_closes() -> None:
    conn = FakeConn(("vm1",))
    with open_domain("qemu:///system", "vm1", opener=lambda uri: conn) as dom:
        assert dom == "dom:vm1"
        assert not conn.closed
    assert conn.closed

    conn = FakeConn(())
    with (
        pytest.raises(UsageError, match="libvirt at qemu:///system has no domain named 'vm2'"),
        open_domain("qemu:///system", "vm2", opener=lambda uri: conn),
    ):
        pass
    assert conn.closed

    def refuse(uri: str) -> None:
        raise FakeError(38, "Failed to connect socket to '/run/libvirt/virtqemud-sock'")

    with (
        pytest.raises(LibvirtError) as refused,
        open_domain("qemu:///system", "vm1", opener=refuse),
    ):
        pass
    assert "a connection to qemu:///system" in str(refused.value)
    assert "virtqemud-sock" in str(refused.value)
