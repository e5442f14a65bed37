"""Markdown tables (and optional speedup bars) from pytest-benchmark JSON files of this suite.

    python benchmarks/report.py results/*.json                 # markdown on stdout
    python benchmarks/report.py a.json b.json -o table.md --plot speedup.png
    python benchmarks/report.py run.json --compact              # one table, a row per entry

Per JSON file a machine line (device, torch/triton/CUDA versions, date). Then one table per benchmark group with a
row per implementation: wall-clock median (pytest-benchmark, synchronised calls) with its interquartile range and
rounds, the device-time median from ``triton.testing.do_bench`` and its 20-80 % quantiles (CUDA runs), peak
memory, the real-time factor where the entry is an inference one, and the speedup over ``reference`` (device
median when both have one, else wall median). A summary table first lists each group's reference time and best
speedup. Runs made with ``--benchmark-disable`` carry no statistics; their groups are listed as not timed.
``--plot`` draws the speedups as horizontal bars per group (needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

IMPL_ORDER = ("reference", "cython", "compiled", "triton", "auto", "graphs", "fast", "dispatcher", "eager")


def load(paths: Sequence[str]) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """(runs, entries): one machine record per file, and every benchmark entry (with its file's index)."""
    runs, entries = [], []
    for i, path in enumerate(paths):
        data = json.loads(Path(path).read_text())
        runs.append({"path": str(path), "machine": data.get("machine_info", {}), "datetime": data.get("datetime"),
                     "version": data.get("version")})
        for b in data.get("benchmarks", []):
            entries.append({**b, "_run": i})
    return runs, entries


def impl_of(entry: Dict[str, Any]) -> str:
    info = entry.get("extra_info") or {}
    if info.get("impl"):
        return str(info["impl"])
    params = entry.get("params") or {}
    return str(params.get("impl", entry.get("name", "?")))


def label(entry: Dict[str, Any]) -> str:
    """Row label: the implementation, with its file when a group has it from several files."""
    return entry.get("_label") or impl_of(entry)


def wall_ms(entry: Dict[str, Any]) -> Optional[float]:
    stats = entry.get("stats") or {}
    return stats["median"] * 1e3 if "median" in stats else None


def device_ms(entry: Dict[str, Any]) -> Optional[float]:
    return (entry.get("extra_info") or {}).get("device_ms_median")


def best_time(entry: Dict[str, Any], use_device: bool) -> Optional[float]:
    return device_ms(entry) if use_device else wall_ms(entry)


def machine_line(run: Dict[str, Any]) -> str:
    m = run["machine"]
    v = m.get("vits_fast", {})
    cpu = (m.get("cpu") or {}).get("brand_raw") or m.get("processor") or "?"
    device = v.get("gpu") or f"CPU only ({cpu}, {v.get('cpu_threads', '?')} intra-op thread(s))"
    parts = [f"**{device}**", f"host {m.get('node', '?')}", f"torch {v.get('torch', '?')}",
             f"triton {v.get('triton', '?')}", f"CUDA {v.get('cuda') or '-'}", f"Python {v.get('python', '?')}",
             f"date {v.get('date') or run.get('datetime') or '?'}"]
    return f"- `{run['path']}`: " + ", ".join(parts)


def _fmt(v: Optional[float], digits: int = 3) -> str:
    """``digits`` decimals below 10, two from 10, one from 100; scientific below 0.01."""
    if v is None:
        return "-"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 100:
        return f"{v:.1f}"
    if a >= 10:
        return f"{v:.2f}"
    if a >= 0.01:
        return f"{v:.{digits}f}"
    return f"{v:.2e}"


def _speedup(s: Optional[float]) -> str:
    return f"{s:.2f}x" if s else "-"


def group_entries(entries: List[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    """Entries by group name, merged across files (a suite split over several pytest runs); an implementation that
    occurs in one group from several files is labelled with its file ("triton (file 2)")."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for e in entries:
        groups.setdefault(str(e.get("group") or e.get("name")), []).append(e)
    for rows in groups.values():
        seen: Dict[str, int] = {}
        for e in rows:
            seen[impl_of(e)] = seen.get(impl_of(e), 0) + 1
        for e in rows:
            if seen[impl_of(e)] > 1:
                e["_label"] = f"{impl_of(e)} (file {e['_run'] + 1})"
        rows.sort(key=lambda e: (IMPL_ORDER.index(impl_of(e)) if impl_of(e) in IMPL_ORDER else 99, e["_run"]))
    return groups


def speedups(rows: List[Dict[str, Any]]) -> Tuple[bool, Dict[str, Optional[float]]]:
    """(whether device time is compared, speedup over ``reference`` per implementation)."""
    ref = next((e for e in rows if impl_of(e) == "reference"), None)
    use_device = ref is not None and device_ms(ref) is not None and all(
        device_ms(e) is not None for e in rows if wall_ms(e) is not None)
    out: Dict[str, Optional[float]] = {}
    ref_t = best_time(ref, use_device) if ref is not None else None
    for e in rows:
        t = best_time(e, use_device)
        out[label(e)] = ref_t / t if ref_t and t else None
    return use_device, out


def _row_cells(e: Dict[str, Any], sp: Dict[str, Optional[float]]) -> List[str]:
    info = e.get("extra_info") or {}
    stats = e.get("stats") or {}
    iqr = stats.get("iqr")
    p20, p80 = info.get("device_ms_p20"), info.get("device_ms_p80")
    band = f"{_fmt(p20)}-{_fmt(p80)}" if p20 is not None and p80 is not None else "-"
    return [label(e), _fmt(wall_ms(e)), _fmt(iqr * 1e3 if iqr is not None else None), str(stats.get("rounds", "-")),
            _fmt(device_ms(e)), band, _fmt(info.get("peak_mem_mb"), 2), _fmt(info.get("rtf_median")),
            _speedup(sp.get(label(e)))]


_HEAD = ["wall median ms", "wall IQR ms", "rounds", "device median ms", "device p20-p80 ms", "peak MB", "RTF",
         "speedup"]


def render_compact(runs: List[Dict[str, Any]], entries: List[Dict[str, Any]], title: str) -> str:
    """One table, a row per entry (group, implementation, the numbers); speedups as in :func:`render`."""
    lines = [f"## {title}", ""] + [machine_line(r) for r in runs] + [""]
    lines += ["| group | impl | " + " | ".join(_HEAD) + " |", "|---|---|" + "---:|" * len(_HEAD)]
    for g, rows in group_entries(entries).items():
        _, sp = speedups(rows)
        for e in rows:
            lines.append(f"| {g} | " + " | ".join(_row_cells(e, sp)) + " |")
    return "\n".join(lines)


def render(runs: List[Dict[str, Any]], entries: List[Dict[str, Any]], title: str) -> str:
    lines = [f"## {title}", ""]
    lines += [machine_line(r) for r in runs] + [""]
    groups = group_entries(entries)
    timed = {g: rows for g, rows in groups.items() if any(wall_ms(e) is not None for e in rows)}
    untimed = [g for g in groups if g not in timed]

    if timed:
        lines += ["### Summary", "", "| group | reference ms | best | speedup |", "|---|---:|---|---:|"]
        for g, rows in timed.items():
            use_device, sp = speedups(rows)
            ref = next((e for e in rows if impl_of(e) == "reference"), None)
            others = [(sp[label(e)], label(e)) for e in rows if impl_of(e) != "reference" and sp.get(label(e))]
            best = max(others) if others else None
            ref_t = best_time(ref, use_device) if ref else None
            lines.append(f"| {g} | {_fmt(ref_t)}{' (device)' if use_device else ''} | "
                         f"{best[1] if best else '-'} | {_speedup(best[0] if best else None)} |")
        lines.append("")

    for g, rows in timed.items():
        use_device, sp = speedups(rows)
        lines += [f"### {g}", "", "| impl | " + " | ".join(_HEAD) + " |", "|---|" + "---:|" * len(_HEAD)]
        lines += ["| " + " | ".join(_row_cells(e, sp)) + " |" for e in rows]
        lines.append(f"\nspeedup by {'device' if use_device else 'wall'} median.\n")
    if untimed:
        lines += ["### Not timed (run with --benchmark-disable: each entry ran once)", ""]
        lines += [f"- {g}: {', '.join(label(e) for e in groups[g])}" for g in untimed]
        lines.append("")
    return "\n".join(lines)


def plot(entries: List[Dict[str, Any]], path: str) -> bool:
    """Speedup bars over ``reference`` per group and implementation (groups with something to compare); False
    when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = {g: rows for g, rows in group_entries(entries).items()
              if any(impl_of(e) != "reference" and v for e in rows for v in [speedups(rows)[1].get(label(e))])}
    if not groups:
        return True  # nothing to compare (only reference entries): no plot
    impls = [i for i in IMPL_ORDER if any(impl_of(e) == i for rows in groups.values() for e in rows)]
    impls = [i for i in impls if i != "reference"]
    names = list(groups)
    fig, ax = plt.subplots(figsize=(10, max(2.0, 0.32 * len(names) * max(1, len(impls)) + 1)))
    height = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        vals = [speedups(groups[g])[1].get(impl) or 0.0 for g in names]
        ax.barh([j + k * height for j in range(len(names))], vals, height=height, label=impl)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([j + height * (len(impls) - 1) / 2 for j in range(len(names))])
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speedup over reference (log scale; >1 is faster)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: Optional[Sequence[str]] = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", help="pytest-benchmark JSON files (--benchmark-json)")
    p.add_argument("-o", "--out", help="write the markdown here (default: stdout)")
    p.add_argument("--plot", help="write speedup bars to this PNG (needs matplotlib)")
    p.add_argument("--title", default="vits_fast benchmarks", help="heading of the markdown")
    p.add_argument("--compact", action="store_true", help="one table with a row per entry instead of per group")
    args = p.parse_args(argv)
    runs, entries = load(args.json)
    text = (render_compact if args.compact else render)(runs, entries, args.title)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    if args.plot and not plot(entries, args.plot):
        print("report.py: matplotlib is not installed; no plot written", file=sys.stderr)
    return text


if __name__ == "__main__":
    main()
