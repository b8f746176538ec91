"""Socket filters (classic BPF): drop everything, or admit only some source ranges, in
the kernel before a connection or datagram reaches the proxy."""

from __future__ import annotations

import contextlib
import ctypes
import socket
import struct

from kpy.core.model import IPNetwork

# Linux constants the socket module does not export.
SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
SKF_NET_OFF = -0x100000
BPF_LD_W_ABS, BPF_ALU_AND_K, BPF_JMP_JEQ_K, BPF_RET_K = 0x20, 0x54, 0x15, 0x06


def filter_program(family: int, ranges: tuple[IPNetwork, ...] | None) -> list[bytes]:
    """A classic BPF program for a listening socket: None drops every packet (a Local
    policy with no local endpoint); otherwise it admits packets whose source address is
    in one of ``ranges`` and drops the rest. Dropped SYNs never open a connection."""
    insns: list[bytes] = []

    def insn(code: int, jt: int, jf: int, k: int) -> bytes:
        return struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF)

    source_offset = 12 if family == 4 else 8  # IPv4 / IPv6 header
    for net in ranges or ():
        block: list[tuple[int, int, int, int]] = []
        packed, mask = net.network_address.packed, net.netmask.packed
        for i in range(len(packed) // 4):
            m = int.from_bytes(mask[4 * i : 4 * i + 4], "big")
            if m == 0:
                continue
            n = int.from_bytes(packed[4 * i : 4 * i + 4], "big")
            block.append((BPF_LD_W_ABS, 0, 0, SKF_NET_OFF + source_offset + 4 * i))
            block.append((BPF_ALU_AND_K, 0, 0, m))
            block.append((BPF_JMP_JEQ_K, 0, -1, n))  # jf patched below: the next range
        block.append((BPF_RET_K, 0, 0, 0xFFFFFFFF))
        for j, (code, jt, jf, k) in enumerate(block):
            insns.append(insn(code, jt, len(block) - j - 1 if jf == -1 else jf, k))
    insns.append(insn(BPF_RET_K, 0, 0, 0))
    return insns


def attach_filter(sock: socket.socket, insns: list[bytes] | None) -> None:
    if insns is None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
        return
    code = ctypes.create_string_buffer(b"".join(insns))
    fprog = struct.pack("@HL", len(insns), ctypes.addressof(code))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


# ("drop", ()) or ("ranges", source ranges) or None (no filter)
FilterSpec = tuple[str, tuple[IPNetwork, ...]] | None
