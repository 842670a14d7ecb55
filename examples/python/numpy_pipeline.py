#!/usr/bin/python3
"""A NumPy array to another Python process and back, with zero copies (issue #17).

The parent writes a 256 MiB float32 array straight into an mbmq buffer (numpy.frombuffer: a view
of the shared memory), calls a forked child, which works on the same pages in place and replies;
the answer is in the parent's array. For comparison, the same array goes the usual way, through a
multiprocessing pipe (pickled, copied into the pipe and out again), in the same run.

    PYTHONPATH=build/python python3 examples/python/numpy_pipeline.py [--mib 256] [--rounds 3]
"""
import argparse
import multiprocessing
import os
import statistics
import sys
import time

import numpy as np

import mbmq


def mbmq_server(server):
    """The child: answers each request by adding 1 to the first and last element, in place."""
    while True:
        try:
            msg = server.receive()
        except mbmq.PeerClosed:
            return
        arr = np.frombuffer(msg.buffer, dtype=np.float32)
        arr[0] += 1
        arr[-1] += 1
        del arr  # views must go before the buffer is given back
        msg.reply()


def pipe_server(conn):
    """The child of the comparison: the same work on a pickled copy, sent back pickled."""
    while True:
        try:
            arr = conn.recv()
        except EOFError:
            return
        arr[0] += 1
        arr[-1] += 1
        conn.send(arr)


def run_child(target, arg, close_in_child):
    pid = os.fork()
    if pid == 0:
        close_in_child.close()
        try:
            target(arg)
        finally:
            os._exit(0)
    return pid


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    n = args.mib * (1 << 20) // 4

    # mbmq: one buffer, written in place, called across processes.
    client, server = mbmq.Channel.pair()
    buf = client.buffer(n * 4)
    arr = np.frombuffer(buf, dtype=np.float32)
    arr[:] = 1.0
    pid = run_child(mbmq_server, server, client)
    server.close()
    mbmq_times = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        client.call(buf, timeout=60)
        mbmq_times.append(time.perf_counter() - t0)
    assert np.shares_memory(arr, buf), "the array is not a view of the buffer"
    assert arr[0] == 1 + args.rounds and arr[-1] == 1 + args.rounds, "the reply is not in arr"
    assert arr[1] == 1.0
    client.close()
    os.waitpid(pid, 0)

    # The usual way: multiprocessing.Pipe (pickle), the same array, the same work.
    parent_end, child_end = multiprocessing.Pipe()
    pid = run_child(pipe_server, child_end, parent_end)
    child_end.close()
    plain = np.ones(n, dtype=np.float32)
    pipe_times = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        parent_end.send(plain)
        plain = parent_end.recv()
        pipe_times.append(time.perf_counter() - t0)
    assert plain[0] == 1 + args.rounds and plain[-1] == 1 + args.rounds
    parent_end.close()
    os.waitpid(pid, 0)

    m, p = statistics.median(mbmq_times), statistics.median(pipe_times)
    print(f"{args.mib} MiB float32 array, there and back, median of {args.rounds}:")
    print(f"  mbmq call (0 copies, np.shares_memory: True): {m * 1e3:9.3f} ms")
    print(f"  multiprocessing.Pipe (pickle, copies):       {p * 1e3:9.3f} ms  ({p / m:.0f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
