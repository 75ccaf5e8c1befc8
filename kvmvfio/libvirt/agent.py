"""``kvmvfio agent``: follow libvirt's domains and hand their devices to QEMU by fd.

For each running domain whose kvmvfio metadata lists devices with
``handoff="agent"``, the agent makes QEMU hold exactly those devices: it
prepares them (vfio-pci, journaled; a no-op when the hook did it at
``prepare begin``), checks them, and hands each to the domain's QEMU by file
descriptor through libvirt (:mod:`kvmvfio.libvirt.monitor`): iommufd
assignment for libvirt versions without iommufd hostdevs. A device taken
out of the domain's live metadata (``virsh metadata --live``) is unplugged
and released; when the domain stops, its devices go back to their drivers.

Nothing the agent knows lives only in its memory, so restarting it, or
libvirtd, loses nothing:

- what a domain wants is its (live) metadata, kept by libvirt;
- what QEMU holds is asked of QEMU (its ``kvmvfio-*`` devices);
- what the agent attached, and must one day take back, is written under
  ``/run/kvmvfio/agent/`` before each attach;
- what was moved between drivers is the journal's (:mod:`kvmvfio.prepare`).

What it did last is written for people, not read back: after each
reconciliation the agent rewrites its status file
(:mod:`kvmvfio.libvirt.status`, shown by ``kvmvfio agent status``).

On start, and after every reconnection, the agent reconciles every domain:
it attaches what is missing, leaves alone what is there, and releases what
belonged to domains that stopped while it was away. It follows libvirt's
events through libvirt-python's asyncio event loop integration
(``libvirtaio``) and reconciles everything again every ``resync`` seconds,
in case an event was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvmvfio.errors import Interface, KvmvfioError, QemuGone, shown, speaking_to
from kvmvfio.host import Host
from kvmvfio.host.mdev import canonical_name, is_uuid
from kvmvfio.libvirt.hook import refuse_unlisted
from kvmvfio.libvirt.hookserve import HookServer
from kvmvfio.libvirt.metadata import (
    NAMESPACE,
    OWNER_PREFIX,
    DeviceRequest,
    DomainRequest,
    Handoff,
    parse_domain,
    resolve,
)
from kvmvfio.libvirt.metadata import owner_of as _owner_of
from kvmvfio.libvirt.monitor import (
    RUN_DIR,
    DomainMonitor,
    VirDomain,
    call_libvirt,
    lookup_domain,
)
from kvmvfio.libvirt.status import (
    Action,
    AgentStatus,
    DeviceStatus,
    DomainStatus,
    Refusal,
    StatusFile,
    own_process,
)
from kvmvfio.prepare import prepare, release, release_owner
from kvmvfio.prepare.journal import DEFAULT_ROOT, Journal
from kvmvfio.prepare.rundir import RunFolder
from kvmvfio.qemu.handoff import attach, detach, kvmvfio_devices, qdev_id
from kvmvfio.vfio.policy import VfioPath

log = logging.getLogger(__name__)

#: libvirt's ids of the events the agent follows (libvirt-domain.h).
EVENT_LIFECYCLE = 0
EVENT_METADATA_CHANGE = 23
#: Lifecycle events after which a domain's devices may need attention.
_LIFECYCLE_STARTED, _LIFECYCLE_RESUMED, _LIFECYCLE_STOPPED, _LIFECYCLE_CRASHED = 2, 4, 5, 8


@dataclass
class DomainState:
    """What the agent attached to one domain and must take back, with the reset wish."""

    name: str
    uuid: str | None
    devices: dict[str, bool] = field(default_factory=dict)  # address -> reset on release


class StateStore:
    """The agent's own records, one JSON file per domain (written before each attach).

    They live in ``ROOT/agent`` and are opened like the journal, without
    trust (:mod:`kvmvfio.prepare.rundir`: no links followed, regular files
    of ``uid`` with mode 0600 only). A record that is unusable (not
    kvmvfio's, malformed, naming another domain) is logged and ignored: the
    agent then works from what libvirt and QEMU say.
    """

    def __init__(self, root: str | Path = DEFAULT_ROOT, uid: int | None = None) -> None:
        self.folder = RunFolder(root, "agent", uid)
        self.dir = self.folder.path

    @staticmethod
    def _file(name: str) -> str:
        if not name or "/" in name or name in (".", "..") or not name.isprintable():
            raise KvmvfioError(f"domain name {shown(repr(name))} cannot name a file")
        return f"{name}.json"

    def read(self, name: str) -> DomainState | None:
        file = self._file(name)
        try:
            raw = self.folder.read(file, _MAX_STATE)
            return None if raw is None else _parse_state(name, raw)
        except (KvmvfioError, ValueError, RecursionError) as err:
            log.error("agent record %s is unusable (%s); ignoring it", self.dir / file, err)
            return None

    def write(self, state: DomainState) -> None:
        self.folder.write(self._file(state.name), json.dumps(asdict(state)).encode())

    def remove(self, name: str) -> None:
        self.folder.remove(self._file(name))

    def names(self) -> list[str]:
        try:
            names = self.folder.names()
        except KvmvfioError as err:
            log.error("agent records: %s", err)
            return []
        return sorted(n[: -len(".json")] for n in names if n.endswith(".json") and n[0] != ".")


#: Largest agent record read (a domain with a few hundred devices is a few KiB).
_MAX_STATE = 1 << 16


def _parse_state(name: str, raw: bytes) -> DomainState:
    """The record of domain ``name``; ValueError for anything the agent never writes."""
    if len(raw) > _MAX_STATE:
        raise ValueError(f"larger than {_MAX_STATE} bytes")
    doc = json.loads(raw.decode("utf-8"))
    if not isinstance(doc, dict) or sorted(doc) != ["devices", "name", "uuid"]:
        raise ValueError("not an object with exactly 'name', 'uuid' and 'devices'")
    if doc["name"] != name:
        raise ValueError(f"it names domain {shown(repr(doc['name']), 80)}, not {shown(name)}")
    uuid = doc["uuid"]
    if uuid is not None and not (isinstance(uuid, str) and uuid.isprintable() and len(uuid) < 100):
        raise ValueError("'uuid' is not a UUID")
    devices = doc["devices"]
    if not isinstance(devices, dict) or len(devices) > 4096:
        raise ValueError("'devices' is not an object of PCI addresses and mdev UUIDs")
    for addr, reset in devices.items():
        # InvalidAddress and InvalidMdevUuid are ValueErrors too.
        if not isinstance(addr, str) or canonical_name(addr) != addr:
            raise ValueError(
                f"{shown(repr(addr), 80)} is not a PCI address or mdev UUID as the agent writes it"
            )
        if type(reset) is not bool:
            raise ValueError(f"the reset wish of {addr} is not true or false")
    return DomainState(name, uuid, dict(devices))


class Agent:
    """Keeps libvirt domains' QEMUs holding the devices their metadata asks for.

    ``connect`` opens a libvirt connection (``libvirt.open`` by default, a
    seam for tests). :meth:`run` serves until cancelled, reconnecting when
    libvirt goes away; :meth:`reconcile` does one domain's work and is what
    every event leads to.
    """

    def __init__(
        self,
        uri: str = "qemu:///system",
        *,
        root: str | Path = DEFAULT_ROOT,
        sysfs: str | Path = "/sys",
        devfs: str | Path = "/dev",
        run_dir: Path = RUN_DIR,
        resync: float = 60.0,
        detach_timeout: float = 60.0,
        connect: Callable[[str], Any] | None = None,
        serve_hook: bool = True,
    ) -> None:
        self.uri = uri
        self.root = Path(root)
        self.sysfs = sysfs
        self.devfs = devfs
        self.run_dir = run_dir
        self.resync = resync
        self.detach_timeout = detach_timeout
        self.store = StateStore(root)
        self.status_file = StatusFile(root)
        self._connect = connect
        #: Serves the hook's front (:mod:`kvmvfio.libvirt.hookserve`) while :meth:`run` runs.
        self.hook_server = HookServer(root, host=self._host) if serve_hook else None
        self._me = own_process()
        self._started = time.time()
        self._connected = False
        self._next_resync: float | None = None
        self._domains: dict[str, DomainStatus] = {}
        self._status_error: str | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: Set after the first full reconciliation of each connection (for tests and logs).
        self.ready = asyncio.Event()

    def _host(self) -> Host:
        return Host(self.sysfs, self.devfs)  # read afresh: drivers change under us

    # -- serving -------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until cancelled: connect, reconcile, follow events, reconnect."""
        import libvirt  # noqa: PLC0415 (only the agent needs libvirt)
        import libvirtaio  # noqa: PLC0415

        if libvirtaio.getCurrentImpl() is None:
            libvirtaio.virEventRegisterAsyncIOImpl(asyncio.get_running_loop())
        serving = self.hook_server is not None and await asyncio.to_thread(self.hook_server.start)
        try:
            await self._run(libvirt)
        finally:
            if serving:
                assert self.hook_server is not None
                self.hook_server.stop()

    async def _run(self, libvirt: Any) -> None:
        opener = self._connect or libvirt.open
        backoff = 1.0
        while True:
            try:
                conn = opener(self.uri)
            except libvirt.libvirtError as err:
                log.warning(
                    "cannot reach libvirt at %s (%s); retrying in %g s",
                    self.uri,
                    err.get_error_message(),
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 1.0
            log.info("connected to libvirt at %s", self.uri)
            self._connected = True
            try:
                await self._serve(conn)
            finally:
                self._connected = False
                self._publish()
                self.ready.clear()
                with contextlib.suppress(Exception):
                    conn.close()
            log.warning("lost the connection to libvirt at %s; reconnecting", self.uri)

    async def _serve(self, conn: Any) -> None:
        loop = asyncio.get_running_loop()
        closed = asyncio.Event()
        conn.registerCloseCallback(lambda *_: loop.call_soon(closed.set), None)
        with contextlib.suppress(Exception):
            conn.setKeepAlive(5, 3)  # a libvirtd that hangs counts as gone after ~15 s

        def lifecycle(_c: Any, dom: Any, event: int, _detail: int, _o: Any) -> None:
            if event in (_LIFECYCLE_STARTED, _LIFECYCLE_RESUMED, _LIFECYCLE_STOPPED,
                         _LIFECYCLE_CRASHED):  # fmt: skip
                self._schedule(conn, dom.name())

        def metadata(_c: Any, dom: Any, _type: int, nsuri: str | None, _o: Any) -> None:
            if nsuri in (None, NAMESPACE):
                self._schedule(conn, dom.name())

        ids = [
            conn.domainEventRegisterAny(None, EVENT_LIFECYCLE, lifecycle, None),
            conn.domainEventRegisterAny(None, EVENT_METADATA_CHANGE, metadata, None),
        ]
        try:
            await self.reconcile_all(conn)
            self.ready.set()
            while not closed.is_set():
                self._next_resync = time.time() + self.resync
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(closed.wait(), self.resync)
                if not closed.is_set():
                    await self.reconcile_all(conn)
        finally:
            for cb in ids:
                with contextlib.suppress(Exception):
                    conn.domainEventDeregisterAny(cb)
            for task in list(self._tasks):
                task.cancel()

    def _schedule(self, conn: Any, name: str) -> None:
        task = asyncio.ensure_future(self._reconcile_logged(conn, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reconcile_logged(self, conn: Any, name: str, *, publish: bool = True) -> None:
        """Reconcile ``name``, log what stopped it, and note it in the status.

        ``publish``: write the status file now (a full pass writes it once, at its end).
        """
        refusal = None
        try:
            await self.reconcile(conn, name)
        except KvmvfioError as err:
            log.error("domain %s: %s", name, err)
            refusal = self._refusal(err)
        except Exception as err:
            log.exception("domain %s: reconciling failed", name)
            refusal = self._refusal(err, f"reconciling failed: {err}")
        if name in self._domains or refusal is not None:
            self._set_domain(name, refusal=refusal)
        if publish:
            self._publish()

    # -- reconciling ---------------------------------------------------------------------

    async def reconcile_all(self, conn: Any) -> None:
        """Reconcile every domain libvirt runs, and every one kvmvfio still holds for."""
        domains = await call_libvirt(conn.listAllDomains, 0)
        names = {d.name() for d in domains}
        held = {r.owner[len(OWNER_PREFIX) :] for r in Journal(self.root).records()}
        held = {n for n in held if n}
        every = names | held | set(self.store.names())
        for name in sorted(every):
            await self._reconcile_logged(conn, name, publish=False)
        # A domain libvirt no longer knows, with nothing left to release, leaves the status.
        for name in set(self._domains) - every:
            del self._domains[name]
        self._publish()

    async def reconcile(self, conn: Any, name: str) -> None:
        """Bring one domain's QEMU to what its metadata asks; release a stopped one's devices."""
        # The devices come from the domain's metadata: advice in refusals names its attributes.
        with speaking_to(Interface.METADATA):
            await self._reconcile(conn, name)

    async def _reconcile(self, conn: Any, name: str) -> None:
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            dom = await call_libvirt(lookup_domain, conn, name)
            if dom is None or not await call_libvirt(dom.isActive):
                self._release_stopped(name)
                if name in self._domains:
                    self._set_domain(name, running=False)
                return
            xml = await call_libvirt(dom.XMLDesc, 0)
            request = parse_domain(xml)
            if request is not None:
                request = resolve(request, host=self._host(), root=self.root)
            wanted = {d.address: d for d in request.by_handoff(Handoff.AGENT)} if request else {}
            state = self.store.read(name)
            uuid = await call_libvirt(dom.UUIDString)
            if state is not None and state.uuid not in (None, uuid):
                # Another domain of that name ran and stopped while we were away.
                self._release_stopped(name)
                state = None
            if state is None:
                if not wanted:
                    if name in self._domains:
                        self._set_domain(name, uuid=uuid, running=True)
                        for addr in self._domains[name].devices:
                            self._note(name, addr.address, wanted=False, held=False)
                    return
                state = DomainState(name, uuid)
            self._set_domain(name, uuid=uuid, running=True)
            try:
                await self._converge(dom, state, request, wanted)
            except QemuGone as err:
                # Starting up (no QEMU yet) or stopping: the next event brings us back.
                log.info("domain %s: QEMU not reachable now (%s)", name, err)

    async def _converge(
        self,
        dom: VirDomain,
        state: DomainState,
        request: DomainRequest | None,
        wanted: dict[str, DeviceRequest],
    ) -> None:
        name = state.name
        async with DomainMonitor(dom, run_dir=self.run_dir) as monitor:
            present = set(await kvmvfio_devices(monitor))
            # Take back what we attached and the domain no longer lists.
            for addr in [a for a in state.devices if a not in wanted]:
                if qdev_id(addr) in present:
                    await detach(monitor, [addr], timeout=self.detach_timeout, host=self._host())
                    log.info("domain %s: detached %s (no longer in its metadata)", name, addr)
                self._release_addresses(name, [addr], state.devices[addr], wanted)
                del state.devices[addr]
                self.store.write(state)
                self._note(name, addr, Action.RELEASED, wanted=False, held=False)
            # Adopt what is there already (a restart of ours between attach and record).
            for addr, dev in wanted.items():
                if qdev_id(addr) in present and addr not in state.devices:
                    state.devices[addr] = dev.reset
                    self.store.write(state)
                    self._note(name, addr, Action.ADOPTED, dev=dev, held=True)
            for addr, dev in wanted.items():
                if qdev_id(addr) in present:
                    self._note(name, addr, Action.UNCHANGED, dev=dev, held=True, keep=True)
                    continue
                assert request is not None  # it lists addr
                try:
                    await self._attach_one(monitor, state, request, addr, dev)
                except QemuGone:
                    raise
                except KvmvfioError as err:
                    # One device's refusal (coherency, a busy group...) must not
                    # keep the domain's other devices from it.
                    log.error(
                        "domain %s: %s not attached: %s (tried again at the next reconcile)",
                        name,
                        addr,
                        err,
                    )
                    self._note(
                        name, addr, Action.REFUSED, dev=dev, held=False, refusal=self._refusal(err)
                    )
                else:
                    self._note(name, addr, Action.ATTACHED, dev=dev, held=True)
        if not state.devices:
            self.store.remove(name)

    async def _attach_one(
        self,
        monitor: DomainMonitor,
        state: DomainState,
        request: DomainRequest,
        addr: str,
        dev: DeviceRequest,
    ) -> None:
        host = self._host()
        if not is_uuid(addr):  # an mdev is on its VFIO driver from birth: nothing to move
            group = host.group_of(addr)
            refuse_unlisted(request, {group.number: group})
            owner = _owner_of(state.name)
            listed = [d.address for d in request.pci]  # checked above, for the domain
            prepare(
                [addr],
                owner,
                accept={addr: dev.accept},
                host=host,
                root=self.root,
                listed=listed,
                reset=[addr] if dev.reset else [],
            )
        state.devices[addr] = dev.reset
        self.store.write(state)  # before QEMU has it: a crash now still leads back
        (done,) = await attach(
            monitor,
            [addr],
            path=VfioPath.CDEV,
            coherency=dev.coherency,
            host=host,
            romfiles={addr: dev.romfile} if dev.romfile else None,
            no_rombar=None if dev.rombar else [addr],
        )
        log.info(
            "domain %s: attached %s by fd to QEMU pid %d as %s on %s",
            state.name,
            addr,
            monitor.pid,
            done.qdev_id,
            done.bus,
        )

    def _release_addresses(
        self, name: str, addrs: list[str], reset: bool, wanted: dict[str, DeviceRequest]
    ) -> None:
        host = self._host()
        keep = {host.group_of(a).number for a in wanted if not is_uuid(a)}
        for addr in addrs:
            if is_uuid(addr) or host.group_of(addr).number in keep:
                continue  # another device of the group is still the domain's
            resets = [addr] if reset else []
            for r in release([addr], _owner_of(name), reset=resets, host=host, root=self.root):
                log.info("domain %s: %s back on %s", name, r.address, r.driver or "no driver")

    def _release_stopped(self, name: str) -> None:
        state = self.store.read(name)
        reset = [a for a, r in state.devices.items() if r] if state else []
        for r in release_owner(_owner_of(name), reset=reset, host=self._host(), root=self.root):
            log.info("domain %s (stopped): %s back on %s", name, r.address, r.driver or "no driver")
        self.store.remove(name)
        if state is not None and state.devices:
            self._set_domain(name, uuid=state.uuid, running=False)
            for addr in state.devices:
                self._note(name, addr, Action.RELEASED, wanted=False, held=False)

    # -- the status file (for people: never read back) -----------------------------------

    def _refusal(self, err: BaseException, message: str | None = None) -> Refusal:
        now = time.time()
        retry = self._next_resync if self._next_resync and self._next_resync > now else None
        text = str(err) if message is None else message
        return Refusal(text, type(err).__name__, now, retry or now + self.resync)

    def _set_domain(self, name: str, **changes: Any) -> None:
        now = time.time()
        old = self._domains.get(name) or DomainStatus(name, None, True, now)
        self._domains[name] = dataclasses.replace(old, checked=now, **changes)

    def _note(
        self,
        name: str,
        addr: str,
        action: Action | None = None,
        *,
        dev: DeviceRequest | None = None,
        held: bool,
        wanted: bool = True,
        refusal: Refusal | None = None,
        keep: bool = False,
    ) -> None:
        """Record what was done with device ``addr`` of domain ``name`` (``keep``: if nothing yet).

        Without ``action``, the last action stays and only what was seen changes.
        """
        domain = self._domains.get(name) or DomainStatus(name, None, True, time.time())
        devices = {d.address: d for d in domain.devices}
        old = devices.get(addr)
        now = time.time()
        if old is not None and (action is None or (keep and old.action != Action.REFUSED)):
            new = dataclasses.replace(old, held=held, wanted=wanted)
        else:
            new = DeviceStatus(
                address=addr,
                handoff=(dev.handoff if dev else Handoff.AGENT).value,
                path=VfioPath.CDEV.value,
                wanted=wanted,
                held=held,
                action=action or Action.UNCHANGED,
                at=now,
                refusal=refusal,
            )
        devices[addr] = new
        ordered = tuple(devices[a] for a in sorted(devices))
        self._domains[name] = dataclasses.replace(domain, devices=ordered)

    def status(self) -> AgentStatus:
        """What the agent knows now, as its status file says it."""
        return AgentStatus(
            pid=self._me.pid,
            pid_start=self._me.start,
            started=self._started,
            updated=time.time(),
            uri=self.uri,
            connected=self._connected,
            resync=self.resync,
            domains=tuple(self._domains[n] for n in sorted(self._domains)),
        )

    def _publish(self) -> None:
        try:
            self.status_file.write(self.status())
        except KvmvfioError as err:  # only a report: the agent's work goes on
            if str(err) != self._status_error:  # once, not at every reconcile
                log.warning("agent status not written: %s", err)
            self._status_error = str(err)
        else:
            self._status_error = None
