"""Peak memory and time of the GKD loss: dense logits vs. the chunked fused path of ``gkd.losses``.

Each measurement runs in a fresh subprocess, so that peaks do not contaminate each other. The child builds its inputs
(student/teacher hidden states ``[B, T, H]``, head weights ``[V, H]``, a mask with the first ``prompt_fraction`` of
every sequence masked out), resets the kernel's peak-RSS counter (``/proc/self/clear_refs``; falls back to
``ru_maxrss``), runs forward + backward and reports the peak RSS above the inputs.

    dense    student and teacher logits [B, T, V] from the hidden states, jsd(beta=0.5), reduce_divergence, backward
    chunked  chunked_divergence_loss(...) (never holds [N, V] logits), backward, with a caller-owned Workspace

``--repeat N`` runs forward + backward N times in the same child (the chunked path reuses its Workspace, as a
training loop does) and also reports the median time of the repeats after the first (the steady state).

The child's address space is limited (``RLIMIT_AS``, default 20 GiB, less if the machine has less available), so a
dense run that cannot fit fails inside the child with an allocation error instead of taking the machine down. The
memory it would need is then estimated from two smaller dense runs (linear fit in the number of positions).

Usage:  python benchmarks/bench_loss_memory.py [--vocab 32000 128000] [--positions 4096] [--hidden 1024]
        [--repeat 10]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

GIB = 1 << 30
MIB = 1 << 20
RESULT_TAG = "BENCH_RESULT "
OOM_MARKERS = ("can't allocate memory", "cannot allocate memory", "bad_alloc", "MemoryError", "out of memory")


# ----------------------------------------------------------------------------------------------------------------
# Child: one measurement
# ----------------------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def _reset_peak() -> str:
    """Reset VmHWM to the current RSS; return the method that will measure the peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        if _status_kib("VmHWM") <= _status_kib("VmRSS") + 1024:
            return "VmHWM"
    except OSError:
        pass
    return "ru_maxrss"


def _peak_kib(method: str) -> int:
    if method == "VmHWM":
        return _status_kib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def run_child(args: argparse.Namespace) -> None:
    if args.mem_limit_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (args.mem_limit_bytes, args.mem_limit_bytes))
    try:
        import gkd  # noqa: F401  (an installed gkd or PYTHONPATH wins)
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import torch

    from gkd.divergences import jsd, reduce_divergence
    from gkd.losses import Workspace, chunked_divergence_loss

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, t, h, v = args.batch, args.seq_len, args.hidden, args.vocab[0]
    result: dict[str, object] = {"mode": args.child, "vocab": v, "positions": b * t}
    try:
        # Inputs are created in place, without temporaries, so that the peak before the reset is the input size.
        hs = torch.randn(b, t, h).mul_(0.5).requires_grad_(True)
        ws = torch.randn(v, h).mul_(h**-0.5).requires_grad_(True)
        ht = torch.randn(b, t, args.teacher_hidden).mul_(0.5)
        wt = torch.randn(v, args.teacher_hidden).mul_(args.teacher_hidden**-0.5)
        mask = torch.ones(b, t, dtype=torch.bool)
        mask[:, : int(t * args.prompt_fraction)] = False
        result["valid_positions"] = int(mask.sum())

        workspace = Workspace()  # the chunked path's scratch memory, kept across the repeats

        def step() -> torch.Tensor:
            hs.grad = ws.grad = None
            if args.child == "dense":
                zs = hs @ ws.t()
                with torch.no_grad():
                    zt = ht @ wt.t()
                loss = reduce_divergence(jsd(zs, zt, beta=0.5), mask, "token")
            else:
                loss = chunked_divergence_loss(
                    hs,
                    ws,
                    mask,
                    teacher_hidden=ht,
                    teacher_weight=wt,
                    divergence="jsd",
                    beta=0.5,
                    chunk_size=args.chunk_size,
                    workspace=workspace,
                )
            loss.backward()
            return loss.detach()

        baseline_kib = _status_kib("VmRSS")
        method = _reset_peak()
        times = []
        for _ in range(max(1, args.repeat)):
            start = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - start)
        peak_kib = _peak_kib(method)
        if len(times) > 1:
            result["steady_seconds"] = statistics.median(times[1:])
        result.update(
            ok=True,
            loss=float(loss),
            seconds=times[0],
            peak_above_inputs_mb=(peak_kib - baseline_kib) / 1024,
            inputs_mb=baseline_kib / 1024,
            method=method,
        )
    except (RuntimeError, MemoryError) as err:  # torch reports a failed allocation as RuntimeError
        message = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        result.update(ok=False, oom=any(m.lower() in message.lower() for m in OOM_MARKERS), error=message)
    print(RESULT_TAG + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Parent: orchestrate, extrapolate, print
# ----------------------------------------------------------------------------------------------------------------


def _available_bytes() -> int:
    text = Path("/proc/meminfo").read_text()
    match = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def measure(args: argparse.Namespace, mode: str, vocab: int, batch: int, seq_len: int) -> dict[str, object]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        mode,
        "--vocab",
        str(vocab),
        "--batch",
        str(batch),
        "--seq-len",
        str(seq_len),
        "--hidden",
        str(args.hidden),
        "--teacher-hidden",
        str(args.teacher_hidden),
        "--prompt-fraction",
        str(args.prompt_fraction),
        "--threads",
        str(args.threads),
        "--mem-limit-bytes",
        str(args.mem_limit_bytes),
        "--repeat",
        str(args.repeat),
    ]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    # Crashed without reporting: killed by a signal (the OOM killer sends SIGKILL) or an allocation failure outside
    # of Python's reach counts as "did not fit"; anything else is reported as an error.
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
    oom = proc.returncode < 0 or any(m.lower() in proc.stderr.lower() for m in OOM_MARKERS)
    return {"mode": mode, "vocab": vocab, "ok": False, "oom": oom, "error": f"exit {proc.returncode}: {tail}"}


def estimate_dense_mb(args: argparse.Namespace, vocab: int) -> float | None:
    """Peak above inputs of the full dense run, from two smaller dense runs (peak = a + b * positions)."""
    points = []
    for divisor in (16, 8):
        seq = max(1, args.seq_len // divisor)
        r = measure(args, "dense", vocab, args.batch, seq)
        if not r.get("ok"):
            return None
        points.append((args.batch * seq, float(r["peak_above_inputs_mb"])))  # type: ignore[arg-type]
    (n1, m1), (n2, m2) = points
    slope = (m2 - m1) / (n2 - n1)
    return m1 + slope * (args.batch * args.seq_len - n1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32_000, 128_000])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--positions", type=int, default=None, help="total positions (overrides --seq-len)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--teacher-hidden", type=int, default=None, help="defaults to --hidden")
    parser.add_argument("--prompt-fraction", type=float, default=0.125, help="leading positions masked out")
    parser.add_argument("--chunk-size", type=int, default=None, help="default: the library's choice")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--mem-limit-gib", type=float, default=20.0, help="RLIMIT_AS of each child")
    parser.add_argument("--modes", nargs="+", default=["dense", "chunked"], choices=["dense", "chunked"])
    parser.add_argument("--repeat", type=int, default=1, help="forward + backward runs per measurement")
    parser.add_argument("--child", choices=["dense", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--mem-limit-bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.teacher_hidden is None:
        args.teacher_hidden = args.hidden
    if args.child:
        run_child(args)
        return
    if args.positions:
        args.seq_len = max(1, args.positions // args.batch)
    # Never let a child take more than most of what is actually free on the machine.
    available = _available_bytes()
    limit = int(args.mem_limit_gib * GIB)
    if available:
        limit = min(limit, int(available * 0.9))
    args.mem_limit_bytes = limit

    n = args.batch * args.seq_len
    print(
        f"positions {args.batch} x {args.seq_len} = {n} ({1 - args.prompt_fraction:.3g} valid), hidden {args.hidden}, "
        f"teacher hidden {args.teacher_hidden}, float32, threads {args.threads}, "
        f"child RLIMIT_AS {limit / GIB:.1f} GiB"
    )
    rows: list[tuple[str, ...]] = []
    machine: list[str] = []
    losses: dict[int, dict[str, float]] = {}
    for vocab in args.vocab:
        for mode in args.modes:
            r = measure(args, mode, vocab, args.batch, args.seq_len)
            key = f"{mode}_peak_mb_v{vocab}"
            if r.get("ok"):
                peak, secs = float(r["peak_above_inputs_mb"]), float(r["seconds"])  # type: ignore[arg-type]
                losses.setdefault(vocab, {})[mode] = float(r["loss"])  # type: ignore[arg-type]
                rows.append((str(vocab), mode, f"{peak:,.0f}", f"{secs:.1f}", f"{float(r['loss']):.6f}", ""))  # type: ignore[arg-type]
                machine += [f"{key}={peak:.1f}", f"{mode}_seconds_v{vocab}={secs:.2f}"]
                if "steady_seconds" in r:
                    machine.append(f"{mode}_steady_seconds_v{vocab}={float(r['steady_seconds']):.3f}")  # type: ignore[arg-type]
            elif not r.get("oom"):
                rows.append((str(vocab), mode, "-", "-", "-", "error (see stderr)"))
                machine.append(f"{key}=NA")
                print(f"  [{mode} V={vocab}] {r.get('error')}", file=sys.stderr)
            else:
                estimate = estimate_dense_mb(args, vocab) if mode == "dense" else None
                note = "did not fit" + (
                    f" (needs ≈ {estimate / 1024:.1f} GiB above inputs)" if estimate else ""
                )
                rows.append((str(vocab), mode, "-", "-", "-", note))
                machine.append(f"{key}=NA")
                if estimate:
                    machine.append(f"{mode}_estimated_peak_mb_v{vocab}={estimate:.0f}")
                print(f"  [{mode} V={vocab}] {r.get('error')}", file=sys.stderr)

    header = ("vocab", "path", "peak MB above inputs", "fwd+bwd s", "loss", "note")
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    for vocab, pair in losses.items():
        if len(pair) == 2:
            rel = abs(pair["dense"] - pair["chunked"]) / max(abs(pair["dense"]), 1e-30)
            machine.append(f"dense_vs_chunked_loss_rel_diff_v{vocab}={rel:.2e}")
    for line in machine:
        print(line)


if __name__ == "__main__":
    main()
