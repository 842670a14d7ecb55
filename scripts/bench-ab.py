#!/usr/bin/env python3
# Interleaved A/B: rounds of `mbmq bench` for each binary; medians of per-round p50 and ratios.
# python3 scripts/bench-ab.py BIN1[,BIN2...] ROUNDS MECHANISMS SIZES
#   e.g. python3 scripts/bench-ab.py build/tools/mbmq 7 raw-futex,mbmq-sleep,uds 64,4K
import json, subprocess, sys, statistics
bins = sys.argv[1].split(',')
rounds = int(sys.argv[2])
mechs = sys.argv[3]
sizes = sys.argv[4]
res = {b: [] for b in bins}
for r in range(rounds):
    for b in bins:
        out = subprocess.run([b, 'bench', '--mechanisms', mechs, '--sizes', sizes, '--seconds', '0.4',
                              '--no-strace', '--json'], capture_output=True, text=True).stdout
        d = json.loads(out)
        rows = d.get('results', d.get('rows'))
        res[b].append({(x['mechanism'], x['size']): x['p50_ns'] for x in rows})
for b in bins:
    print(b)
    keys = res[b][0].keys()
    for k in keys:
        print('  %-12s %7s p50 median %.2f us' % (k[0], k[1], statistics.median(x[k] for x in res[b]) / 1000))
    for (m, base) in [('mbmq-sleep', 'raw-futex'), ('mbmq-sleep', 'uds'), ('mbmq-fd', 'mbmq-sleep'), ('mbmq-spin', 'raw-spin')]:
        for sz in set(k[1] for k in keys):
            if (m, sz) in keys and (base, sz) in keys:
                rat = [x[(m, sz)] / x[(base, sz)] for x in res[b]]
                print('  %s/%s @%s: median of per-round ratios %.3f (min %.3f max %.3f)' % (m, base, sz, statistics.median(rat), min(rat), max(rat)))
