"""The console report of a ``gkd diagnose`` result: what :func:`gkd.diagnose.diagnose` measured, in plain lines.

``gkd diagnose`` prints it after writing ``diagnose.json`` (which has every number); :mod:`gkd.diagnose` re-exports
:func:`format_report`.
"""

from __future__ import annotations

import math
import textwrap
from typing import Any

__all__ = ["format_report"]


# the divergence columns: each statistic of a source and its width
_COLUMNS = (("forward_kl", 10), ("reverse_kl", 10), ("nll_teacher_argmax", 12))


def _num(x: Any, spec: str = ".3f") -> str:
    """A number as the report shows it ("-" where there is none)."""
    return "-" if x is None else format(x, spec)


def format_report(result: dict[str, Any], max_rows: int = 16) -> str:
    """The console report of a :func:`gkd.diagnose.diagnose` result: plain lines of at most 100 columns (positions
    are grouped into at most ``max_rows`` rows; the JSON has every one)."""
    lines = ["divergence (mean over completion positions; P teacher, Q student)"]
    lines.append(
        f"  {'prefixes':<10}{'seqs':>6}{'tokens':>8}{'KL(P|Q)':>10}{'KL(Q|P)':>10}{'NLL argmax':>12}"
    )
    for name in ("dataset", "student"):
        d = result["divergence"].get(name)
        if d is None:
            lines.append(f"  {name:<10}  skipped (prompt-only records)")
            continue
        stats = "".join(f"{_num(d[k]):>{w}}" for k, w in _COLUMNS)
        lines.append(f"  {name:<10}{d['sequences']:>6}{d['tokens']:>8}{stats}")
    st = result["divergence"]["student"]
    if st.get("forward_kl_on_track") is not None:
        lines.append(
            f"  {'on-track':<10}{'':>6}{st['tokens_on_track']:>8}{_num(st['forward_kl_on_track']):>10}"
            "   (student positions up to its first off-track token)"
        )
        ds, te = result["divergence"].get("dataset"), result["divergence"].get("teacher")
        e_data = f"{100 * ds['error_mass']:.1f}%" if ds and ds.get("error_mass") is not None else "-"
        e_teacher = f"{100 * te['error_mass']:.1f}%" if te and te.get("error_mass") is not None else "-"
        lines.append(
            "  student error mass (its probability of tokens the teacher calls off-track), by prefixes:"
        )
        lines.append(
            f"    dataset {e_data}; its own on-track {100 * st['error_mass_on_track']:.1f}%; its own, all "
            f"{100 * st['error_mass']:.1f}%; the teacher's samples {e_teacher}"
        )
    lines += _position_lines(result["by_position"], max_rows)
    if result["scores"] is not None:
        s = result["scores"]
        lines.append(
            f"{s['metric']} (% per example): student sample {_num(s['student_sample'], '.1f')}, "
            f"student greedy {_num(s['student_greedy'], '.1f')}, teacher sample {_num(s['teacher_sample'], '.1f')}"
        )
    o = result["off_track"]
    lines.append(
        f"off-track (teacher prob < {o['threshold']:g}): {o['sequences_off_track']}/{o['sequences']} samples "
        f"({_num(o['sequence_rate'], '.1f')}%), {o['tokens_off_track']}/{o['tokens']} tokens ({_num(o['token_rate'], '.2f')}%)"
    )
    lines.append(f"  first off-track token at position {_num(o['first_position_mean'], '.1f')} on average")
    r = result["recovery"]
    unit, spec = (
        ("mean per-example metric, %", ".1f")
        if r["kind"] == "recovery_rate"
        else ("teacher log-prob/token", ".3f")
    )
    if r["prompts"] and r["kind"] != "skipped":
        lines.append(f"recovery of the {r['prompts']} off-track prefixes ({unit}):")
        for who in ("student", "teacher"):
            greedy, sampled = _num(r.get(f"{who}_greedy"), spec), _num(r.get(f"{who}_sample"), spec)
            lines.append(f"  {who:<8} greedy {greedy:>8}   sampled {sampled:>8}")
    lines += [f"note: {note}" for note in result["notes"]]
    lines.append(f"reading [{result['reading']['verdict']}]:")
    lines += textwrap.wrap(
        result["reading"]["text"], 96, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False
    )
    return "\n".join(lines)


def _position_lines(table: list[dict], max_rows: int) -> list[str]:
    """The by-position table, its positions grouped into at most ``max_rows`` rows."""
    step = max(1, math.ceil(len(table) / max_rows))
    lines = ["by position: KL(P|Q) and sequences per source; off-track tokens; samples first off-track there"]
    lines.append(f"  {'pos':<8}{'dataset':>10}{'n':>6}{'student':>10}{'n':>6}{'off':>6}{'first':>7}")
    for start in range(0, len(table), step):
        chunk, cells = table[start : start + step], []
        for name in ("dataset", "student"):
            n = sum(r.get(name, {}).get("count", 0) for r in chunk)
            tot = sum(r[name]["forward_kl"] * r[name]["count"] for r in chunk if r.get(name, {}).get("count"))
            cells += [f"{_num(tot / n if n else None):>10}", f"{n:>6}"]
        pos = f"{chunk[0]['position']}" + (f"-{chunk[-1]['position']}" if len(chunk) > 1 else "")
        counts = (
            f"{sum(r['off_track_tokens'] for r in chunk):>6}{sum(r['first_off_track'] for r in chunk):>7}"
        )
        lines.append(f"  {pos:<8}{''.join(cells)}{counts}")
    return lines
