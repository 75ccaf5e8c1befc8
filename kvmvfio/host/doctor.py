"""What each kvmvfio feature needs from the host, and whether this host has it.

The table behind it is ``docs/requirements.md``; :func:`diagnose` checks a
running host against it, per feature, and says for each missing piece how
to get it (a kernel option, a module to load, a command-line argument, a
package). It reuses :class:`~kvmvfio.host.support.HostSupport` (the VFIO,
iommufd and KVM files) and :class:`~kvmvfio.host.iommu.HostIommu` (the
IOMMUs, the command line), and adds what they do not read:

- ``/proc/sys/kernel/osrelease``, and the kernel's configuration when the
  host has it (``/proc/config.gz``, else ``/boot/config-RELEASE``);
- ``/sys/module/NAME`` (a loaded module, or a built-in one with
  parameters), ``/lib/modules/RELEASE/modules.builtin`` and ``modules.dep``
  (what is built in, what ``modprobe`` could load);
- the versions of QEMU, libvirt and the Python binding, from the
  :class:`Tools` the caller found (:func:`find_tools` runs ``--version``).

Everything is read, nothing is changed. Without a readable kernel
configuration some options cannot be told: such a check says *unknown*
rather than guess, and a feature is *missing* only for what was seen to be
missing.
"""

from __future__ import annotations

import enum
import errno
import gzip
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvmvfio.errors import KernelError
from kvmvfio.host.context import Host
from kvmvfio.host.iommu import HostIommu
from kvmvfio.host.support import HostSupport

#: The versions kvmvfio's features need (docs/requirements.md says where each comes from).
QEMU_IOMMUFD = (9, 0)  # the iommufd object and vfio-pci's fd=/iommufd=
QEMU_VF_TOKEN = (8, 1)  # vfio-pci's vf-token=
LIBVIRT_HOOK_DIR = (6, 5)  # hooks/qemu.d/
LIBVIRT_MONITOR_FILES = (8, 2)  # virDomainQemuMonitorCommandWithFiles
LIBVIRT_PYTHON = (9, 0)  # pyproject.toml's libvirt extra
PYTHON = (3, 11)
KERNEL_CDEV = (6, 6)  # VFIO device cdevs, and KVM_DEV_VFIO_FILE for them
KERNEL_IOMMUFD = (6, 2)  # /dev/iommu

_READ_LIMIT = 4 << 20
_VERSION = re.compile(r"([0-9]{1,4})\.([0-9]{1,4})(?:\.([0-9]{1,6}))?")
_RELEASE = re.compile(r"([0-9]{1,4})\.([0-9]{1,4})")
_GONE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENODEV, errno.EACCES, errno.EPERM})


class Status(enum.Enum):
    """A feature's (or a check's) verdict."""

    OK = "ok"
    MISSING = "missing"
    #: Nothing seen says it is missing, but not everything it needs could be seen.
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Check:
    """One thing a feature needs: whether the host has it, what was seen, how to get it."""

    name: str
    #: True: present; False: missing; None: cannot be told on this host.
    ok: bool | None
    seen: str
    #: How to get it; None when it is there.
    fix: str | None = None


@dataclass(frozen=True, slots=True)
class Feature:
    """A kvmvfio feature, its verdict and the checks behind it."""

    name: str
    title: str
    status: Status
    checks: tuple[Check, ...]
    #: A way to hand a device to a VM (the exit status depends on these).
    vfio_path: bool = False

    @property
    def missing(self) -> tuple[Check, ...]:
        """The checks that failed."""
        return tuple(c for c in self.checks if c.ok is False)


@dataclass(frozen=True, slots=True)
class Tool:
    """A program kvmvfio works with, as found on PATH."""

    name: str
    path: str | None = None
    #: The first line of its ``--version``; None when not found or it did not answer.
    text: str | None = None

    @property
    def version(self) -> tuple[int, ...] | None:
        """The version its ``--version`` line names, as numbers."""
        return parse_version(self.text)


@dataclass(frozen=True, slots=True)
class Tools:
    """What the features outside the kernel use: QEMU, libvirt, setfacl, Python."""

    qemu: Tool = Tool("qemu-system-x86_64")
    #: ``virtqemud`` (modular daemons) or ``libvirtd``, whichever was found first.
    libvirt: Tool = Tool("libvirtd")
    setfacl: Tool = Tool("setfacl")
    #: The libvirt Python binding's version (``libvirt-python``); None when absent.
    libvirt_python: str | None = None
    python: tuple[int, int, int] = (0, 0, 0)


def parse_version(text: str | None) -> tuple[int, ...] | None:
    """The first ``X.Y[.Z]`` in ``text`` as numbers; None when there is none."""
    if text is None:
        return None
    found = _VERSION.search(text)
    if found is None:
        return None
    return tuple(int(g) for g in found.groups() if g is not None)


def _shown(version: tuple[int, ...]) -> str:
    return ".".join(str(n) for n in version)


Runner = Callable[[Sequence[str]], str | None]


def _run_version(argv: Sequence[str]) -> str | None:
    """The first line ``argv`` prints; None when it fails or is silent (10 s at most)."""
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            errors="replace",
            timeout=10,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0][:200] if done.returncode == 0 and lines else None


def _tool(name: str, which: Callable[[str], str | None], run: Runner) -> Tool:
    path = which(name)
    if path is None:
        return Tool(name)
    return Tool(name, path, run([path, "--version"]))


def find_tools(
    which: Callable[[str], str | None] = shutil.which, run: Runner = _run_version
) -> Tools:
    """Find QEMU, libvirt's daemon and setfacl on PATH and ask their versions.

    Runs ``--version`` of each found (nothing else); a program not on PATH
    is "not found", never an error.
    """
    libvirt = _tool("virtqemud", which, run)
    if libvirt.path is None:
        libvirt = _tool("libvirtd", which, run)
    binding = None
    if importlib.util.find_spec("libvirt") is not None:
        try:
            binding = importlib.metadata.version("libvirt-python")
        except importlib.metadata.PackageNotFoundError:
            binding = "unknown"
    return Tools(
        qemu=_tool("qemu-system-x86_64", which, run),
        libvirt=libvirt,
        setfacl=Tool("setfacl", which("setfacl")),
        libvirt_python=binding,
        python=(sys.version_info[0], sys.version_info[1], sys.version_info[2]),
    )


# -- the kernel: release, configuration, modules ------------------------------


class ModuleState(enum.Enum):
    """What the host says of a kernel module."""

    LOADED = "loaded"
    BUILTIN = "built in"
    #: Not loaded, but ``modules.dep`` lists it: ``modprobe`` loads it.
    AVAILABLE = "loadable"
    #: The module lists are there and do not name it.
    ABSENT = "not in this kernel"
    #: Not loaded, and no module list says whether it could be.
    UNKNOWN = "not seen"


def _read(path: Path) -> bytes | None:
    """A file's bytes (at most 4 MiB), None when it is not there or not readable.

    Read in small pieces: a sysctl file refuses a large single read (ENOMEM).
    """
    try:
        with open(path, "rb") as f:
            parts, size = [], 0
            while size < _READ_LIMIT:
                part = f.read(65536)
                if not part:
                    break
                parts.append(part)
                size += len(part)
            return b"".join(parts)
    except OSError as err:
        if err.errno in _GONE or err.errno == errno.EISDIR:
            return None
        raise KernelError(err.errno or errno.EIO, "read", str(path)) from err


def _module_names(text: bytes | None, dep: bool) -> frozenset[str] | None:
    """Module names of ``modules.builtin`` / ``modules.dep`` (``vfio-pci`` as ``vfio_pci``)."""
    if text is None:
        return None
    names = set()
    for line in text.decode("utf-8", "replace").splitlines():
        path = line.split(":", 1)[0] if dep else line
        base = path.strip().rpartition("/")[2]
        if ".ko" in base:
            names.add(base.split(".ko", 1)[0].replace("-", "_"))
    return frozenset(names)


def parse_config(text: bytes) -> dict[str, str]:
    """A kernel ``.config``'s settings: ``{"CONFIG_VFIO": "y", ...}`` (unset ones left out)."""
    out = {}
    for line in text.decode("utf-8", "replace").splitlines():
        name, sep, value = line.partition("=")
        if sep and name.startswith("CONFIG_") and name.isidentifier():
            out[name] = value.strip().strip('"')
    return out


@dataclass(frozen=True, slots=True)
class Kernel:
    """The running kernel's release, configuration and modules, as far as the host shows them."""

    release: str | None
    #: The configuration's settings; None when the host shows none.
    config: dict[str, str] | None
    #: Where the configuration was read from.
    config_source: str | None
    builtin: frozenset[str] | None
    available: frozenset[str] | None
    #: Names in ``/sys/module``.
    sys_modules: frozenset[str]
    #: Names in ``/sys/module`` with an ``initstate`` (loadable modules, loaded).
    loadable_loaded: frozenset[str]

    @classmethod
    def probe(
        cls,
        sysfs: str | Path = "/sys",
        procfs: str | Path = "/proc",
        modules: str | Path = "/lib/modules",
        boot: str | Path = "/boot",
    ) -> Kernel:
        """Read the release, the configuration, the module lists and ``/sys/module``."""
        raw = _read(Path(procfs) / "sys" / "kernel" / "osrelease")
        release = raw.decode("ascii", "replace").strip() if raw else None
        if release is not None and ("/" in release or not release.isprintable()):
            release = None
        config, source = _config(Path(procfs), Path(boot), release)
        mod_dir = Path(modules) / release if release else None
        try:
            names = os.listdir(Path(sysfs) / "module")
        except OSError:
            names = []
        return cls(
            release=release,
            config=config,
            config_source=source,
            builtin=None
            if mod_dir is None
            else _module_names(_read(mod_dir / "modules.builtin"), dep=False),
            available=None
            if mod_dir is None
            else _module_names(_read(mod_dir / "modules.dep"), dep=True),
            sys_modules=frozenset(names),
            loadable_loaded=frozenset(
                n for n in names if os.path.exists(Path(sysfs) / "module" / n / "initstate")
            ),
        )

    @property
    def version(self) -> tuple[int, int] | None:
        """The release's major and minor numbers."""
        found = _RELEASE.match(self.release or "")
        return None if found is None else (int(found[1]), int(found[2]))

    def option(self, name: str) -> bool | None:
        """Whether ``CONFIG_NAME`` is ``y`` or ``m``; None without a configuration."""
        if self.config is None:
            return None
        return self.config.get(name) in ("y", "m")

    def module(self, name: str) -> ModuleState:
        """What the host says of module ``name`` (``vfio-pci`` or ``vfio_pci``)."""
        key = name.replace("-", "_")
        if key in self.loadable_loaded:
            return ModuleState.LOADED
        if key in (self.builtin or ()) or key in self.sys_modules:
            return ModuleState.BUILTIN
        if key in (self.available or ()):
            return ModuleState.AVAILABLE
        if self.builtin is not None and self.available is not None:
            return ModuleState.ABSENT
        return ModuleState.UNKNOWN


def _config(
    proc: Path, boot: Path, release: str | None
) -> tuple[dict[str, str] | None, str | None]:
    packed = _read(proc / "config.gz")
    if packed is not None:
        try:
            return parse_config(gzip.decompress(packed)), "/proc/config.gz"
        except (OSError, EOFError, zlib.error):
            pass
    if release is not None:
        text = _read(boot / f"config-{release}")
        if text is not None:
            return parse_config(text), f"/boot/config-{release}"
    return None, None


# -- the checks -----------------------------------------------------------------


def _module_fix(kernel: Kernel, module: str, option: str) -> str:
    state = kernel.module(module)
    if state is ModuleState.AVAILABLE:
        return (
            f"modprobe {module}; to load it at boot: "
            f"echo {module} > /etc/modules-load.d/{module}.conf"
        )
    if state is ModuleState.ABSENT or kernel.option(option) is False:
        return f"this kernel was built without it: boot one with {option}=y or =m"
    return f"modprobe {module} (the kernel needs {option}=y or =m)"


def _config_check(kernel: Kernel, name: str, option: str, seen: str | None, fix: str) -> Check:
    """A check that only the configuration answers (``seen``: an answer from the files)."""
    if seen is not None:
        return Check(name, True, seen)
    has = kernel.option(option)
    if has is None:
        return Check(name, None, f"{option}: no kernel configuration to read", None)
    if has:
        return Check(name, True, f"{option}={kernel.config.get(option) if kernel.config else ''}")
    return Check(name, False, f"{option} is not set", fix)


@dataclass(frozen=True, slots=True)
class Facts:
    """Everything :func:`diagnose` judges: read once, passed as values."""

    support: HostSupport
    iommu: HostIommu
    kernel: Kernel
    tools: Tools
    #: PCI functions with an SR-IOV capability (``sriov_totalvfs``).
    sriov_capable: int = 0
    #: ``/sys/bus/mdev`` exists (the mdev core); the mdev parents (``/sys/class/mdev_bus``).
    mdev_bus: bool = False
    mdev_parents: int = 0
    #: Group files in ``/dev/vfio`` (``/dev/vfio/N``).
    group_nodes: int = 0


def _base(f: Facts) -> list[Check]:
    s, iommu, k = f.support, f.iommu, f.kernel
    checks = []
    if iommu.groups_supported:
        checks.append(Check("iommu-support", True, "/sys/kernel/iommu_groups exists"))
    else:
        absent = iommu.absence()
        checks.append(
            Check(
                "iommu-support",
                False,
                "no /sys/kernel/iommu_groups",
                absent[1] if absent else "boot a kernel with CONFIG_IOMMU_SUPPORT",
            )
        )
    args = " ".join(iommu.kernel_args) or "no IOMMU arguments"
    if s.iommu:
        units = ", ".join(f"{u.name} ({u.kind.label})" for u in iommu.units)
        checks.append(Check("iommu", True, f"{units}; command line: {args}"))
    elif iommu.groups_supported:
        absent = iommu.absence()
        checks.append(
            Check(
                "iommu",
                False,
                f"/sys/class/iommu is empty; command line: {args}",
                absent[1] if absent else "turn the IOMMU on",
            )
        )
    if s.vfio_pci_driver:
        checks.append(
            Check("vfio-pci", True, f"vfio-pci driver registered ({k.module('vfio_pci').value})")
        )
    else:
        checks.append(
            Check(
                "vfio-pci",
                False,
                "no /sys/bus/pci/drivers/vfio-pci",
                _module_fix(k, "vfio-pci", "CONFIG_VFIO_PCI"),
            )
        )
    checks.append(_kvm_check(f))
    return checks


def _kvm_check(f: Facts) -> Check:
    if f.support.kvm:
        return Check("kvm", True, "/dev/kvm exists")
    vendor = f.iommu.cpu_vendor
    module = "kvm_amd" if vendor in ("AuthenticAMD", "HygonGenuine") else "kvm_intel"
    state = f.kernel.module(module)
    if state in (ModuleState.LOADED, ModuleState.BUILTIN):
        fix = (
            "KVM is there but made no /dev/kvm: turn virtualization (VT-x/AMD-V) on "
            "in the firmware setup"
        )
    else:
        fix = _module_fix(
            f.kernel, module, "CONFIG_KVM_AMD" if module == "kvm_amd" else "CONFIG_KVM_INTEL"
        )
    return Check("kvm", False, "no /dev/kvm", fix)


def _iommufd_check(f: Facts) -> Check:
    if f.support.iommufd:
        return Check("iommufd", True, "/dev/iommu exists")
    return Check(
        "iommufd",
        False,
        "no /dev/iommu",
        _module_fix(f.kernel, "iommufd", "CONFIG_IOMMUFD")
        + f" (Linux {_shown(KERNEL_IOMMUFD)} or later)",
    )


def _status(checks: Sequence[Check]) -> Status:
    if any(c.ok is False for c in checks):
        return Status.MISSING
    if any(c.ok is None for c in checks):
        return Status.UNKNOWN
    return Status.OK


def _paths(f: Facts) -> list[Feature]:
    base = _base(f)
    s, k = f.support, f.kernel
    if s.vfio_container:
        container = Check("container", True, "/dev/vfio/vfio exists")
    elif k.sys_modules & {"vfio"} or k.module("vfio") in (ModuleState.LOADED, ModuleState.BUILTIN):
        container = Check(
            "container",
            False,
            "VFIO is there but no /dev/vfio/vfio",
            "boot a kernel with CONFIG_VFIO_CONTAINER=y (or CONFIG_IOMMUFD_VFIO_CONTAINER=y)",
        )
    else:
        container = Check(
            "container", False, "no /dev/vfio/vfio", _module_fix(k, "vfio", "CONFIG_VFIO")
        )
    type1 = _config_check(
        k,
        "type1",
        "CONFIG_VFIO_IOMMU_TYPE1",
        _seen_module(k, "vfio_iommu_type1")
        or ("/dev/vfio/vfio from iommufd" if k.option("CONFIG_IOMMUFD_VFIO_CONTAINER") else None),
        "boot a kernel with CONFIG_VFIO_IOMMU_TYPE1 (the container's IOMMU driver)",
    )
    group_files = _config_check(
        k,
        "group-files",
        "CONFIG_VFIO_GROUP",
        "/dev/vfio/vfio exists (it needs the group files)"
        if s.vfio_container
        else (f"{f.group_nodes} group files in /dev/vfio" if f.group_nodes else None),
        "boot a kernel with CONFIG_VFIO_GROUP=y",
    )
    iommufd = _iommufd_check(f)
    cdev = _config_check(
        k,
        "device-cdev",
        "CONFIG_VFIO_DEVICE_CDEV",
        "VFIO device cdevs seen" if s.device_cdev else None,
        f"boot a kernel with CONFIG_VFIO_DEVICE_CDEV=y (Linux {_shown(KERNEL_CDEV)} or later)",
    )
    if cdev.ok is None and k.version is not None and k.version < KERNEL_CDEV:
        cdev = Check(
            cdev.name,
            False,
            f"Linux {k.release} predates VFIO device cdevs",
            f"boot Linux {_shown(KERNEL_CDEV)} or later with CONFIG_VFIO_DEVICE_CDEV=y",
        )
    elif cdev.ok is None:
        cdev = Check(
            cdev.name,
            None,
            "no device cdev yet: they show once a device is bound to "
            "vfio-pci, and the kernel configuration is not readable",
        )
    out = []
    for name, title, own in (
        ("group", "group + container (legacy type1)", [group_files, container, type1]),
        ("group-iommufd", "group on iommufd", [group_files, iommufd]),
        ("cdev", "device cdev + iommufd", [iommufd, cdev]),
    ):
        checks = (*base, *own)
        out.append(Feature(name, title, _status(checks), checks, vfio_path=True))
    return out


def _seen_module(k: Kernel, name: str) -> str | None:
    state = k.module(name)
    if state in (ModuleState.LOADED, ModuleState.BUILTIN):
        return f"{name} {state.value}"
    return None


def _version_check(name: str, tool: Tool, need: tuple[int, ...], what: str, fix: str) -> Check:
    if tool.path is None:
        return Check(name, False, f"{tool.name}: not found on PATH", fix)
    version = tool.version
    if version is None:
        return Check(name, None, f"{tool.path}: no version in its --version")
    if version >= need:
        return Check(name, True, f"{tool.name} {_shown(version)} (>= {_shown(need)}: {what})")
    seen = f"{tool.name} {_shown(version)} (< {_shown(need)}, so no {what})"
    return Check(name, False, seen, fix)


def _others(f: Facts, paths: list[Feature]) -> list[Feature]:
    t, k = f.tools, f.kernel
    by = {p.name: p for p in paths}
    any_group = any(by[n].status is Status.OK for n in ("group", "group-iommufd"))
    qemu_fix = "install QEMU (Debian: apt-get install qemu-system-x86)"
    qemu = (
        Check("qemu", True, f"{t.qemu.path}: {t.qemu.text}")
        if t.qemu.path
        else Check("qemu", False, "qemu-system-x86_64: not found on PATH", qemu_fix)
    )
    fds = _version_check(
        "qemu-fd",
        t.qemu,
        QEMU_IOMMUFD,
        "iommufd object, vfio-pci fd=",
        f"QEMU {_shown(QEMU_IOMMUFD)} or later for the iommufd path; older ones get "
        "group devices by host= with an ACL grant instead",
    )
    acl = (
        Check("setfacl", True, t.setfacl.path or "")
        if t.setfacl.path
        else Check(
            "setfacl",
            False,
            "setfacl: not found on PATH",
            "apt-get install acl (the group path grants QEMU the group file by a POSIX ACL)",
        )
    )
    by_fd = qemu.ok is True and fds.ok is True and by["cdev"].status is not Status.MISSING
    by_acl = qemu.ok is True and acl.ok is True and any_group
    handoff_checks = (qemu, fds, acl)
    handoff = Status.OK if by_fd or by_acl else Status.MISSING
    if handoff is Status.OK and by_fd and by["cdev"].status is Status.UNKNOWN and not by_acl:
        handoff = Status.UNKNOWN

    kvm_checks = [_kvm_check(f)]
    kvm_checks.append(
        _config_check(
            k,
            "kvm-vfio",
            "CONFIG_KVM_VFIO",
            "/dev/kvm exists (x86 KVM selects CONFIG_KVM_VFIO)" if f.support.kvm else None,
            "boot a kernel with CONFIG_KVM (which selects CONFIG_KVM_VFIO)",
        )
    )

    daemon_fix = "install libvirt (Debian: apt-get install libvirt-daemon-system)"
    hook = [_version_check("libvirt", t.libvirt, LIBVIRT_HOOK_DIR, "hooks/qemu.d/", daemon_fix)]
    agent = [
        _version_check(
            "libvirt-files",
            t.libvirt,
            LIBVIRT_MONITOR_FILES,
            "monitor commands with files",
            f"libvirt {_shown(LIBVIRT_MONITOR_FILES)} or "
            "later (the agent passes fds through virDomainQemuMonitorCommandWithFiles)",
        ),
        _binding_check(t.libvirt_python),
    ]

    sriov_seen = f"{f.sriov_capable} PCI functions with SR-IOV" if f.sriov_capable else None
    sriov = [
        _config_check(
            k, "pci-iov", "CONFIG_PCI_IOV", sriov_seen, "boot a kernel with CONFIG_PCI_IOV=y"
        )
    ]
    if sriov[0].ok is True and not f.sriov_capable:
        sriov.append(Check("sriov-device", None, "no PCI function with SR-IOV on this host"))

    if f.mdev_bus:
        mdev = [Check("mdev", True, "/sys/bus/mdev exists")]
    else:
        mdev = [
            Check("mdev", False, "no /sys/bus/mdev", _module_fix(k, "mdev", "CONFIG_VFIO_MDEV"))
        ]
    mdev.append(
        Check("mdev-parent", True, f"{f.mdev_parents} mdev parents")
        if f.mdev_parents
        else Check(
            "mdev-parent",
            None,
            "no device offers mdevs (a parent driver: i915 GVT-g, "
            "an NVIDIA vGPU host driver, mtty for tests)",
        )
    )

    usable = [p for p in paths if p.status is Status.OK]
    coherency = [
        Check("vfio-path", True, f"asked on the {usable[0].name} path")
        if usable
        else Check("vfio-path", False, "no VFIO path to ask on", "see the paths above")
    ]
    python = [
        Check("python", True, f"Python {_shown(t.python)}")
        if t.python >= PYTHON
        else Check(
            "python", False, f"Python {_shown(t.python)}", f"Python {_shown(PYTHON)} or later"
        )
    ]

    def feat(
        name: str, title: str, checks: Sequence[Check], status: Status | None = None
    ) -> Feature:
        return Feature(name, title, status or _status(checks), tuple(checks))

    return [
        feat("qemu-handoff", "fd handoff to a running QEMU", handoff_checks, handoff),
        feat("kvm", "KVM association (kvm-vfio device)", kvm_checks),
        feat("libvirt-hook", "libvirt hook (hooks/qemu.d)", hook),
        feat("agent", "libvirt agent, attach by virDomain", agent),
        feat("sriov", "SR-IOV VFs", sriov),
        feat("mdev", "mediated devices", mdev),
        feat("coherency", "DMA coherency question", coherency),
        feat("python", "Python", python),
    ]


def _binding_check(version: str | None) -> Check:
    fix = f"pip install 'kvmvfio[libvirt]' (libvirt-python {_shown(LIBVIRT_PYTHON)} or later)"
    if version is None:
        return Check("libvirt-python", False, "no libvirt Python module", fix)
    parsed = parse_version(version)
    if parsed is None:
        return Check("libvirt-python", None, f"libvirt module, version {version}")
    if parsed >= LIBVIRT_PYTHON:
        return Check("libvirt-python", True, f"libvirt-python {version}")
    return Check("libvirt-python", False, f"libvirt-python {version}", fix)


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """The host checked against the requirements, feature by feature."""

    kernel: Kernel
    kernel_args: tuple[str, ...]
    features: tuple[Feature, ...]
    tools: Tools

    @property
    def usable(self) -> bool:
        """True when at least one VFIO path has everything it needs."""
        return any(f.vfio_path and f.status is Status.OK for f in self.features)

    def feature(self, name: str) -> Feature:
        """The feature named ``name`` (KeyError if none)."""
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(name)


def diagnose(facts: Facts) -> Diagnosis:
    """Judge ``facts`` against kvmvfio's requirements; pure."""
    paths = _paths(facts)
    return Diagnosis(
        kernel=facts.kernel,
        kernel_args=facts.iommu.kernel_args,
        features=(*paths, *_others(facts, paths)),
        tools=facts.tools,
    )


def gather(
    host: Host,
    tools: Tools,
    modules: str | Path = "/lib/modules",
    boot: str | Path = "/boot",
) -> Facts:
    """Read what :func:`diagnose` judges from ``host``'s trees (and the module lists, ``/boot``)."""
    try:
        nodes = sum(1 for n in os.listdir(host.devfs / "vfio") if n.isdigit())
    except OSError:
        nodes = 0
    return Facts(
        support=host.support(),
        iommu=host.iommu(),
        kernel=Kernel.probe(host.sysfs, host.procfs, modules, boot),
        tools=tools,
        sriov_capable=sum(1 for d in host.devices() if d.sriov_totalvfs),
        mdev_bus=os.path.isdir(host.sysfs / "bus" / "mdev"),
        mdev_parents=len(host.mdev_parents()),
        group_nodes=nodes,
    )
