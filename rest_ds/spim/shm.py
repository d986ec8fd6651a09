"""Shared-memory transport between the sp ranks of one host (CPU tensors).

Why: gloo carries even the messages between two processes of one host through
its TCP loopback and its own I/O threads. SPIM's traffic on a CPU host is many
small messages (two BatchNorm collectives per norm layer, a halo exchange per
convolution), and there gloo's fixed cost dominates: about 0.5-0.7 ms per
collective and 1.5-4.5 ms of CPU per halo exchange, on cores the ranks need
for compute. Here the sender copies its payload into a mailbox of a shared
segment and bumps a counter; the receiver waits for the counter and copies
out: no thread, no system call unless a rank has to wait.

Scope and fallbacks (every rank of a group makes the same choice, so the two
transports never disagree about where a message goes):

* CPU tensors of an sp group whose ranks all run on one host (their
  :func:`host_id`, gathered once when the mesh is built, so every rank decides
  from the same list) and all map one segment in ``/dev/shm`` (rank 0 creates
  it, the others must open it and read back its token). Otherwise, and with
  ``REST_DS_SHM=0``, gloo.
* x86-64 only: its total store order makes "payload written, then counter
  bumped" visible to the other cores in that order (payloads move in chunks
  of at most 1 MiB, written with ordinary stores; Intel SDM 8.2.4: data, then
  a separate flag). Other ISAs need fences Python cannot issue: gloo.
* Point-to-point messages stream through two slots per ordered pair of grid
  neighbours (any size, in chunks); a pair that are not neighbours uses gloo.
  Collectives (all-reduce, all-gather) up to ``collective_bytes`` per rank go
  through shared slots, larger ones through gloo.

Ordering: messages between a pair arrive in the order they were sent, as with
gloo's untagged point-to-point. Collectives are numbered; each rank writes call
``n`` into slot ``n % 2``, which is free because every peer has entered call
``n - 1`` and so has finished reading call ``n - 2``.

Waiting spins for a few microseconds, then yields the core (ranks may
outnumber cores), then sleeps in short steps; it raises :class:`SPIMError` when
a peer process has exited or after the collective timeout, never hangs.
"""
from __future__ import annotations

import os
import platform
import secrets
import time
from dataclasses import dataclass

import numpy as np
import torch

from .errors import SPIMError

_LINE = 64  # bytes: each counter on its own cache line (no false sharing between ranks)
# Chunks stay far below glibc's threshold for non-temporal (weakly ordered)
# stores in memcpy (3/4 of a thread's share of the L3), so payloads are written
# with ordinary stores, which x86 makes visible before the later counter store.
_MAX_SLOT = 1 << 20


def host_id() -> str:
    """This process's host identity for transport and placement decisions:
    ``$REST_DS_HOST_ID`` when set (containers of one machine that do not share
    /dev/shm, or tests that fake several nodes on one machine), else the host name."""
    import socket

    return os.environ.get("REST_DS_HOST_ID") or socket.gethostname()


def enabled_here() -> bool:
    """Whether this process may use the shared-memory transport at all."""
    return os.environ.get("REST_DS_SHM", "1") != "0" and platform.machine().lower() in ("x86_64", "amd64")


@dataclass(frozen=True)
class _Layout:
    """Offsets (bytes) in the segment; pure function of the group's shape."""

    sp: int
    pairs: tuple[tuple[int, int], ...]  # ordered (src, dst) sp indices with a mailbox
    slot_bytes: int
    collective_bytes: int

    @property
    def n_counters(self) -> int:
        # per pair: seq (chunks written), ack (chunks read); per rank: collective count; one token word
        return 2 * len(self.pairs) + self.sp + 1

    @property
    def header_bytes(self) -> int:
        return self.n_counters * _LINE

    def mailbox(self, pair_index: int, slot: int) -> int:
        return self.header_bytes + (2 * pair_index + slot) * self.slot_bytes

    def collective(self, rank: int, slot: int) -> int:
        return self.header_bytes + 2 * len(self.pairs) * self.slot_bytes + (2 * rank + slot) * self.collective_bytes

    @property
    def total_bytes(self) -> int:
        return self.collective(self.sp, 0)


def neighbour_pairs(grid: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """Ordered (src, dst) sp indices of the grid cells that touch (corners included)."""
    ph, pw = grid
    out = []
    for s in range(ph * pw):
        r, c = divmod(s, pw)
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                i, j = r + dr, c + dc
                if (dr, dc) != (0, 0) and 0 <= i < ph and 0 <= j < pw:
                    out.append((s, i * pw + j))
    return tuple(out)


class _Waiter:
    """Back-off for one wait: spin, then yield, then short sleeps; watches the
    deadline and the peers' processes."""

    def __init__(self, channel: "ShmChannel", what: str):
        self.ch, self.what = channel, what
        self.t0 = time.perf_counter()
        self.next_check = self.t0 + 0.5

    def pause(self) -> None:
        now = time.perf_counter()
        waited = now - self.t0
        if waited < 2e-5:
            return
        if waited < 5e-3:
            os.sched_yield()
            return
        time.sleep(5e-5)
        if now > self.next_check:
            self.next_check = now + 0.5
            self.ch._check_peers(self.what, waited)


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except OSError:
        return True  # cannot tell (e.g. no /proc): rely on the timeout


class _Send:
    __slots__ = ("dst", "flat", "single", "done", "numel")

    def __init__(self, dst: int, t: torch.Tensor):
        self.dst, self.numel, self.done = dst, t.numel() * t.element_size(), 0
        self.single = t  # copied straight from its strides when it fits one slot
        self.flat = None


class _Recv:
    __slots__ = ("src", "buf", "flat", "done", "numel")

    def __init__(self, src: int, buf: torch.Tensor):
        self.src, self.buf, self.numel, self.done = src, buf, buf.numel() * buf.element_size(), 0
        self.flat = None


class ShmChannel:
    """The shared segment of one sp group, as seen by sp rank ``index``.

    Ranks are sp indices (0..sp-1); the methods that take peers take global ranks."""

    def __init__(self, seg: torch.Tensor, layout: _Layout, index: int, global_ranks: tuple[int, ...],
                 timeout_s: float, pids: tuple[int, ...] | None):
        self.seg, self.layout, self.index = seg, layout, index
        self._ctr = seg[: layout.header_bytes].view(torch.int64).numpy()  # numpy: ~100 ns per counter access
        self._stride = _LINE // 8
        self._pair = {p: i for i, p in enumerate(layout.pairs)}
        self._rank_index = {g: i for i, g in enumerate(global_ranks)}
        self.timeout_s, self.pids = timeout_s, pids  # pids None: peers' processes not visible here
        self._sent = {p: 0 for p in layout.pairs}  # chunks this rank wrote / read per pair
        self._read = {p: 0 for p in layout.pairs}
        self._calls = 0
        self._pending = None  # wait() of a posted collective not yet completed
        # a collective's slot views by (parity, dtype, shape): a model reuses a few shapes every
        # step, and narrow + view + view cost ~5 us per rank and call on a CPU
        self._slot_views: dict = {}
        self._call_at = [self._at(self._call_slot(r)) for r in range(layout.sp)]

    # -- counters -----------------------------------------------------------------
    def _at(self, k: int) -> int:
        return k * self._stride

    def _seq_slot(self, pair: int) -> int:
        return 2 * pair

    def _ack_slot(self, pair: int) -> int:
        return 2 * pair + 1

    def _call_slot(self, rank: int) -> int:
        return 2 * len(self.layout.pairs) + rank

    def _bytes(self, offset: int, n: int) -> torch.Tensor:
        return self.seg.narrow(0, offset, n)

    def has_mailbox(self, src_global: int, dst_global: int) -> bool:
        return (self._rank_index[src_global], self._rank_index[dst_global]) in self._pair

    def _check_peers(self, what: str, waited: float) -> None:
        if self.pids is not None:
            for r, pid in enumerate(self.pids):
                if r != self.index and not _pid_alive(pid):
                    raise SPIMError(f"{what}: sp rank {r} (pid {pid}) has exited while sp rank {self.index} "
                                    f"waited for it; see that rank's error")
        if waited > self.timeout_s:
            raise SPIMError(f"{what}: sp rank {self.index} waited {waited:.0f} s for its peers "
                            f"(collective timeout {self.timeout_s:.0f} s); a rank is stuck or took another path")

    # -- point-to-point -----------------------------------------------------------
    def _try_send(self, s: _Send) -> bool:
        """Write as many chunks of ``s`` as there are free slots; True when all are written."""
        pair = (self.index, s.dst)
        pi = self._pair[pair]
        cap = self.layout.slot_bytes
        while s.done < s.numel:
            n = self._sent[pair]  # chunks written so far; chunk n goes to slot n % 2
            if n - int(self._ctr[self._at(self._ack_slot(pi))]) >= 2:
                return False  # both slots still hold unread chunks
            k = min(cap, s.numel - s.done)
            slot = self._bytes(self.layout.mailbox(pi, n % 2), k)
            if s.done == 0 and k == s.numel:
                slot.view(s.single.dtype).view(s.single.shape).copy_(s.single)
            else:
                if s.flat is None:
                    s.flat = s.single.contiguous().view(-1).view(torch.uint8)
                slot.copy_(s.flat.narrow(0, s.done, k))
            s.done += k
            self._sent[pair] = n + 1
            self._ctr[self._at(self._seq_slot(pi))] = n + 1  # published after the payload (x86 TSO)
        s.single = s.flat = None
        return True

    def _try_recv(self, r: _Recv) -> bool:
        pair = (r.src, self.index)
        pi = self._pair[pair]
        cap = self.layout.slot_bytes
        while r.done < r.numel:
            n = self._read[pair]
            if int(self._ctr[self._at(self._seq_slot(pi))]) <= n:
                return False
            k = min(cap, r.numel - r.done)
            slot = self._bytes(self.layout.mailbox(pi, n % 2), k)
            if r.done == 0 and k == r.numel:
                r.buf.copy_(slot.view(r.buf.dtype).view(r.buf.shape))
            else:
                if r.flat is None:
                    r.flat = r.buf.view(-1).view(torch.uint8) if r.buf.is_contiguous() else \
                        torch.empty(r.numel, dtype=torch.uint8)
                r.flat.narrow(0, r.done, k).copy_(slot)
            r.done += k
            self._read[pair] = n + 1
            self._ctr[self._at(self._ack_slot(pi))] = n + 1
        if r.flat is not None and r.flat.data_ptr() != r.buf.data_ptr():
            r.buf.copy_(r.flat.view(r.buf.dtype).view(r.buf.shape))
        return True

    def start_exchange(self, sends, recvs, what: str = "halo exchange"):
        """Post ``sends`` [(dst global rank, tensor)] and ``recvs`` [(src global
        rank, buffer)]; both pairs must have a mailbox. Writes what fits now and
        returns ``finish()``, which completes the exchange (receive buffers are
        filled after it; send tensors may change only after it)."""
        ps = [_Send(self._rank_index[d], t) for d, t in sends if t.numel()]
        pr = [_Recv(self._rank_index[s], b) for s, b in recvs if b.numel()]
        ps = [s for s in ps if not self._try_send(s)]

        def finish():
            nonlocal ps, pr
            waiter = None
            while ps or pr:
                ps = [s for s in ps if not self._try_send(s)]
                pr = [r for r in pr if not self._try_recv(r)]
                if ps or pr:
                    waiter = waiter or _Waiter(self, what)
                    waiter.pause()

        return finish

    @property
    def all_pairs(self) -> bool:
        """Every ordered pair of the group has a mailbox (grids up to 2x2, or
        1x2 / 2x1): an all-to-all can then go point-to-point. The same on
        every rank (a function of the grid)."""
        return len(self.layout.pairs) == self.layout.sp * (self.layout.sp - 1)

    def all_to_all(self, sends, recvs) -> None:
        """Blocking all-to-all as one p2p exchange with every peer (needs
        :attr:`all_pairs`): ``sends`` [(dst global rank, tensor)], ``recvs``
        [(src global rank, buffer)] as in :meth:`start_exchange`."""
        self.start_exchange(sends, recvs, "all_to_all")()

    # -- collectives --------------------------------------------------------------
    def fits_collective(self, t: torch.Tensor) -> bool:
        return t.numel() * t.element_size() <= self.layout.collective_bytes

    def _publish(self, t: torch.Tensor) -> int:
        """Write ``t`` as this rank's part of the next collective; returns its number."""
        if self._pending is not None:
            self._pending()  # an earlier posted collective reads its slot before ours can reuse it
        self._calls += 1
        n = self._calls
        self._views(n % 2, t)[self.index].copy_(t)
        self._ctr[self._call_at[self.index]] = n
        return n

    def _views(self, parity: int, like: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's collective slot ``parity`` as a tensor shaped like ``like``."""
        key = (parity, like.dtype, like.shape)
        views = self._slot_views.get(key)
        if views is None:
            nbytes = like.numel() * like.element_size()
            views = [self._bytes(self.layout.collective(r, parity), nbytes).view(like.dtype).view(like.shape)
                     for r in range(self.layout.sp)]
            if len(self._slot_views) < 4096:  # bounded: shapes that keep changing are not cached
                self._slot_views[key] = views
        return views

    def _collect(self, n: int, like: torch.Tensor, what: str) -> list[torch.Tensor]:
        """Every rank's part of collective ``n``, as views of the segment (valid
        until this rank publishes collective ``n + 1``)."""
        waiter = None
        ctr, at = self._ctr, self._call_at
        for r in range(self.layout.sp):
            while ctr[at[r]] < n:
                waiter = waiter or _Waiter(self, what)
                waiter.pause()
        return self._views(n % 2, like)

    def _gather_parts(self, t: torch.Tensor, what: str) -> list[torch.Tensor]:
        return self._collect(self._publish(t), t, what)

    @staticmethod
    def _reduce(t: torch.Tensor, parts: list[torch.Tensor], op: str) -> torch.Tensor:
        t.copy_(parts[0])
        for p in parts[1:]:
            if op == "sum":
                t.add_(p)
            elif op == "max":
                torch.maximum(t, p, out=t)
            elif op == "min":
                torch.minimum(t, p, out=t)
            else:
                raise ValueError(f"shared-memory all_reduce: unsupported op {op!r}")
        return t

    def start_all_reduce_(self, t: torch.Tensor, op: str = "sum"):
        """All-reduce of ``t`` in place, posted: publishes ``t`` now and returns
        ``wait()``, which reduces into ``t`` and returns it. Every rank adds the
        parts in sp order, so all get the same bits. A collective started
        before ``wait()`` completes this one first."""
        n = self._publish(t)
        done = []

        def wait() -> torch.Tensor:
            if not done:
                self._pending = None
                self._reduce(t, self._collect(n, t, f"all_reduce({op})"), op)
                done.append(True)
            return t

        self._pending = wait
        return wait

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """``(sp, *t.shape)``, every rank's ``t`` in sp order."""
        return torch.stack(self._gather_parts(t, "all_gather"))


def _map(path: str, nbytes: int) -> torch.Tensor:
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)


def open_channel(group, sp_index: int, global_ranks: tuple[int, ...], grid: tuple[int, int], timeout_s: float,
                 slot_bytes: int | None = None, collective_bytes: int = 64 * 1024,
                 hosts: list[str] | None = None) -> ShmChannel | None:
    """Collective over ``group`` (the sp group, gloo): a channel when every rank
    runs on one host and maps the same segment, else None on every rank.
    ``hosts``: the :func:`host_id` of each rank of the group (gathered here when
    not given; it must be the same list on every rank). The segment's file is
    unlinked before this returns, so nothing is left in /dev/shm after a crash."""
    import torch.distributed as dist

    if hosts is None:
        hosts = [None] * len(global_ranks)
        dist.all_gather_object(hosts, host_id(), group=group)
    if len(set(hosts)) > 1:  # decided from the same list on every rank: no rank tries a segment alone
        return None

    if slot_bytes is None:
        slot_bytes = int(float(os.environ.get("REST_DS_SHM_SLOT_KIB", "256")) * 1024)
    slot_bytes = min(max(4096, slot_bytes // _LINE * _LINE), _MAX_SLOT)
    layout = _Layout(len(global_ranks), neighbour_pairs(grid), slot_bytes, collective_bytes)
    box: list = [None]
    if sp_index == 0 and enabled_here():
        path = f"/dev/shm/rest_ds_spim_{os.getpid()}_{secrets.token_hex(6)}"
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                os.posix_fallocate(fd, 0, layout.total_bytes)  # fails now, not with SIGBUS on a full /dev/shm
            finally:
                os.close(fd)
            token = secrets.randbits(62)
            seg = _map(path, layout.total_bytes)
            ctr = seg[: layout.header_bytes].view(torch.int64).numpy()
            ctr[-_LINE // 8] = token
            box = [(path, token)]
        except OSError:
            try:
                os.unlink(path)
            except OSError:
                pass
    dist.broadcast_object_list(box, src=global_ranks[0], group=group)
    seg, ok = None, False
    if box[0] is not None and enabled_here():
        path, token = box[0]
        try:
            os.close(os.open(path, os.O_RDWR))  # exists here (from_file would create it on another host)
            seg = _map(path, layout.total_bytes)
            ok = int(seg[: layout.header_bytes].view(torch.int64)[-_LINE // 8]) == token
        except (OSError, RuntimeError):
            ok = False
    flags = torch.tensor([int(ok), os.getpid()], dtype=torch.int64)
    everyone = [torch.empty_like(flags) for _ in global_ranks]
    dist.all_gather(everyone, flags, group=group)
    if sp_index == 0 and box[0] is not None:
        try:
            os.unlink(box[0][0])  # every rank that could map it has
        except OSError:
            pass
    if not all(int(f[0]) for f in everyone):
        return None
    pids = tuple(int(f[1]) for f in everyone)
    visible = all(_pid_alive(p) for p in pids)  # not across pid namespaces: then only the timeout
    return ShmChannel(seg, layout, sp_index, global_ranks, timeout_s, pids if visible else None)
