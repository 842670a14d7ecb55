#!/usr/bin/python3
"""Python call() beside C++ call() in the same run (issue #17).

Rows, each the median over interleaved rounds of one round's p50:
  c++     `mbmq bench --mechanisms mbmq-adaptive --no-touch`: C++ client and server
  python  this script: a Python client and a forked Python server, the same channel options
          (adaptive wait), the same CPUs (client 0, server 1), the same work: the client writes
          8 bytes of the payload (through a numpy view made once), the server answers in place
          without touching it (a view per received message would cost a mapping, see README).

    nice -n -20 env PYTHONPATH=build/python python3 examples/python/bench_call.py \
        [--mbmq build/tools/mbmq] [--sizes 64,16M] [--rounds 5] [--seconds 0.5] [--json]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

import mbmq


def parse_size(text):
    mult = {"K": 1 << 10, "M": 1 << 20}
    return int(text[:-1]) * mult[text[-1]] if text[-1] in mult else int(text)


def cpp_round(tool, sizes, seconds):
    out = subprocess.run(
        [tool, "bench", "--json", "--mechanisms", "mbmq-adaptive", "--no-touch", "--no-strace",
         "--sizes", ",".join(str(s) for s in sizes), "--seconds", str(seconds)],
        check=True, capture_output=True, text=True).stdout
    return {r["size"]: r["p50_ns"] for r in json.loads(out)["results"]}


def python_server(server):
    os.sched_setaffinity(0, {1})
    while True:
        try:
            msg = server.receive()
        except mbmq.PeerClosed:
            return
        msg.reply()


def python_round(sizes, seconds):
    client, server = mbmq.Channel.pair()
    pid = os.fork()
    if pid == 0:
        client.close()
        try:
            python_server(server)
        finally:
            os._exit(0)
    server.close()
    os.sched_setaffinity(0, {0})
    p50 = {}
    clock = time.perf_counter_ns
    for size in sizes:
        buf = client.buffer(size)
        head = np.frombuffer(buf, dtype=np.uint64, count=1)
        for _ in range(1000):  # warm up
            client.call(buf)
        lat = []
        end = clock() + int(seconds * 1e9)
        i = 0
        while True:
            head[0] = i
            t0 = clock()
            client.call(buf)
            t1 = clock()
            lat.append(t1 - t0)
            i += 1
            if t1 > end:
                break
        p50[size] = statistics.median(lat)
        del head
        buf.release()
    client.close()
    os.waitpid(pid, 0)
    os.sched_setaffinity(0, set(range(os.cpu_count())))
    return p50


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--mbmq", default=os.path.join(here, "../../build/tools/mbmq"))
    ap.add_argument("--sizes", default="64,16M")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tool = args.mbmq if os.path.exists(args.mbmq) else shutil.which("mbmq")
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    rows = {"c++": {s: [] for s in sizes}, "python": {s: [] for s in sizes}}
    for r in range(args.rounds):  # interleaved, alternating which goes first
        order = [("c++", lambda: cpp_round(tool, sizes, args.seconds)),
                 ("python", lambda: python_round(sizes, args.seconds))]
        for name, run in order if r % 2 == 0 else reversed(order):
            for size, p50 in run().items():
                rows[name][size].append(p50)
    result = []
    for s in sizes:
        c, p = statistics.median(rows["c++"][s]), statistics.median(rows["python"][s])
        result.append({"size": s, "cpp_p50_us": c / 1e3, "python_p50_us": p / 1e3,
                       "python_adds_us": (p - c) / 1e3,
                       "cpp_rounds_us": [x / 1e3 for x in rows["c++"][s]],
                       "python_rounds_us": [x / 1e3 for x in rows["python"][s]]})
    if args.json:
        print(json.dumps({"rounds": args.rounds, "seconds": args.seconds, "rows": result},
                         indent=2))
        return 0
    print(f"call() p50, median of {args.rounds} interleaved rounds of {args.seconds} s "
          f"(nice {os.nice(0)}):")
    print(f"{'size':>10} {'C++ us':>9} {'Python us':>10} {'Python adds us':>15}")
    for row in result:
        print(f"{row['size']:>10} {row['cpp_p50_us']:>9.2f} {row['python_p50_us']:>10.2f} "
              f"{row['python_adds_us']:>15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
