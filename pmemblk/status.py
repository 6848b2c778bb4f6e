"""``pmemblk status``: a device's or a target's status as people read it, and the Prometheus
text file for node_exporter."""

from __future__ import annotations

from typing import Any

from . import files
from .errors import ServiceError
from .nbdqueue import KernelQueue
from .units import human


def write_textfile(path: str, text: bytes) -> None:
    """Replace ``path`` by ``text`` atomically: node_exporter never reads half a file."""
    files.write_atomic(path, text, 0o644, "--textfile")


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render_client(st: dict[str, Any]) -> str:
    lines = [f"{st['name']}: {st.get('device') or st.get('uri', '')}",
             f"  target:       {st.get('target', '?')}"
             + (f" over {st['transport']}" if st.get("transport") else "")]
    if "flush" in st:
        mode = "persistent" if st.get("persistent") else "visibility only"
        lines.append(f"  flush:        {st['flush']} ({mode}); target is_pmem="
                     f"{int(bool(st.get('target_is_pmem')))}")
    if "export_size" in st:
        lines.append(f"  export:       {human(st['export_size'])}, region "
                     f"{st.get('region_uuid')}, loss epoch {st.get('loss_epoch')}"
                     + (", read-only" if st.get("readonly") else ""))
    lines.append(f"  state:        {st.get('state', '?')}")
    kernel = st.get("kernel")
    if isinstance(kernel, dict):
        lines.append(f"  kernel:       {KernelQueue(**kernel).describe()}"
                     + ("" if kernel["write_cache"] == "write back" or st.get("readonly")
                        else " -- fsync does not reach the target"))
    elif kernel is not None:
        lines.append(f"  kernel:       {kernel}")
    if "connections" in st:
        lines.append(f"  connections:  {st['connections']} open, {st['reconnects']} "
                     f"reconnects, {st['connections_failed']} failed to open"
                     + (f" (last: {st['last_error']})" if st.get("last_error") else ""))
        lines.append(f"  uptime:       {st['uptime_s']:g} s, nbdkit PID {st['pid']}")
    ops = st.get("ops")
    if ops:
        lines.append(f"  {'op':<6} {'requests':>10} {'bytes':>12} {'errors':>7} "
                     f"{'p50 µs':>9} {'p99 µs':>9} {'p99.9 µs':>9}")
        for op, s in ops.items():
            lines.append(f"  {op:<6} {s['requests']:>10} {human(s['bytes']):>12} "
                         f"{s['errors']:>7} {_us(s['p50_us']):>9} {_us(s['p99_us']):>9} "
                         f"{_us(s['p99.9_us']):>9}")
        if not st.get("stats", True):
            lines.append("  (statistics are off: stats=false)")
    return "\n".join(lines)


def _atomic_line(atomic: dict[str, Any] | None) -> list[str]:
    if not atomic:
        return []
    groups = atomic["lane_groups"]
    error = atomic.get("lane_recovery_error")
    waiting = (f"{atomic['lane_groups_waiting_for_recovery']} that cannot be given out: "
               f"their recovery failed ({error}); serve it --readonly to copy the data out"
               if error else f"{atomic['lane_groups_waiting_for_recovery']} waiting for "
               "recovery (when no writer is connected)")
    return [f"  atomic blocks: {atomic['sectors']} sectors of {atomic['sector_size']} bytes; "
            f"{atomic['lane_groups_held']} of {groups} writer lane groups held, {waiting}"]


def render_target(st: dict[str, Any]) -> str:
    t = st["totals"]
    lines = [
        f"target {st['region']} ({st['kind']}, {human(st['export_size'])}, is_pmem="
        f"{int(st['is_pmem'])}, persistence by {st['persistence']})",
        *([f"  memory:       {st['memory']}"] if "memory" in st else []),
        *[f"  flush:        {text}" for text in st.get("flush", {}).values()],
        f"  region:       {st['region_uuid']}, loss epoch {st['loss_epoch']}"
        + (", read-only" if st["readonly"] else "") + (", shared" if st["shared"] else ""),
        f"  listening:    {st['listen']} over {', '.join(st['transports'])}, "
        f"authentication {'on' if st['authentication'] else 'off'}",
        f"  uptime:       {st['uptime_s']:g} s, PID {st['pid']}",
        *_atomic_line(st.get("atomic_blocks")),
        f"  clients:      {len(st['clients'])} now, {t['admitted']} admitted and "
        f"{t['refused']} refused since start, {st['handshakes']} in their handshake",
        f"  commits:      {t['commits']} ({human(t['commit_bytes'])} persisted), "
        f"{t['commit_errors']} failed",
        f"  tcp data:     {t['reads']} reads ({human(t['read_bytes'])}), {t['writes']} writes "
        f"({human(t['write_bytes'])}), {t['zeros']} zeroes (verbs data bypasses the target)",
    ]
    for c in st["clients"]:
        who = f" ({c['identity']})" if c.get("identity") else ""
        lines.append(f"  client {c['client']}{who}: {c['mode']} over {c['transport']} from "
                     f"{c['address'] or '?'}, {c['connected_s']:g} s; {c['reads']} reads, "
                     f"{c['writes']} writes, {c['commits']} commits")
    return "\n".join(lines)


def render(st: dict[str, Any], target: str | None) -> str:
    """``st`` as people read it: a target's status (from the control socket ``target``) or an
    attachment's; ServiceError, one line, for an answer whose fields are missing or of the
    wrong type (a socket that is not ours, or another version's)."""
    try:
        return render_target(st) if target else render_client(st)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        source = target or st.get("name", "?")
        raise ServiceError(f"{source} answered a status pmemblk cannot show "
                             f"({type(exc).__name__}: {exc}); pmemblk status --json prints "
                             "it as it came") from None
