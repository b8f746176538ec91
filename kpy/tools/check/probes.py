"""Running checks: executors that send probes (a shell in a lab namespace or a pod),
parsing their output, judging replies against expectations, and the result table."""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Protocol

from kpy.kernel.proc import in_netns
from kpy.tools.check.checks import REFUSE_FAST, Check, Expect, Probe, Reply, Result
from kpy.tools.lab import topology as topo


class Executor(Protocol):
    """Runs probes from named sources: the lab's namespaces, or a netshoot pod."""

    def run(self, probe: Probe) -> list[Reply]: ...


Shell = Callable[[str, str, float], tuple[int, str]]  # (source, command, timeout) → rc, stdout


class ShellExecutor:
    """Runs each probe as the very command shown (``curl``, ``nc -u``) through ``shell``.

    In the lab ``shell`` is ``ip netns exec <source> sh -c <command>``
    (:func:`lab_shell`); against a cluster it would be an exec into the netshoot pod.
    The outcome comes from the command: curl's exit status (0 answer, 7 refused,
    28 timed out) or nc's output (a reply, or none).
    """

    def __init__(self, shell: Shell) -> None:
        self.shell = shell

    def run(self, probe: Probe) -> list[Reply]:
        single = replace(probe, count=1).command()
        replies = []
        for _ in range(probe.count):
            started = time.monotonic()
            rc, out = self.shell(probe.source, single, probe.timeout + 5)
            replies.append(parse_output(probe, rc, out, time.monotonic() - started))
        return replies


def parse_output(probe: Probe, rc: int, out: str, seconds: float) -> Reply:
    """The outcome of one netshoot command from its exit status and output."""
    text = out.strip()
    if probe.protocol == "udp":
        if text:
            pod, _, client = text.partition(" ")
            return Reply("answer", pod, client, seconds=seconds)
        return Reply("refused" if rc != 0 else "timeout", seconds=seconds)
    if rc == 0:
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        if isinstance(body, dict):
            return Reply(
                "answer", str(body.get("pod", "")), str(body.get("client", "")), seconds=seconds
            )
        return Reply("answer", seconds=seconds)  # a server that does not say who it is
    if rc == 7:
        return Reply("refused", seconds=seconds)
    if rc == 28:
        return Reply("timeout", seconds=seconds)
    return Reply("error", detail=f"curl exit status {rc}", seconds=seconds)


def lab_shell(cluster: topo.Cluster) -> Shell:
    """Run a command inside the lab namespace named by a source (pod, node, ``client``)."""
    names = {"client": cluster.client.name}
    for node in cluster.nodes:
        names[node.name] = node.netns.name
        names.update({pod.name: pod.netns.name for pod in node.pods})

    def shell(source: str, command: str, timeout: float) -> tuple[int, str]:
        argv = in_netns(names[source], ["sh", "-c", command])
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return 28, ""
        return done.returncode, done.stdout

    return shell


class LabExecutor:
    """Probes from sockets opened inside the lab's namespaces by this process."""

    def __init__(self, cluster: topo.Cluster) -> None:
        self.sources: dict[str, topo.Netns] = {"client": cluster.client}
        for node in cluster.nodes:
            self.sources[node.name] = node.netns
            for pod in node.pods:
                self.sources[pod.name] = pod.netns

    def run(self, probe: Probe) -> list[Reply]:
        netns = self.sources[probe.source]
        return [self._once(netns, probe) for _ in range(probe.count)]

    @staticmethod
    def _once(netns: topo.Netns, probe: Probe) -> Reply:
        started = time.monotonic()
        try:
            if probe.protocol == "udp":
                text = topo.udp(
                    netns, probe.host, probe.port, timeout=probe.timeout, source=probe.bind
                )
                pod, _, client = text.partition(" ")
            else:
                answer = topo.http(
                    netns, probe.host, probe.port, timeout=probe.timeout, source=probe.bind
                )
                pod, client = str(answer.get("pod", "")), str(answer.get("client", ""))
            return Reply("answer", pod, client, seconds=time.monotonic() - started)
        except ConnectionRefusedError:
            return Reply("refused", seconds=time.monotonic() - started)
        except TimeoutError:
            return Reply("timeout", seconds=time.monotonic() - started)
        except (OSError, ValueError) as exc:
            return Reply("error", detail=str(exc), seconds=time.monotonic() - started)


def evaluate(expect: Expect, replies: Sequence[Reply], timeout: float) -> tuple[bool, str]:
    """Pass or fail, and why, for the replies of one probe."""
    kinds = Counter(r.kind for r in replies)
    if expect.kind == "refused":
        slow = [r for r in replies if r.kind == "refused" and r.seconds >= REFUSE_FAST]
        if kinds["refused"] == len(replies) and not slow:
            return True, f"refused in {max(r.seconds for r in replies) * 1000:.0f} ms"
        return False, f"expected a fast refusal, got {_describe(replies, timeout)}"
    if expect.kind == "dropped":
        if kinds["timeout"] == len(replies):
            return True, f"no answer within {timeout:g}s (dropped)"
        return False, f"expected no answer (dropped), got {_describe(replies, timeout)}"
    if kinds["answer"] != len(replies):
        return False, f"expected an answer, got {_describe(replies, timeout)}"
    seen = Counter(r.pod for r in replies)
    if expect.pods is not None and not set(seen) <= expect.pods:
        wrong = sorted(set(seen) - expect.pods)
        return (
            False,
            f"answered by {', '.join(wrong)}, expected only {', '.join(sorted(expect.pods))}",
        )
    if expect.every_pod and expect.pods is not None and set(seen) != expect.pods:
        missing = sorted(expect.pods - set(seen))
        return (
            False,
            f"{len(replies)} connections never reached {', '.join(missing)} ({_spread(seen)})",
        )
    if expect.one_pod and len(seen) != 1:
        return False, f"not sticky: {_spread(seen)}"
    if expect.client is not None:
        clients = sorted({r.client for r in replies})
        if clients != [expect.client]:
            return False, f"pod saw client {', '.join(clients)}, expected {expect.client}"
        return True, f"{replies[0].pod} saw the client's own address {expect.client}"
    if expect.one_pod:
        return True, f"all {len(replies)} connections to {next(iter(seen))}"
    if expect.every_pod:
        return True, f"{len(replies)} connections spread: {_spread(seen)}"
    return True, f"answered by {', '.join(sorted(seen))}"


def _spread(seen: Counter[str]) -> str:
    return ", ".join(f"{pod} {n}" for pod, n in sorted(seen.items()))


def _describe(replies: Sequence[Reply], timeout: float) -> str:
    parts = []
    for kind, n in sorted(Counter(r.kind for r in replies).items()):
        text = {"timeout": f"no answer within {timeout:g}s", "refused": "refused"}.get(kind, kind)
        if kind == "answer":
            text = "answer from " + ", ".join(sorted({r.pod for r in replies if r.pod}))
        if kind == "error":
            text = "error: " + "; ".join(sorted({r.detail for r in replies if r.detail}))
        parts.append(text if len(replies) == 1 else f"{n}x {text}")
    return ", ".join(parts)


def run_checks(
    checks: Iterable[Check], executor: Executor, on_result: Callable[[Result], None] | None = None
) -> list[Result]:
    results = []
    for check in checks:
        if check.verify is not None:
            ok, reason = check.verify()
        elif check.probe is not None and check.expect is not None:
            ok, reason = evaluate(check.expect, executor.run(check.probe), check.probe.timeout)
        else:  # pragma: no cover - catalog never builds these
            ok, reason = False, "nothing to run"
        result = Result(
            check.service,
            check.check,
            check.source,
            "pass" if ok else "fail",
            reason,
            check.command,
        )
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


# --------------------------------------------------------------------------- output


def table(results: Sequence[Result]) -> str:
    """The matrix: one row per Service x check x source, the command under it."""
    rows = [("SERVICE", "CHECK", "SOURCE", "RESULT", "REASON")]
    rows += [(r.service, r.check, r.source, r.status.upper(), r.reason) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for index, row in enumerate(rows):
        lines.append(
            "  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True))
            + "  "
            + row[4]
        )
        if index and results[index - 1].command:
            lines.append(" " * (widths[0] + 2) + "$ " + results[index - 1].command)
    passed = sum(r.status == "pass" for r in results)
    lines.append(
        f"\n{passed}/{len(results)} checks passed"
        + ("" if passed == len(results) else f", {len(results) - passed} FAILED")
    )
    return "\n".join(lines)


def to_json(results: Sequence[Result]) -> str:
    return json.dumps({"results": [r.as_json() for r in results]}, indent=2)


# --------------------------------------------------------------------------- the lab
