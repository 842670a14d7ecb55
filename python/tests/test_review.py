# Hostile review of the Python module (#17). Every case that might crash, hang or leak runs in its
# own python3 subprocess, bounded by a timeout, so a segfault or deadlock is a failed test here,
# not a dead pytest. Each script prints "OK" (and sometimes facts) on success.
import os
import subprocess
import sys
import textwrap

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

PRELUDE = """
import gc, os, sys, threading, time
import numpy as np
import mbmq
MIB = 1 << 20
def serve_once(server, client, fill=None, delay=0.0, hold=None):
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            client.close()
            msg = server.receive(timeout=10)
            time.sleep(delay)
            if fill is not None:
                v = np.frombuffer(msg.buffer, dtype=np.uint8); v[:] = fill; del v
            msg.reply()
            if hold is not None:
                os.read(hold, 1)
        except BaseException as e:
            sys.stderr.write("child: %r\\n" % (e,)); code = 1
        os._exit(code)
    server.close()
    return pid
"""


def run(code, timeout=30):
    env = dict(os.environ)
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    src = PRELUDE + textwrap.dedent(code)
    try:
        p = subprocess.run([sys.executable, "-c", src], env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail("HANG (timeout %ss): stdout=%r stderr=%r" % (timeout, e.stdout, e.stderr))
    return p.returncode, p.stdout, p.stderr


def ok(code, timeout=30):
    rc, out, err = run(code, timeout)
    assert rc == 0 and "OK" in out, "rc=%d stdout=%r stderr=%r" % (rc, out, err[-3000:])
    return out


# ---- 1. a view that outlives a timed-out call aliases whatever reuses the buffer's memory ---------

@pytest.mark.parametrize("size", [64, 8 << 20], ids=["pool_slot", "extent"])
def test_r01_stale_view_after_timed_out_call_aliases_a_new_buffer(size):
    ok(f"""
    a, b = mbmq.Channel.pair()
    buf = a.buffer({size})
    old = np.frombuffer(buf, dtype=np.uint8)
    old[:] = 3
    hr, hw = os.pipe()
    pid = serve_once(b, a, fill=9, delay=0.3, hold=hr)
    try:
        a.call(buf, timeout=0.05)
    except mbmq.TimedOut:
        pass
    assert not buf.valid
    time.sleep(0.6)
    try:
        a.receive(timeout=0.05)   # takes the late reply in: the slot / extent is free again
    except mbmq.Error:
        pass
    fresh = []
    for _ in range(4):
        nb = a.buffer({size})
        nv = np.frombuffer(nb, dtype=np.uint8)
        nv[:] = 1
        fresh.append((nb, nv))
    old[:] = 0xEE      # write through the view of the given-up buffer
    hit = [i for i, (nb, nv) in enumerate(fresh) if nv[0] == 0xEE]
    print("aliased_new_buffers", hit)
    os.write(hw, b"x"); os.waitpid(pid, 0)
    assert not hit, "a view of a given-up buffer writes into a live buffer %r" % hit
    print("OK")
    """)


# ---- 2. close() from another thread while a call / receive waits (GIL held by close?) -------------

def test_r02_close_while_another_thread_is_in_call_does_not_deadlock():
    out = ok("""
    a, b = mbmq.Channel.pair()
    buf = a.buffer(64)
    res = []
    def caller():
        try:
            a.call(buf, timeout=None)
            res.append("returned")
        except Exception as e:
            res.append(type(e).__name__)
    t = threading.Thread(target=caller, daemon=True); t.start()
    time.sleep(0.3)
    a.close()
    t.join(5)
    assert not t.is_alive(), "call() did not return after close()"
    print(res); print("OK")
    """)
    print(out)


def test_r02b_close_while_another_thread_is_in_receive_does_not_deadlock():
    ok("""
    a, b = mbmq.Channel.pair()
    res = []
    def rx():
        try:
            b.receive(timeout=None); res.append("returned")
        except Exception as e:
            res.append(type(e).__name__)
    t = threading.Thread(target=rx, daemon=True); t.start()
    time.sleep(0.3)
    b.close()
    t.join(5)
    assert not t.is_alive(), "receive() did not return after close()"
    print(res); print("OK")
    """)


# ---- 3. every waiting call releases the GIL --------------------------------------------------------

@pytest.mark.parametrize("what", ["call", "queue_wait", "accept", "buffer_timeout", "connect",
                                  "reply_and_wait"])
def test_r03_waiting_calls_release_the_gil(what):
    ok(f"""
    what = {what!r}
    a, b = mbmq.Channel.pair(slots_per_side=2, slot_size=4096)
    name = "mbmq-review-%d" % os.getpid()
    if what == "call":
        buf = a.buffer(64)
        f = lambda: a.call(buf, timeout=0.5)
    elif what == "queue_wait":
        q = mbmq.MsgQueue()
        f = lambda: q.wait(timeout=0.5)
    elif what == "accept":
        l = mbmq.Listener(name)
        f = lambda: l.accept(timeout=0.5)
    elif what == "buffer_timeout":
        keep = [a.buffer(4096) for _ in range(2)]
        for k in keep: a.send(k)
        f = lambda: a.buffer(4096, timeout=0.5)
    elif what == "connect":
        # a listener whose process is stopped: connect() waits for the handshake until its timeout
        import signal
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            l = mbmq.Listener(name); os.write(w, b"x"); time.sleep(30); os._exit(0)
        os.read(r, 1); os.kill(child, signal.SIGSTOP)
        f = lambda: mbmq.connect(name, timeout=0.5)
    elif what == "reply_and_wait":
        q = mbmq.MsgQueue()
        b.redirect(q, 1)
        x = a.buffer(16); a.send(x)
        m = q.wait(timeout=2)
        f = lambda: q.reply_and_wait(m, timeout=0.5)
    errs = []
    def g():
        try: f()
        except Exception as e: errs.append(e)
    t = threading.Thread(target=g); start = time.monotonic(); t.start()
    spins = 0
    while t.is_alive() and time.monotonic() - start < 0.4:
        spins += 1
    t.join(10)
    print(what, "spins", spins, errs)
    if what == "connect":
        os.kill(child, signal.SIGKILL); os.waitpid(child, 0)
    assert spins > 1000, "the main thread did not run while %s waited" % what
    print("OK")
    """)


# ---- 4. sizes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("expr", ["a.buffer((1 << 32) + 8)", "a.buffer(1 << 40)", "a.buffer(1 << 63)",
                                  "a.buffer(-1)", "a.buffer(1 << 64)",
                                  "a.buffer(64).resize((1 << 32) + 8)",
                                  "a.buffer(64).resize(-5)"])
def test_r04_huge_or_negative_sizes_raise_and_never_wrap(expr):
    out = ok(f"""
    a, b = mbmq.Channel.pair()
    try:
        r = {expr}
        n = len(r) if r is not None else None
        if n is None:  # resize returned None: look at the buffer
            pass
        print("NO EXCEPTION: len", n)
        assert False, "no exception: a size past 4 GiB wrapped?"
    except (ValueError, OverflowError, TypeError, mbmq.Error, MemoryError) as e:
        print("raised", type(e).__name__, e)
    print("OK")
    """)
    print(out)


def test_r04b_resize_past_4gib_does_not_wrap_to_a_small_size():
    ok("""
    a, b = mbmq.Channel.pair()
    buf = a.buffer(64)
    try:
        buf.resize((1 << 32) + 8)
    except Exception as e:
        print("raised", type(e).__name__, e)
    print("len", len(buf))
    assert len(buf) != 8, "resize(4 GiB + 8) wrapped to 8"
    print("OK")
    """)


# ---- 5. timeouts and spin_us -------------------------------------------------------------------------

@pytest.mark.parametrize("t,expect", [("float('inf')", "waits"), ("1e300", "waits"),
                                      ("float('nan')", "ValueError"), ("-0.0", "TimedOut"),
                                      ("-1e-9", "ValueError"), ("0", "TimedOut"),
                                      ("True", "?")])
def test_r05_timeout_values(t, expect):
    out = ok(f"""
    a, b = mbmq.Channel.pair()
    res = []
    def rx():
        s = time.monotonic()
        try:
            b.receive(timeout={t}); res.append("returned")
        except Exception as e:
            res.append(type(e).__name__)
        res.append(time.monotonic() - s)
    th = threading.Thread(target=rx, daemon=True); th.start(); th.join(1.0)
    waited = th.is_alive()
    if waited:
        a.send(a.buffer(8)); th.join(5)
    print("timeout", {t!r}, "waited" if waited else "", res)
    expect = {expect!r}
    if expect == "waits": assert waited, res
    elif expect != "?": assert not waited and res[0] == expect, res
    print("OK")
    """)
    print(out)


@pytest.mark.parametrize("spin", ["float('inf')", "1e300", "1e12"])
def test_r05b_spin_us_out_of_range_is_rejected_or_bounded(spin):
    # policy_of: static_cast<int64_t>(spin_us * 1e3) is undefined for inf / values past 2^63.
    out = ok(f"""
    try:
        a, b = mbmq.Channel.pair(wait=mbmq.WaitMode.Adaptive, spin_us={spin})
    except ValueError as e:
        print("rejected", e); print("OK"); sys.exit(0)
    # spin_us * 1e3 past INT64_MAX ns: the cast in policy_of is undefined behaviour; must be rejected
    assert {spin} * 1e3 < 2.0 ** 63, "spin_us=%r accepted (UB cast to int64 in policy_of)" % ({spin},)
    s = time.monotonic()
    try:
        b.receive(timeout=0.2)
    except mbmq.TimedOut:
        pass
    el = time.monotonic() - s
    print("accepted; receive(timeout=0.2) took", el)
    assert el < 2
    print("OK")
    """)
    print(out)


# ---- 6. Message.reply twice, reply on non-requests, reply_and_wait on non-requests -------------------

def test_r06_reply_twice_and_on_non_requests():
    out = ok("""
    a, b = mbmq.Channel.pair()
    pid = os.fork()
    if pid == 0:
        b.close()
        buf = a.buffer(32)
        try: a.call(buf, timeout=5)
        except Exception: pass
        os._exit(0)
    a.close()
    m = b.receive(timeout=5)
    assert m.kind == mbmq.Kind.Request
    m.reply()
    try:
        m.reply(); print("second reply: no exception"); assert False
    except ValueError as e:
        print("second reply:", type(e).__name__, e)
    os.waitpid(pid, 0)
    # one-way message: reply() must refuse
    a, b = mbmq.Channel.pair()
    a.send(a.buffer(8))
    m = b.receive(timeout=5)
    try:
        m.reply(); assert False
    except ValueError as e:
        print("reply on Message:", e)
    print("OK")
    """)
    print(out)


@pytest.mark.parametrize("kind", ["Message", "PeerClosed", "Request_twice"])
def test_r06b_reply_and_wait_on_a_non_request(kind):
    out = ok(f"""
    kind = {kind!r}
    q = mbmq.MsgQueue()
    a, b = mbmq.Channel.pair()
    b.redirect(q, 7)
    if kind == "Message":
        a.send(a.buffer(8))
        m = q.wait(timeout=5)
    elif kind == "PeerClosed":
        a.close()
        m = q.wait(timeout=5)
    else:
        t = threading.Thread(target=lambda: (lambda x: [a.call(x, timeout=2)])(a.buffer(8)), daemon=True)
        t.start()
        m = q.wait(timeout=5)
        try: q.reply_and_wait(m, timeout=0.1)
        except Exception as e: print("first", type(e).__name__)
        t.join(5)
    print("kind", m.kind)
    try:
        r = q.reply_and_wait(m, timeout=0.1)
        print("returned", r.kind)
    except Exception as e:
        print("raised", type(e).__name__, e)
    print("OK")
    """)
    print(out)


# ---- 7. fd and mapping leaks ------------------------------------------------------------------------

def test_r07_no_fd_or_mapping_leak_over_many_pairs_and_views():
    out = ok("""
    def counts():
        return len(os.listdir("/proc/self/fd")), sum(1 for _ in open("/proc/self/maps"))
    def cycle():
        a, b = mbmq.Channel.pair()
        buf = a.buffer(4 * MIB)
        v = np.frombuffer(buf, dtype=np.uint8); v[:10] = 1
        small = a.buffer(64); mv = memoryview(small); mv[:1] = b"x"
        del v, mv
        a.send(buf)
        m = b.receive(timeout=5)
        w = np.frombuffer(m.buffer, dtype=np.uint8); s = int(w[:10].sum()); del w
        del m, small, buf
        a.close(); b.close()
    for _ in range(5): cycle()
    gc.collect()
    f0, m0 = counts()
    for _ in range(300): cycle()
    gc.collect()
    f1, m1 = counts()
    print("fds", f0, f1, "maps", m0, m1)
    assert f1 - f0 <= 2 and m1 - m0 <= 4
    print("OK")
    """, timeout=120)
    print(out)


def test_r07b_no_mapping_leak_after_timed_out_calls_whose_views_were_released():
    out = ok("""
    def maps(): return sum(1 for _ in open("/proc/self/maps"))
    a, b = mbmq.Channel.pair(slots_per_side=4)
    m0 = maps()
    keep = []
    for i in range(50):
        buf = a.buffer(64)
        mv = memoryview(buf); mv[:1] = b"x"; mv.release()
        try: a.call(buf, timeout=0.001)
        except mbmq.TimedOut: pass
        except mbmq.Error as e: print("other", type(e).__name__, e); break
        keep.append(buf)   # the Python object lives on (e.g. in a list of requests)
        try:
            m = b.receive(timeout=1); m.reply()
        except mbmq.Error: pass
    m1 = maps()
    print("maps", m0, m1, "invalid buffers kept", sum(1 for k in keep if not k.valid))
    assert m1 - m0 <= 4, "each invalid Buffer still holds a mapping"
    print("OK")
    """)
    print(out)


# ---- 8. views: GC of the Buffer, nested exports, finalization ----------------------------------------

def test_r08_views_survive_buffer_deletion_and_gc_and_nested_exports_count():
    out = ok("""
    a, b = mbmq.Channel.pair()
    buf = a.buffer(2 * MIB)
    mv = memoryview(buf)
    arr = np.frombuffer(mv, dtype=np.uint8)     # view of a view
    sl = arr[10:20]; sl2 = mv[5:50]
    arr2 = np.asarray(buf)
    print("exports", buf.exports)
    try:
        mv.release(); print("mv.release() with a numpy export: no error")
    except BufferError: pass
    try:
        a.send(buf); assert False
    except BufferError: pass
    ref = buf
    del buf; gc.collect()
    arr[:] = 5; sl[:] = 6
    assert int(arr.sum()) == 5 * arr.size + 10
    del arr, sl, sl2, arr2
    gc.collect()
    print("exports after", ref.exports)
    mv.release()
    print("exports after mv.release", ref.exports)
    assert ref.exports == 0
    a.send(ref)
    print("OK")
    """)
    print(out)


def test_r08b_views_alive_at_interpreter_exit_and_in_cycles():
    out = ok("""
    a, b = mbmq.Channel.pair()
    buf = a.buffer(1 << 20)
    arr = np.frombuffer(buf, dtype=np.uint8)
    class C: pass
    c = C(); c.c = c; c.arr = np.frombuffer(buf, dtype=np.uint8); c.buf = buf; c.ch = a
    del c
    msgb = a.buffer(64); a.send(msgb)
    m = b.receive(timeout=5)
    g = memoryview(m.buffer)
    a.close()
    print("OK")
    """)
    print(out)


def test_r08c_readonly_and_contiguity_flags():
    out = ok("""
    import ctypes
    a, b = mbmq.Channel.pair()
    buf = a.buffer(100)
    x = (ctypes.c_char * 100).from_buffer(buf)
    print("exports with ctypes", buf.exports)
    try:
        a.send(buf); assert False, "send with a ctypes export"
    except BufferError: pass
    del x; gc.collect()
    mv = memoryview(buf).toreadonly()
    try:
        a.send(buf); assert False, "send with a readonly view"
    except BufferError: pass
    mv.release()
    c = memoryview(buf).cast("I", (5, 5))
    try:
        a.send(buf); assert False
    except BufferError: pass
    c.release()
    print("exports", buf.exports)
    a.send(buf)
    print("OK")
    """)
    print(out)


# ---- 9. a view taken on another thread while a call uses the buffer -----------------------------------

def test_r09_view_taken_while_a_call_is_in_flight_then_the_call_times_out():
    out = ok("""
    a, b = mbmq.Channel.pair()
    buf = a.buffer(64)
    err = []
    t = threading.Thread(target=lambda: err.append(pytest_raises(a, buf)))
    def pytest_raises(a, buf):
        try: a.call(buf, timeout=0.3)
        except mbmq.Error as e: return type(e).__name__
    t.start(); time.sleep(0.05)
    try:
        mv = memoryview(buf)     # get_buffer does not check busy_
        print("view taken during call")
    except BufferError as e:
        mv = None; print("refused", e)
    t.join(5)
    print("call:", err, "valid", buf.valid)
    if mv is not None:
        mv[:4] = b"abcd"
        # the server now receives the request (the slot is the peer's); our stale view writes into it
        m = b.receive(timeout=1)
        mv[:4] = b"EVIL"
        seen = bytes(memoryview(m.buffer)[:4])
        print("peer sees", seen)
        assert seen != b"EVIL", "a view of a given-up buffer writes into the peer's request"
    print("OK")
    """)
    print(out)


# ---- 10. the peer dies while we hold a view of its request ------------------------------------------

def test_r10_peer_killed_while_a_view_of_its_request_lives():
    out = ok("""
    import signal
    a, b = mbmq.Channel.pair()
    pid = os.fork()
    if pid == 0:
        b.close()
        buf = a.buffer(8 * MIB)
        np.frombuffer(buf, dtype=np.uint8)[:] = 4
        try: a.call(buf, timeout=30)
        except BaseException: pass
        os._exit(0)
    a.close()
    m = b.receive(timeout=10)
    v = np.frombuffer(m.buffer, dtype=np.uint8)
    os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0)
    time.sleep(0.2)
    assert int(v[::4096].sum()) == 4 * len(v[::4096])
    v[:] = 1
    del v
    try:
        m.reply(); print("reply to a dead peer: no exception")
    except mbmq.Error as e:
        print("reply to a dead peer:", type(e).__name__)
    print("OK")
    """)
    print(out)


# ---- 11. concurrent receive() on one end from two threads (not listed thread-safe in channel.h) ------

def test_r11_two_threads_receive_on_one_end():
    out = ok("""
    a, b = mbmq.Channel.pair(slots_per_side=64, slot_size=4096)
    got = [0, 0]; errs = []
    N = 20000
    def rx(i):
        try:
            while True:
                m = b.receive(timeout=2)
                got[i] += 1
                del m
        except mbmq.TimedOut: pass
        except Exception as e: errs.append(repr(e))
    ts = [threading.Thread(target=rx, args=(i,)) for i in range(2)]
    for t in ts: t.start()
    sent = 0
    while sent < N:
        try:
            buf = a.buffer(64, timeout=2)
            buf_view = memoryview(buf); buf_view[:8] = sent.to_bytes(8, "little"); buf_view.release()
            a.send(buf); sent += 1
        except mbmq.WouldBlock:
            time.sleep(0)
    for t in ts: t.join(30)
    print("sent", sent, "got", got, "errs", errs[:3])
    assert sum(got) == N and not errs
    print("OK")
    """, timeout=90)
    print(out)


def test_r11b_many_threads_call_one_channel():
    out = ok("""
    a, b = mbmq.Channel.pair()
    def server():
        try:
            while True:
                m = b.receive(timeout=3)
                v = memoryview(m.buffer); v[0] = (v[0] + 1) % 256; v.release()
                m.reply()
        except mbmq.Error: pass
    s = threading.Thread(target=server); s.start()
    errs = []; done = [0]
    def client(k):
        try:
            buf = a.buffer(16)
            arr = np.frombuffer(buf, dtype=np.uint8)
            for i in range(300):
                arr[0] = k
                a.call(buf, timeout=10)
                assert arr[0] == (k + 1) % 256
                done[0] += 1
        except Exception as e:
            errs.append(repr(e))
    cs = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for c in cs: c.start()
    for c in cs: c.join(60)
    a.close(); s.join(10)
    print("done", done, "errs", errs[:3])
    assert not errs
    print("OK")
    """, timeout=120)
    print(out)


# ---- 12. fork with a thread inside call() ----------------------------------------------------------

def test_r12_fork_while_another_thread_is_inside_call():
    out = ok("""
    import warnings; warnings.simplefilter("ignore")
    a, b = mbmq.Channel.pair()
    buf = a.buffer(64)
    t = threading.Thread(target=lambda: (lambda: [a.call(buf, timeout=3)])() if True else None,
                         daemon=True)
    def callit():
        try: a.call(buf, timeout=3)
        except mbmq.Error: pass
    t = threading.Thread(target=callit, daemon=True); t.start()
    time.sleep(0.2)
    pid = os.fork()
    if pid == 0:
        # the child: the buffer's busy counter was copied, the thread was not
        try:
            buf.release(); print("child: release ok")
        except BufferError as e:
            print("child: release refused:", e)
        try:
            nb = a.buffer(64); print("child: new buffer ok")
        except Exception as e:
            print("child:", type(e).__name__, e)
        sys.stdout.flush()
        os._exit(0)
    t0 = time.monotonic()
    _, st = os.waitpid(pid, 0)
    print("child status", st, "in", round(time.monotonic() - t0, 2))
    t.join(5)
    print("OK")
    """)
    print(out)


# ---- 13. exceptions ----------------------------------------------------------------------------------

def test_r13_exception_attributes_and_messages():
    out = ok("""
    a, b = mbmq.Channel.pair()
    try:
        b.receive(timeout=0)
    except mbmq.TimedOut as e:
        print("TimedOut", repr(str(e)), e.code, e.errno, isinstance(e, TimeoutError), e.args)
        assert isinstance(e, OSError)
    a.close()
    try:
        b.receive(timeout=1)
    except mbmq.PeerClosed as e:
        print("PeerClosed", repr(str(e)), e.code, e.errno)
    b.close()
    try:
        b.receive(timeout=1)
    except mbmq.Error as e:
        print("closed end:", type(e).__name__, repr(str(e)))
        assert type(e) is mbmq.InvalidArgument
    try:
        mbmq.Listener("")
    except mbmq.Error as e:
        print("Listener(''):", type(e).__name__, str(e))
    try:
        mbmq.connect("definitely-no-such-listener-%d" % os.getpid(), timeout=0.2)
    except mbmq.Error as e:
        print("connect:", type(e).__name__, str(e), e.errno)
    print("OK")
    """)
    print(out)


# ---- 14. a received buffer: resize past capacity, views after reply, send it on ---------------------

def test_r14_received_buffer_misuse():
    out = ok("""
    a, b = mbmq.Channel.pair()
    c, d = mbmq.Channel.pair()
    a.send(a.buffer(100))
    m = b.receive(timeout=5)
    rb = m.buffer
    v = memoryview(rb)
    try:
        rb.resize(rb.capacity + 1)
    except BufferError as e: print("resize+view:", e)
    v.release()
    try:
        rb.resize(rb.capacity + 1)
    except mbmq.Error as e: print("resize past capacity of a received buffer:", type(e).__name__)
    try:
        c.send(rb); print("sent a received buffer on another channel!", rb.valid)
    except mbmq.Error as e: print("send on other channel:", type(e).__name__, "valid after:", rb.valid)
    try:
        c.call(rb, timeout=0.2); print("call with a received buffer returned")
    except mbmq.Error as e: print("call on other channel:", type(e).__name__, "valid after:", rb.valid)
    try:
        b.send(rb); print("sent the received buffer back", rb.valid)
    except mbmq.Error as e: print("send back:", type(e).__name__, rb.valid)
    if rb.valid:
        mv = memoryview(rb); mv[:1] = b"z"; mv.release()
    print("OK")
    """)
    print(out)


# ---- 15. edge sizes: empty buffers, odd pool geometry -----------------------------------------------

@pytest.mark.parametrize("expr", ["mbmq.Channel.pair(slots_per_side=0)", "mbmq.Channel.pair(slot_size=0)",
                                  "mbmq.Channel.pair(slot_size=1)",
                                  "mbmq.Channel.pair(slots_per_side=1 << 31)",
                                  "mbmq.Channel.pair(slot_size=(1 << 32) - 1)"])
def test_r15_pair_geometry_is_validated(expr):
    out = ok(f"""
    try:
        a, b = {expr}
        buf = a.buffer(10); mv = memoryview(buf); mv[:] = b"0123456789"; mv.release()
        a.send(buf); m = b.receive(timeout=2)
        print("accepted", bytes(memoryview(m.buffer)))
    except (mbmq.Error, ValueError, MemoryError) as e:
        print("raised", type(e).__name__, e)
    print("OK")
    """, timeout=60)
    print(out)


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 65536, 65537])
def test_r15b_views_of_edge_sized_buffers(size):
    out = ok(f"""
    a, b = mbmq.Channel.pair()
    buf = a.buffer({size})
    try:
        mv = memoryview(buf)
        print("view", mv.nbytes)
        if mv.nbytes: mv[-1:] = b"z"
        arr = np.frombuffer(buf, dtype=np.uint8); print("np", arr.size)
        del arr; mv.release()
    except BufferError as e:
        print("BufferError", e)
        assert {size} == 0
    a.send(buf)
    m = b.receive(timeout=2)
    if {size}:
        assert bytes(memoryview(m.buffer)[-1:]) == b"z"
    print("OK")
    """)
    print(out)


# ---- 16. the queue closed / the channel adopted while its messages and views live ---------------------

def test_r16_queue_closed_while_a_view_of_its_message_lives():
    out = ok("""
    q = mbmq.MsgQueue()
    a, b = mbmq.Channel.pair()
    q.adopt(b, 5)
    print("adopted end valid:", b.valid)
    try:
        b.receive(timeout=0.1); print("receive on adopted end returned")
    except mbmq.Error as e:
        print("receive on adopted end:", type(e).__name__)
    res = []
    def caller():
        buf = a.buffer(1 << 20)
        try: a.call(buf, timeout=3); res.append("ok")
        except mbmq.Error as e: res.append(type(e).__name__)
    t = threading.Thread(target=caller); t.start()
    m = q.wait(timeout=5)
    v = np.frombuffer(m.buffer, dtype=np.uint8)
    q.close()
    v[:] = 7
    assert int(v[:10].sum()) == 70
    del v
    try:
        m.reply(); print("reply after queue close: ok")
    except mbmq.Error as e:
        print("reply after queue close:", type(e).__name__)
    t.join(10)
    print("caller", res)
    print("OK")
    """)
    print(out)


# ---- 17. received buffers are writable through their views (a read-only peer mapping would SIGSEGV) ---

@pytest.mark.parametrize("size", [64, 70000, 8 << 20])
@pytest.mark.parametrize("how", ["send", "call"])
def test_r17_views_of_received_buffers_are_writable(size, how):
    ok(f"""
    a, b = mbmq.Channel.pair()
    pid = os.fork()
    if pid == 0:
        b.close()
        buf = a.buffer({size}); np.frombuffer(buf, dtype=np.uint8)[:] = 2
        if {how!r} == "send":
            a.send(buf); time.sleep(1)
        else:
            a.call(buf, timeout=10)
            assert np.frombuffer(buf, dtype=np.uint8)[-1] == 5
        os._exit(0)
    a.close()
    m = b.receive(timeout=10)
    v = np.frombuffer(m.buffer, dtype=np.uint8)
    assert v[-1] == 2
    v[:] = 5
    del v
    if m.kind == mbmq.Kind.Request:
        m.reply()
    _, st = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(st) == 0
    print("OK")
    """)


# ---- 18. the .deb (cpack -G DEB in the build tree): contents and dependencies ---------------------------

def _deb(tmp_path):
    build = os.environ.get("MBMQ_BUILD_DIR", os.path.join(HERE, "..", "..", "build"))
    if not os.path.exists(os.path.join(build, "CPackConfig.cmake")):
        pytest.skip("no configured build tree at %s" % build)
    p = subprocess.run(["cpack", "-G", "DEB", "-B", str(tmp_path)], cwd=build, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    deb = [f for f in os.listdir(tmp_path) if f.endswith(".deb")][0]
    deb = os.path.join(tmp_path, deb)
    files = subprocess.run(["dpkg-deb", "-c", deb], capture_output=True, text=True).stdout
    depends = subprocess.run(["dpkg-deb", "-f", deb, "Depends"], capture_output=True,
                             text=True).stdout
    return files, depends


@pytest.mark.xfail(strict=True, reason="known: the .deb has no Python module (README, Not done yet)")
def test_r18_deb_has_headers_library_cmake_pc_tool_and_the_python_module(tmp_path):
    files, depends = _deb(tmp_path)
    print(depends)
    for f in ["./usr/include/mbmq/mbmq.h", "./usr/lib/libmbmq.a", "./usr/lib/cmake/mbmq/mbmqConfig.cmake",
              "./usr/lib/pkgconfig/mbmq.pc", "./usr/bin/mbmq"]:
        assert f in files, f
    # issue #17 is the Python bindings: nothing installs python/mbmq*.so, so the package has none
    assert "mbmq.cpython" in files or "python3/dist-packages/mbmq" in files, \
        "the .deb has no Python module"


@pytest.mark.xfail(strict=True, reason="known: the mbmq tool in the -dev package links iceoryx and "
                   "ZeroMQ for its comparisons (README, Not done yet)")
def test_r18b_deb_dev_package_does_not_hard_depend_on_benchmark_peers(tmp_path):
    files, depends = _deb(tmp_path)
    print(depends)
    # libmbmq-dev pulls iceoryx and ZeroMQ runtimes only because /usr/bin/mbmq bench links them
    assert "iceoryx" not in depends and "libzmq" not in depends, depends


# ---- 19. stress: views taken on one thread while another thread's call times out on the same Buffer ----

def test_r19_views_racing_a_timing_out_call_do_not_crash():
    out = ok("""
    sys.setswitchinterval(1e-6)
    a, b = mbmq.Channel.pair(slots_per_side=64)
    stop = time.monotonic() + 3
    n = crashes = refused = taken = 0
    while time.monotonic() < stop:
        buf = a.buffer(64 if n % 2 else 200000)
        t = threading.Thread(target=lambda: [None for _ in [0] if not _call(buf)])
        def _call(buf):
            try: a.call(buf, timeout=0.0005)
            except mbmq.Error: pass
        t = threading.Thread(target=_call, args=(buf,)); t.start()
        views = []
        while t.is_alive():
            try:
                mv = memoryview(buf); mv[:1] = b"q"; views.append(mv); taken += 1
            except BufferError:
                refused += 1
            except ValueError:
                refused += 1
        t.join()
        for mv in views: mv[-1:] = b"w"; mv.release()
        try:
            while True:
                m = b.receive(timeout=0); del m
        except mbmq.Error: pass
        n += 1
    print("rounds", n, "views", taken, "refused", refused)
    print("OK")
    """, timeout=60)
    print(out)
