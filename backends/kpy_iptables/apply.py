"""Talk to iptables: ``iptables-restore --noflush`` to write; netlink or ``iptables-save``
to read.

Every command runs inside the configured network namespace (``nsenter --net``) when
one is set, and nowhere else. The flavour — ``nft`` (``iptables-nft-*``, the nf_tables
kernel API) or ``legacy`` (``iptables-legacy-*``, x_tables) — is forced with the
``iptables_mode`` option or detected the way the common ``iptables-wrapper`` does it:
the flavour that already holds this backend's chains, else the one holding more
rules, else nft.

Reading never creates anything: the nft flavour is read over nf_tables netlink
(:mod:`kpy_iptables.netlink`, chain by chain); the legacy flavour with
``iptables-legacy-save`` of the tables that already exist in the namespace (listed in
``/proc/net/ip_tables_names``) — naming a table that does not exist would make the
kernel create it.

``iptables-restore`` applies its whole input or nothing, so a failed restore changes
nothing; its exit status (or the signal that killed it) and its error text are raised
as :class:`IptablesError`. A child is killed and reaped when the coroutine awaiting it
is cancelled (the agent stopping), so no iptables process outlives kpy. ``-w`` waits
for the xtables lock as the ``iptables`` command does.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from kpy.kernel.netns import run_in_netns
from kpy.kernel.proc import communicate
from kpy_iptables.netlink import ChainReader, NetlinkError
from kpy_iptables.render import FILTER, NAT, owned

MODES = ("nft", "legacy")
LOCK_WAIT = "5"  # seconds to wait for the xtables lock
VERSION_TIMEOUT = 10.0  # seconds for an ``--version`` probe


class IptablesError(Exception):
    """An iptables command failed (the message carries its status and stderr)."""


def tool(mode: str, family: int, verb: str) -> str:
    """``iptables-nft-restore``, ``ip6tables-legacy-save``, …"""
    return f"{'ip6tables' if family == 6 else 'iptables'}-{mode}-{verb}"


def in_netns(netns: str | None, argv: Sequence[str]) -> list[str]:
    """``argv`` run in the network namespace ``netns`` (with ``nsenter``), if one is set."""
    if netns:
        return ["nsenter", f"--net=/run/netns/{netns}", "--", *argv]
    return list(argv)


def status(returncode: int) -> str:
    """``exit status 2``, ``killed by signal 11 (SIGSEGV)``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        return f"killed by signal {-returncode} ({name})"
    return f"exit status {returncode}"


def failure(argv0: str, returncode: int, stderr: str) -> str:
    text = stderr.strip()
    return f"{argv0} failed ({status(returncode)})" + (f": {text}" if text else "")


def _proc_lines(name: str) -> list[str] | None:
    """``/proc/net/<name>`` of the calling thread's namespace, or None when absent."""
    try:
        return Path(f"/proc/thread-self/net/{name}").read_text().split()
    except OSError:
        return None


class Kernel:
    """Runs the iptables tools of one flavour in one network namespace."""

    def __init__(self, netns: str | None, mode: str | None = None) -> None:
        if mode not in (None, "", "auto", *MODES):
            raise ValueError(f"iptables_mode must be one of auto, nft, legacy (got {mode!r})")
        self.netns = netns
        self.forced = mode if mode in MODES else None
        self._mode: str | None = self.forced
        self._families: tuple[int, ...] | None = None
        self._reader: ChainReader | None = None

    def _argv(self, *argv: str) -> list[str]:
        return in_netns(self.netns, argv)

    @property
    def reader(self) -> ChainReader:
        """The nf_tables netlink reader of this namespace (nft flavour)."""
        if self._reader is None:
            self._reader = ChainReader(self.netns)
        return self._reader

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()

    # --- flavour -----------------------------------------------------------------------

    def probe(self) -> str | None:
        """None when the tools run (in the namespace), else why not. Reads no ruleset:
        the tools are found and answer ``--version`` inside the namespace, and for the
        nft flavour the kernel answers an nf_tables request there."""
        modes = [self.forced] if self.forced else list(MODES)
        missing = [
            tool(m, f, v)
            for m in modes
            for f in (4, 6)
            for v in ("save", "restore")
            if shutil.which(tool(m, f, v)) is None
        ]
        if self.forced and missing:
            return f"missing {', '.join(missing)}"
        if not self.forced and len(missing) == 8:
            return "no iptables tools installed (iptables-nft-* or iptables-legacy-*)"
        mode = self.forced or ("nft" if self.available("nft") else "legacy")
        argv = self._argv(tool(mode, 4, "restore"), "--version")
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, check=False, timeout=VERSION_TIMEOUT
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"cannot run {tool(mode, 4, 'restore')}: {exc}"
        if proc.returncode != 0:
            return failure(" ".join(argv[-2:]), proc.returncode, proc.stderr)
        if mode == "nft":
            try:
                self.reader.generation()
            except NetlinkError as exc:
                return f"no nf_tables here: {exc}"
        return None

    def legacy_tables(self, family: int) -> set[str]:
        """The x_tables tables that exist in the namespace (reading creates none)."""
        name = "ip6_tables_names" if family == 6 else "ip_tables_names"
        found = run_in_netns(self.netns, lambda: _proc_lines(name))
        return set(found or ())

    def _nft_counts(self) -> tuple[int, int]:
        """(kpy's chains, all chains) of the nft flavour's ip/ip6 nat and filter tables."""
        ours = total = 0
        for family in (4, 6):
            for chain in self.reader.chains(family, (NAT, FILTER)):
                total += 1
                ours += owned(chain.name)
        return ours, total

    def _legacy_counts(self) -> tuple[int, int]:
        """(kpy's chains, rules) of the legacy flavour; (0, 0) without any table."""
        if not self.legacy_tables(4):
            return 0, 0
        proc = subprocess.run(
            self._argv(tool("legacy", 4, "save")), capture_output=True, text=True, check=False
        )
        text = proc.stdout if proc.returncode == 0 else ""
        ours = sum(
            1 for line in text.splitlines() if line[:1] == ":" and owned(line[1:].split()[0])
        )
        return ours, text.count("\n-A ")

    def detect(self) -> str:
        """The flavour in use here (see the module docstring)."""
        if self._mode is not None:
            return self._mode
        counts: dict[str, tuple[int, int]] = {}
        if self.available("nft"):
            try:
                counts["nft"] = self._nft_counts()
            except NetlinkError:
                counts["nft"] = (-1, -1)
        if self.available("legacy"):
            counts["legacy"] = self._legacy_counts()
        self._mode = max(MODES, key=lambda m: (counts.get(m, (-1, -1)), m == "nft"))
        return self._mode

    # --- commands ----------------------------------------------------------------------

    async def _run(self, argv: list[str], stdin: str | None = None) -> str:
        # kpy.kernel.proc kills and reaps the child if we are cancelled (the agent stops).
        code, out, err = await communicate(
            self._argv(*argv), stdin.encode() if stdin is not None else None
        )
        if code != 0:
            raise IptablesError(failure(argv[0], code, err.decode(errors="replace")))
        return out.decode()

    async def mode(self) -> str:
        if self._mode is not None:
            return self._mode
        return await asyncio.to_thread(self.detect)

    async def families(self) -> tuple[int, ...]:
        """(4, 6), or (4,) when ip6tables cannot run here (IPv6 disabled or missing)."""
        if self._families is None:
            mode = await self.mode()
            ipv6 = (
                shutil.which(tool(mode, 6, "restore")) is not None
                and (
                    await asyncio.to_thread(
                        run_in_netns, self.netns, lambda: _proc_lines("if_inet6")
                    )
                )
                is not None
            )
            self._families = (4, 6) if ipv6 else (4,)
        return self._families

    async def save(self, family: int, mode: str | None = None) -> str:
        """``iptables-save -c`` of the filter and nat tables that exist."""
        mode = mode or await self.mode()
        tables: tuple[str, ...] = (FILTER, NAT)
        if mode == "legacy":
            exist = await asyncio.to_thread(self.legacy_tables, family)
            tables = tuple(t for t in tables if t in exist)
        parts = []
        for table in tables:
            parts.append(await self._run([tool(mode, family, "save"), "-c", "-t", table]))
        return "".join(parts)

    async def restore(self, family: int, text: str, mode: str | None = None) -> None:
        """One atomic ``iptables-restore --noflush`` transaction."""
        mode = mode or await self.mode()
        await self._run([tool(mode, family, "restore"), "-w", LOCK_WAIT, "--noflush"], text)

    def available(self, mode: str) -> bool:
        """True when the tools of ``mode`` are installed."""
        return all(shutil.which(tool(mode, f, v)) for f in (4, 6) for v in ("save", "restore"))
