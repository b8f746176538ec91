"""Running ``nft``: one ``nft -f -`` per transaction, ``nft -j list table`` to read back.

Inside ``netns`` (a named network namespace) when one is configured — every test, lab
and benchmark uses one; in a DaemonSet the agent runs in the node's own namespace.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from kpy_nftables import render


class NftError(Exception):
    """``nft`` failed; the message carries its stderr."""


@dataclass(frozen=True, slots=True)
class Nft:
    netns: str | None = None
    binary: str = "nft"

    def command(self, *args: str) -> list[str]:
        cmd = [self.binary, *args]
        if self.netns is None:
            return cmd
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--", *cmd]

    async def _run(self, *args: str, stdin: str | None = None) -> str:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command(*args),
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise NftError(f"cannot run nft: {exc}") from exc
        out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
        if proc.returncode != 0:
            raise NftError(err.decode(errors="replace").strip() or f"nft exited {proc.returncode}")
        return out.decode()

    async def run_script(self, script: str) -> None:
        """Apply ``script`` as one atomic transaction (all of it or nothing)."""
        await self._run("-f", "-", stdin=script)

    async def list_tables(self) -> list[dict[str, Any]]:
        """JSON of kpy's tables without their rules: chains, set and map definitions,
        the elements of the verdict maps and of ``fingerprints`` (dynamic affinity sets'
        elements are clients, not state, and are not read).

        ``nft list tables`` is not used: it makes nft load every rule (seconds at scale).
        """
        chains = json.loads(await self._run("-j", "list", "chains"))
        docs = [chains]
        present = sorted(
            {
                item["chain"]["family"]
                for item in chains.get("nftables", [])
                if "chain" in item and item["chain"].get("table") == render.TABLE
            }
        )
        lists: list[tuple[str, ...]] = []
        for family in present:
            lists.append(("list", "sets", "table", family, render.TABLE))
            lists += [("list", "set", family, render.TABLE, name) for name in render.SETS]
            lists += [("list", "map", family, render.TABLE, name) for name in render.MAPS]
        for out in await asyncio.gather(*(self._maybe(*args) for args in lists)):
            if out is not None:
                docs.append(json.loads(out))
        return docs

    async def _maybe(self, *args: str) -> str | None:
        """The output of ``nft -j args``, None when the object does not exist."""
        try:
            return await self._run("-j", *args)
        except NftError:
            return None

    async def delete_tables(self) -> None:
        for family in render.FAMILIES:
            try:
                await self.run_script(f"delete table {family} {render.TABLE}\n")
            except NftError as exc:
                if "No such file or directory" not in str(exc):
                    raise

    def probe(self) -> str | None:
        if shutil.which(self.binary) is None:
            return f"{self.binary} not found on PATH (install the nftables package)"
        if self.netns is not None and shutil.which("nsenter") is None:
            return "nsenter not found on PATH (install util-linux)"
        try:
            done = subprocess.run(
                self.command("list", "tables"), capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"nft cannot run here: {exc}"
        if done.returncode != 0:
            return f"nft cannot list tables here: {done.stderr.strip()}"
        return None
