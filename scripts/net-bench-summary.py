#!/usr/bin/env python3
"""Summarizes several `mbmq-net-bench --json` runs (issue #19): per row, the median of the runs'
(and rounds') p50 (round trips, us) or MB/s (one-way) with [lowest-highest], and per check the
median of the runs' ratios (of one run: its own median of its rounds' ratios). Usage: python3 scripts/net-bench-summary.py run1.json run2.json ..."""
import json
import statistics as st
import sys


def human(n):
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20} MiB"
    if n >= 1024 and n % 1024 == 0:
        return f"{n >> 10} KiB"
    return f"{n} B"


def main(paths):
    runs = [json.load(open(p)) for p in paths]
    rows = {}
    for d in runs:
        for r in d["results"]:
            rows.setdefault((r["mechanism"], r["kind"], r["size"]), []).append(r)
    for (mech, kind, size), rs in rows.items():
        errors = [r["error"] for r in rs if r.get("error")]
        if kind == "round-trip":
            v = [r["p50_ns"] / 1e3 for r in rs if r.get("p50_ns")]
            p99 = [r["p99_ns"] / 1e3 for r in rs if r.get("p99_ns")]
            line = f"{mech:15} round trip {human(size):>7}  p50 {st.median(v):10.1f} us [{min(v):.1f}-{max(v):.1f}]" if v else f"{mech:15} round trip {human(size):>7}  -"
            if p99:
                line += f"  p99 {st.median(p99):10.1f} us [{min(p99):.1f}-{max(p99):.1f}]"
        else:
            v = [r["mb_per_s"] for r in rs if r.get("mb_per_s")]
            line = f"{mech:15} one-way    {human(size):>7}  {st.median(v):8.1f} MB/s [{min(v):.1f}-{max(v):.1f}]" if v else f"{mech:15} one-way    {human(size):>7}  -"
        print(line + (f"  errors: {errors}" if errors else ""))
    checks = {}
    for d in runs:
        for c in d["checks"]:
            checks.setdefault((c["check"], c["limit"]), []).append(c)
    print()
    for (what, limit), cs in checks.items():
        v = [c["measured"] for c in cs]
        med = st.median(v)
        if len(cs) == 1 and "rounds" in cs[0]:  # one run of several interleaved rounds
            c = cs[0]
            print(f"{what:46} {med:6.2f} [{c['lowest']:.2f}-{c['highest']:.2f}]  bar <= {limit:.2f}  "
                  f"{'met' if med <= limit else 'NOT met'} (median of {c['rounds']} rounds)")
            continue
        print(f"{what:46} {med:6.2f} [{min(v):.2f}-{max(v):.2f}]  bar <= {limit:.2f}  "
              f"{'met' if med <= limit else 'NOT met'} (median of {len(v)} runs)")
    for d in runs:
        m = d["machine"]
        print(f"loadavg {m['loadavg_before'].split()[0]} -> {m['loadavg_after'].split()[0]}")


if __name__ == "__main__":
    main(sys.argv[1:])
