"""Talk to iptables: one ``iptables-restore --noflush`` per family, ``iptables-save`` back.

Every command runs inside the configured network namespace (``nsenter --net``) when
one is set, and nowhere else. The flavour — ``nft`` (``iptables-nft-*``, the nf_tables
kernel API) or ``legacy`` (``iptables-legacy-*``, x_tables) — is forced with the
``iptables_mode`` option or detected the way the common ``iptables-wrapper`` does it:
the flavour that already holds this backend's chains, else the one holding more
rules, else nft.

``iptables-restore`` applies its whole input or nothing, so a failed restore changes
nothing; its error text is raised as :class:`IptablesError`. ``-w`` waits for the
xtables lock as the ``iptables`` command does.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess

MODES = ("nft", "legacy")
LOCK_WAIT = "5"  # seconds to wait for the xtables lock


class IptablesError(Exception):
    """An iptables command failed (the message carries its stderr)."""


def tool(mode: str, family: int, verb: str) -> str:
    """``iptables-nft-restore``, ``ip6tables-legacy-save``, …"""
    return f"{'ip6tables' if family == 6 else 'iptables'}-{mode}-{verb}"


class Kernel:
    """Runs the iptables tools of one flavour in one network namespace."""

    def __init__(self, netns: str | None, mode: str | None = None) -> None:
        if mode not in (None, "", "auto", *MODES):
            raise ValueError(f"iptables_mode must be one of auto, nft, legacy (got {mode!r})")
        self.netns = netns
        self.forced = mode if mode in MODES else None
        self._mode: str | None = self.forced
        self._families: tuple[int, ...] | None = None

    def _argv(self, *argv: str) -> list[str]:
        if self.netns:
            return ["nsenter", f"--net=/run/netns/{self.netns}", "--", *argv]
        return list(argv)

    # --- flavour -----------------------------------------------------------------------

    def probe(self) -> str | None:
        """None when the tools run (in the namespace), else why not."""
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
        mode = self.detect()
        proc = subprocess.run(
            self._argv(tool(mode, 4, "save"), "-t", "nat"),
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            return f"{tool(mode, 4, 'save')} failed: {proc.stderr.strip()}"
        return None

    def detect(self) -> str:
        """The flavour in use here (see the module docstring)."""
        if self._mode is not None:
            return self._mode
        counts: dict[str, tuple[int, int]] = {}
        for mode in MODES:
            if shutil.which(tool(mode, 4, "save")) is None:
                continue
            proc = subprocess.run(
                self._argv(tool(mode, 4, "save")), capture_output=True, text=True, check=False
            )
            text = proc.stdout if proc.returncode == 0 else ""
            ours = text.count(":KPY-") - text.count(":KPY-IPVS-")
            counts[mode] = (ours, text.count("\n-A "))
        self._mode = max(MODES, key=lambda m: (counts.get(m, (-1, -1)), m == "nft"))
        return self._mode

    # --- commands ----------------------------------------------------------------------

    async def _run(self, argv: list[str], stdin: str | None = None) -> str:
        proc = await asyncio.create_subprocess_exec(
            *self._argv(*argv),
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
        if proc.returncode != 0:
            raise IptablesError(
                f"{argv[0]} exited {proc.returncode}: {err.decode(errors='replace').strip()}"
            )
        return out.decode()

    async def mode(self) -> str:
        if self._mode is not None:
            return self._mode
        return await asyncio.to_thread(self.detect)

    async def families(self) -> tuple[int, ...]:
        """(4, 6), or (4,) when ip6tables cannot run here (IPv6 disabled or missing)."""
        if self._families is None:
            try:
                await self._run([tool(await self.mode(), 6, "save"), "-t", "nat"])
                self._families = (4, 6)
            except (IptablesError, OSError):
                self._families = (4,)
        return self._families

    async def save(self, family: int, mode: str | None = None) -> str:
        """``iptables-save -c`` of the filter and nat tables."""
        mode = mode or await self.mode()
        parts = []
        for table in ("filter", "nat"):
            parts.append(await self._run([tool(mode, family, "save"), "-c", "-t", table]))
        return "".join(parts)

    async def restore(self, family: int, text: str, mode: str | None = None) -> None:
        """One atomic ``iptables-restore --noflush`` transaction."""
        mode = mode or await self.mode()
        await self._run([tool(mode, family, "restore"), "-w", LOCK_WAIT, "--noflush"], text)

    def available(self, mode: str) -> bool:
        """True when the tools of ``mode`` are installed."""
        return all(shutil.which(tool(mode, f, v)) for f in (4, 6) for v in ("save", "restore"))
