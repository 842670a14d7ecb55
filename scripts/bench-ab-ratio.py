#!/usr/bin/env python3
# python3 scripts/bench-ab-ratio.py BEFORE,AFTER ROUNDS MECHANISMS SIZES
# As scripts/bench-ab.py (interleaved rounds, --seconds 0.4), plus the median of per-round
# after/before p50 ratios per mechanism.
import json, subprocess, sys, statistics
a, b = sys.argv[1].split(',')
rounds = int(sys.argv[2]); mechs = sys.argv[3]; sizes = sys.argv[4]
res = {a: [], b: []}
for r in range(rounds):
    order = (a, b) if r % 2 == 0 else (b, a)
    for x in order:
        out = subprocess.run([x, 'bench', '--mechanisms', mechs, '--sizes', sizes, '--seconds', '0.4',
                              '--no-strace', '--json'], capture_output=True, text=True).stdout
        d = json.loads(out); rows = d.get('results', d.get('rows'))
        res[x].append({(y['mechanism'], y['size']): y['p50_ns'] for y in rows})
for k in res[a][0]:
    pa = [r[k] for r in res[a]]; pb = [r[k] for r in res[b]]
    rat = [y / x for x, y in zip(pa, pb)]
    print('%-14s %4s before p50 median %8.0f ns  after %8.0f ns  after/before per-round median %.3f (min %.3f max %.3f)' % (
        k[0], k[1], statistics.median(pa), statistics.median(pb), statistics.median(rat), min(rat), max(rat)))
