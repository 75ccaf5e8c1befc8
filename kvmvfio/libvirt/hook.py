"""The Python side of kvmvfio's libvirt hook: prepare, check, and release.

libvirt runs ``/etc/libvirt/hooks/qemu.d/kvmvfio NAME OP SUBOP EXTRA``
with the domain XML on stdin, for every event of every domain. The
installed file is a small POSIX sh front (``hook-front.sh``) that returns
at once for other events and for domains without kvmvfio's namespace, and
runs this module only for the others.

``prepare begin`` (before libvirt looks at the domain's hostdevs or starts
QEMU): read what the domain asks (:mod:`kvmvfio.libvirt.metadata`), refuse
before changing anything if a listed device's IOMMU group has another
member on a host driver that the domain does not list, then move the
devices to vfio-pci through the journal (:func:`kvmvfio.prepare.prepare`,
owner ``libvirt:NAME``), then open each group on its path to check
viability and the coherency policy. Any refusal puts back what this run
moved and exits 1 with one sentence on stderr, which libvirt shows as the
reason the domain did not start.

``release end`` (QEMU is gone): put the domain's devices back on their
original drivers, resetting those marked ``reset="yes"``.

libvirt's hook rules hold: the hook never calls back into libvirt, and
its stdout and stderr carry nothing but the error sentence. Decisions are
logged, one line each, to syslog when ``/dev/log`` exists (identifier
``kvmvfio-hook``: ``journalctl -t kvmvfio-hook``), else to
``/var/log/kvmvfio/hook.log``.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import stat
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, TextIO

from kvmvfio.errors import Blocker, GroupNotViable, Interface, KvmvfioError, speaking_to
from kvmvfio.host import Host, IommuGroup
from kvmvfio.host.mdev import is_uuid
from kvmvfio.host.rom import check_romfile
from kvmvfio.libvirt.metadata import (
    MAX_XML_BYTES,
    DomainRequest,
    Handoff,
    MetadataError,
    parse_domain,
    resolve,
)
from kvmvfio.prepare import (
    ClaimedBy,
    Prepared,
    Restored,
    groups_of,
    needs_moving,
    prepare,
    release,
)
from kvmvfio.prepare.journal import DEFAULT_ROOT
from kvmvfio.vfio.plan import read_mdev_of
from kvmvfio.vfio.policy import Coherency

# Named, not __name__: run as `python -m kvmvfio.libvirt.hook`, this module is __main__.
log = logging.getLogger("kvmvfio.libvirt.hook")

#: The (op, subop) pairs kvmvfio acts on; every other hook call is a no-op.
PREPARE = ("prepare", "begin")
RELEASE = ("release", "end")
LOG_FILE = Path("/var/log/kvmvfio/hook.log")
#: The hook's syslog identifier (``journalctl -t kvmvfio-hook``), also in each line of LOG_FILE.
LOG_IDENTIFIER = "kvmvfio-hook"
#: syslog's socket (journald's, on a systemd host).
SYSLOG_SOCKET = "/dev/log"

_STRICTNESS = {Coherency.IGNORE: 0, Coherency.WARN: 1, Coherency.REQUIRE: 2}


def _groups_of(host: Host, request: DomainRequest) -> dict[int, IommuGroup]:
    """The IOMMU groups of the request's PCI functions (an mdev's group is its own)."""
    return groups_of(host, [d.address for d in request.pci])


def refuse_unlisted(request: DomainRequest, groups: dict[int, IommuGroup]) -> None:
    """Refuse a group whose other members the host still drives and the domain does not list.

    Taking a device from a host driver is what a user must ask for by name:
    a GPU's audio function is listed with the GPU; an unrelated NIC that
    shares the group is not taken silently. Members with no driver, on a
    VFIO-safe driver, and bridges are fine. Raises :class:`GroupNotViable`.
    """
    listed = {d.address for d in request.devices}
    for number, group in groups.items():
        blockers = [
            Blocker(
                str(m.address),
                m.driver,
                f"on host driver {m.driver}, and domain {request.name!r} does not list it in "
                "its kvmvfio metadata; list it to have kvmvfio move it too "
                "(with handoff='none' if the VM does not use it)",
            )
            for m in group.members
            if str(m.address) not in listed and m.driver is not None and needs_moving(m)
        ]
        if blockers:
            raise GroupNotViable(str(number), blockers)


def check_roms(request: DomainRequest, host: Host) -> None:
    """Check each ROM file of a device kvmvfio prepares against the device: a
    ``<hostdev><rom file=...>``, and a device's ``romfile`` for the agent.

    libvirt hands the file to QEMU, which would load any file given (or fail
    at start with less to say); raises
    :class:`~kvmvfio.host.rom.InvalidRom` naming the file and the device
    before anything is moved.
    """
    wanted = {d.address for d in request.pci}
    for h in request.hostdevs:
        if h.rom is not None and h.address in wanted:
            check_romfile(h.rom, host.device(h.address))
    for d in request.pci:
        if d.romfile is not None:
            check_romfile(d.romfile, host.device(d.address))


def check_request(request: DomainRequest, host: Host, groups: dict[int, IommuGroup]) -> list[str]:
    """Open each group the way the domain's QEMU will, apply the policies, close it all.

    One session per IOMMU group, on its devices' path, under the strictest
    coherency policy among them. Returns the warnings. Raises what
    :class:`~kvmvfio.vfio.session.VfioSession` raises (not viable,
    :class:`~kvmvfio.errors.CoherencyRefused`, no interrupt remapping, ...).
    """
    from kvmvfio.vfio.session import VfioSession  # noqa: PLC0415 (cffi only when needed)

    by_group: dict[int, list[str]] = defaultdict(list)
    group_of = {str(m.address): n for n, g in groups.items() for m in g.members}
    for dev in request.devices:
        if is_uuid(dev.address):
            group_of[dev.address] = read_mdev_of(host, dev.address)[1]
    for dev in request.devices:
        if dev.handoff is not Handoff.NONE:  # moved only: no QEMU opens it
            by_group[group_of[dev.address]].append(dev.address)
    wanted = {d.address: d for d in request.devices}
    notes: list[str] = []
    for number, addrs in sorted(by_group.items()):
        paths = {wanted[a].path for a in addrs}
        if len(paths) > 1:
            raise MetadataError(
                request.name,
                f"the devices of IOMMU group {number} ({', '.join(addrs)}) ask for different "
                "paths; a group is opened one way at a time",
            )
        backend = paths.pop()
        policy = max((wanted[a].coherency for a in addrs), key=_STRICTNESS.__getitem__)
        with VfioSession(addrs, backend=backend, coherency=policy, host=host) as session:
            notes += session.unsafe
            log.info(
                "domain %s: IOMMU group %d opens on the %s path (coherent: %s, policy %s)",
                request.name,
                number,
                backend.value,
                session.coherent,
                policy.value,
            )
    return notes


def release_own(
    request: DomainRequest, *, host: Host | None = None, root: str | Path = DEFAULT_ROOT
) -> list[Restored]:
    """Release the groups of the domain's devices that the domain's owner holds.

    A group claimed by someone else is left alone (logged): this domain did
    not prepare it. Resets the devices marked ``reset``.
    """
    host = host or Host()
    request = resolve(request, held_only=True, host=host, root=root)
    reset = {d.address for d in request.devices if d.reset}
    done: list[Restored] = []
    seen: set[int] = set()
    for dev in request.pci:  # an mdev has no driver to go back to
        try:
            number = host.group_of(dev.address).number
        except KvmvfioError as err:
            log.warning("domain %s: cannot release %s: %s", request.name, dev.address, err)
            continue
        if number in seen:
            continue
        seen.add(number)
        try:
            done += release([dev.address], request.owner, reset=reset, host=host, root=root)
        except ClaimedBy as err:
            log.info("domain %s: left IOMMU group %d alone: %s", request.name, number, err)
    for r in done:
        log.info(
            "domain %s: %s back on %s%s",
            request.name,
            r.address,
            r.driver or "no driver",
            " after a reset" if r.reset else "",
        )
    return done


def prepare_domain(
    request: DomainRequest, *, host: Host | None = None, root: str | Path = DEFAULT_ROOT
) -> list[Prepared]:
    """Everything ``prepare begin`` does for ``request``; see the module docstring.

    On any refusal the devices this call moved are put back before the
    error propagates, so a domain that does not start leaves the host as
    it was.
    """
    host = host or Host()
    request = resolve(request, host=host, root=root)
    groups = _groups_of(host, request)
    refuse_unlisted(request, groups)
    check_roms(request, host)
    addrs = [d.address for d in request.pci]  # an mdev is on its VFIO driver from birth
    try:
        accept = {d.address: d.accept for d in request.pci if d.accept}
        reset = [d.address for d in request.pci if d.reset]  # journaled: any release honours it
        done = prepare(addrs, request.owner, accept=accept, host=host, root=root, reset=reset)
        for p in done:
            moved = ", ".join(f"{e.address} (from {e.driver or 'no driver'})" for e in p.moved)
            log.info("domain %s: IOMMU group %d on vfio-pci: %s", request.name, p.group, moved)
        # Read again: the members' drivers changed.
        notes = check_request(request, Host(host.sysfs, host.devfs), _groups_of(host, request))
    except BaseException:
        release_own(request, host=Host(host.sysfs, host.devfs), root=root)
        raise
    for note in notes:
        log.warning("domain %s: %s", request.name, note)
    return done


def _setup_logging() -> None:
    root = logging.getLogger("kvmvfio")
    root.setLevel(logging.INFO)
    handler: logging.Handler
    try:
        if stat.S_ISSOCK(os.stat(SYSLOG_SOCKET).st_mode):
            handler = logging.handlers.SysLogHandler(SYSLOG_SOCKET)
            # syslog's tag: journald files it as SYSLOG_IDENTIFIER (journalctl -t kvmvfio-hook)
            # and stamps the time itself.
            handler.ident = f"{LOG_IDENTIFIER}[{os.getpid()}]: "
            handler.setFormatter(logging.Formatter("%(message)s"))
        else:
            raise FileNotFoundError
    except OSError:
        try:
            LOG_FILE.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            handler = logging.FileHandler(LOG_FILE)
        except OSError:
            return  # no place to log: the decisions still show in the outcome
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {LOG_IDENTIFIER}[%(process)d]: %(message)s")
        )
    root.addHandler(handler)


def _read_bounded(stream: BinaryIO) -> bytes:
    data = stream.read(MAX_XML_BYTES + 1)
    return data if isinstance(data, bytes) else b""


def main(
    argv: Sequence[str] | None = None,
    stdin: BinaryIO | None = None,
    stderr: TextIO | None = None,
    *,
    host: Host | None = None,
    root: str | Path = DEFAULT_ROOT,
) -> int:
    """Run one hook call; return its exit status (libvirt stops the start on non-zero)."""
    args = list(sys.argv[1:] if argv is None else argv)
    err = stderr or sys.stderr
    if len(args) < 3:
        print("kvmvfio hook: expected NAME OP SUBOP [EXTRA] (run by libvirt)", file=err)
        return 2
    name, op, subop = args[:3]
    if (op, subop) not in (PREPARE, RELEASE):
        return 0
    stream = stdin if stdin is not None else getattr(sys.stdin, "buffer", None)
    try:
        data = _read_bounded(stream) if stream is not None else None
    except OSError as e:
        data, reason = None, f"cannot read stdin: {e.strerror}"
    else:
        reason = "stdin is closed"
    if data is None:
        print(f"kvmvfio hook: no domain XML from libvirt ({reason}); refused", file=err)
        return 1
    return handle(name, op, subop, data, err, host=host, root=root)


def handle(
    name: str,
    op: str,
    subop: str,
    data: bytes,
    err: TextIO,
    *,
    host: Host | None = None,
    root: str | Path = DEFAULT_ROOT,
) -> int:
    """Act on one hook call of domain ``name`` with its XML ``data``; return the exit status.

    What the hook process does once it has libvirt's input, and what the
    agent does for a call the hook's front handed to it
    (:mod:`kvmvfio.libvirt.hookserve`): the same parse (``data`` is bounded
    by :data:`MAX_XML_BYTES`), the same checks. A refusal is one line
    ``kvmvfio: SENTENCE`` written to ``err``, and status 1.
    """
    if (op, subop) not in (PREPARE, RELEASE):
        return 0
    try:
        # The devices come from the domain's metadata: advice names its attributes.
        with speaking_to(Interface.METADATA):
            request = parse_domain(data, expected_name=name)
            if request is None:
                return 0
            if (op, subop) == PREPARE:
                log.info(
                    "domain %s: prepare begin: %s",
                    name,
                    ", ".join(
                        [
                            f"{d.address} ({d.handoff.value}, {d.path.value})"
                            for d in request.devices
                        ]
                        + [
                            f"{p.count} VFs of {p.pf} ({p.template.handoff.value})"
                            for p in request.pools
                        ]
                    ),
                )
                prepare_domain(request, host=host, root=root)
            else:
                log.info("domain %s: release end", name)
                release_own(request, host=host, root=root)
    except KvmvfioError as e:
        log.error("domain %s: %s %s refused: %s", name, op, subop, e)
        print(f"kvmvfio: {e}", file=err)
        return 1
    except Exception as e:  # a bug: fail closed, keep the traceback out of libvirt's error
        log.exception("domain %s: %s %s failed", name, op, subop)
        print(f"kvmvfio: internal error in the hook ({type(e).__name__}: {e})", file=err)
        return 1
    return 0


if __name__ == "__main__":
    _setup_logging()  # libvirt's hook process only: tests and callers keep their own logging
    sys.exit(main())
