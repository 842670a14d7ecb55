# The Python module mbmq (python/mbmq_py.cc): zero-copy views, exceptions, and that no misuse
# crashes the interpreter. Run by ctest (python.pytest) with PYTHONPATH=build/python.
import os
import threading
import time

import numpy as np
import pytest

import mbmq

MIB = 1 << 20


def serve_in_child(server, client, handler, count=1, delay=0.0, hold=None):
    """Forks a child that answers `count` requests on `server` with handler(ndarray of uint8);
    then, given a pipe's read end `hold`, keeps the channel open until it reads from it."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            client.close()
            for _ in range(count):
                msg = server.receive(timeout=10)
                time.sleep(delay)
                view = np.frombuffer(msg.buffer, dtype=np.uint8)
                handler(view)
                del view
                msg.reply()
            if hold is not None:
                os.read(hold, 1)
        except BaseException:  # report through the exit code, never unwind into pytest
            code = 1
        os._exit(code)
    server.close()
    return pid


def join(pid):
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_numpy_view_shares_memory_with_the_buffer_and_shows_the_reply():
    a, b = mbmq.Channel.pair()
    buf = a.buffer(4 * MIB)
    arr = np.frombuffer(buf, dtype=np.float32)
    arr[:] = np.arange(arr.size, dtype=np.float32)
    assert np.shares_memory(arr, buf)
    assert np.shares_memory(arr, np.frombuffer(memoryview(buf), dtype=np.uint8))

    def double(view):
        f = view.view(np.float32)
        f *= 2

    pid = serve_in_child(b, a, double)
    a.call(buf, timeout=10)
    join(pid)
    assert arr[1] == 2.0 and arr[-1] == 2.0 * (arr.size - 1)
    assert np.shares_memory(arr, buf)


def test_small_buffers_in_the_pool_are_views_too():
    a, b = mbmq.Channel.pair()
    buf = a.buffer(64)
    assert len(buf) == 64 and buf.capacity >= 64
    mv = memoryview(buf)
    assert not mv.readonly and mv.nbytes == 64
    mv[:4] = b"ping"
    pid = serve_in_child(b, a, lambda v: v.__setitem__(slice(0, 4), np.frombuffer(b"pong", np.uint8)))
    a.call(buf, timeout=10)
    join(pid)
    assert bytes(mv[:4]) == b"pong"


def test_send_while_a_view_exists_raises_buffererror_and_works_after():
    a, b = mbmq.Channel.pair()
    buf = a.buffer(1000)
    mv = memoryview(buf)
    mv[:5] = b"hello"
    with pytest.raises(BufferError):
        a.send(buf)
    assert buf.valid
    mv.release()
    a.send(buf)
    assert not buf.valid
    msg = b.receive(timeout=5)
    assert msg.kind == mbmq.Kind.Message
    assert bytes(memoryview(msg.buffer)[:5]) == b"hello"


def test_using_a_buffer_after_send_raises():
    a, b = mbmq.Channel.pair()
    buf = a.buffer(100)
    a.send(buf)
    with pytest.raises(BufferError):
        memoryview(buf)
    with pytest.raises(BufferError):
        np.frombuffer(buf, dtype=np.uint8)
    with pytest.raises(ValueError):
        a.send(buf)
    with pytest.raises(ValueError):
        a.call(buf, timeout=0.1)
    with pytest.raises(ValueError):
        buf.resize(10)
    assert len(buf) == 0


def test_wrong_types_raise_typeerror():
    a, _ = mbmq.Channel.pair()
    q = mbmq.MsgQueue()
    with pytest.raises(TypeError):
        a.buffer("10")
    with pytest.raises(TypeError):
        a.call(b"bytes", timeout=1)
    with pytest.raises(TypeError):
        a.send(None)
    with pytest.raises(TypeError):
        a.call(a.buffer(8), timeout="soon")
    with pytest.raises(TypeError):
        q.reply_and_wait(42, timeout=0)
    with pytest.raises(TypeError):
        a.redirect("queue", 1)
    with pytest.raises(TypeError):
        mbmq.Listener(5)


def test_negative_sizes_and_timeouts_raise_valueerror():
    a, _ = mbmq.Channel.pair()
    with pytest.raises(ValueError):
        a.buffer(-1)
    buf = a.buffer(16)
    with pytest.raises(ValueError):
        buf.resize(-5)
    with pytest.raises(ValueError):
        a.call(buf, timeout=-1)
    with pytest.raises(ValueError):
        a.receive(timeout=float("nan"))
    with pytest.raises(mbmq.InvalidArgument):
        a.buffer(1 << 40)
    with pytest.raises(TypeError):  # past 64 bits: pybind11 finds no overload
        a.buffer(1 << 70)


def test_bad_channel_options_raise():
    with pytest.raises(mbmq.InvalidArgument):
        mbmq.Channel.pair(slots_per_side=0)
    with pytest.raises(mbmq.InvalidArgument):
        mbmq.Channel.pair(slot_size=100)
    with pytest.raises(TypeError):
        mbmq.Channel.pair(slot_size=1 << 40)
    with pytest.raises(ValueError):
        mbmq.Channel.pair(spin_us=-1)
    with pytest.raises(TypeError):
        mbmq.Channel.pair(wait="spin")


def test_resize_past_capacity_with_a_view_raises_and_within_capacity_does_not():
    a, _ = mbmq.Channel.pair()
    buf = a.buffer(100)
    mv = memoryview(buf)
    buf.resize(50)
    assert len(buf) == 50 and mv.nbytes == 100  # the view keeps its length; the memory stays
    with pytest.raises(BufferError):
        buf.resize(buf.capacity + 1)
    mv.release()
    buf.resize(buf.capacity + 1)
    assert len(buf) == buf.capacity - (buf.capacity - len(buf))


def test_closing_the_channel_while_a_view_exists_keeps_the_view_valid():
    a, b = mbmq.Channel.pair()
    buf = a.buffer(2 * MIB)
    arr = np.frombuffer(buf, dtype=np.uint8)
    arr[:] = 7
    a.close()
    b.close()
    assert not a.valid
    assert int(arr.sum()) == 7 * arr.size
    arr[:] = 1
    with pytest.raises(mbmq.Error):
        a.call(buf, timeout=0.1)
    del a, b
    assert int(arr.sum()) == arr.size


def test_a_view_outlives_a_timed_out_call_and_its_late_reply():
    # The call gives its buffer up at the deadline; the late reply frees it (an extent: unmapped
    # by the library). The view maps the pages itself, so it still reads and writes.
    a, b = mbmq.Channel.pair()
    buf = a.buffer(8 * MIB)
    arr = np.frombuffer(buf, dtype=np.uint8)
    arr[:] = 3
    hold_r, hold_w = os.pipe()
    pid = serve_in_child(b, a, lambda v: v.fill(9), delay=0.3, hold=hold_r)
    with pytest.raises(mbmq.TimedOut):
        a.call(buf, timeout=0.05)
    assert not buf.valid
    time.sleep(0.6)
    with pytest.raises(mbmq.TimedOut):  # takes the late reply in, freeing the extent
        a.receive(timeout=0.05)
    again = a.buffer(16 * MIB)  # may reuse the extent's slot in the table
    np.frombuffer(again, dtype=np.uint8)[:] = 1
    os.write(hold_w, b"x")
    join(pid)
    os.close(hold_r)
    os.close(hold_w)
    assert int(arr[0]) in (3, 9) and int(arr[-1]) in (3, 9)
    arr[:] = 5
    assert int(arr.sum()) == 5 * arr.size


def test_receive_after_the_peer_closes_raises_peerclosed():
    a, b = mbmq.Channel.pair()
    a.close()
    with pytest.raises(mbmq.PeerClosed):
        b.receive(timeout=5)


def test_exceptions_form_a_hierarchy():
    assert issubclass(mbmq.TimedOut, mbmq.Error) and issubclass(mbmq.TimedOut, TimeoutError)
    for name in ["WouldBlock", "PeerClosed", "NoReply", "Protocol", "System", "InvalidArgument",
                 "NoBuffers", "Busy", "Refused"]:
        assert issubclass(getattr(mbmq, name), mbmq.Error)
    a, _ = mbmq.Channel.pair()
    with pytest.raises(mbmq.TimedOut) as e:
        a.receive(timeout=0.01)
    assert e.value.code == "timed-out" or e.value.code


def test_waiting_releases_the_gil():
    a, b = mbmq.Channel.pair()
    done = []
    t = threading.Thread(target=lambda: done.append(pytest.raises(mbmq.TimedOut, b.receive, 0.5)))
    start = time.monotonic()
    t.start()
    spins = 0
    while t.is_alive() and time.monotonic() - start < 0.4:
        spins += 1
    t.join()
    assert spins > 1000 and done


def test_a_buffer_in_use_by_a_call_on_another_thread_cannot_be_given_away():
    a, b = mbmq.Channel.pair()
    buf = a.buffer(64)
    view = memoryview(buf)  # made before the call: stays valid through it
    t = threading.Thread(target=lambda: pytest.raises(mbmq.TimedOut, a.call, buf, 0.5))
    t.start()
    time.sleep(0.1)
    with pytest.raises(BufferError):
        a.send(buf)
    with pytest.raises(BufferError):
        buf.release()
    with pytest.raises(BufferError):  # a new view while the call may change the buffer
        memoryview(buf)
    with pytest.raises(BufferError):
        a.call(buf, timeout=0.1)
    t.join()
    view[:4] = b"safe"  # the call timed out and gave the buffer up; the view still maps it
    assert bytes(view[:4]) == b"safe"


def test_reply_with_a_view_of_the_request_raises_buffererror():
    a, b = mbmq.Channel.pair()
    buf = a.buffer(64)
    t = threading.Thread(target=lambda: a.call(buf, timeout=5))
    t.start()
    msg = b.receive(timeout=5)
    assert msg.kind == mbmq.Kind.Request
    mv = memoryview(msg.buffer)
    mv[:2] = b"ok"
    with pytest.raises(BufferError):
        msg.reply()
    mv.release()
    msg.reply()
    t.join()
    assert bytes(memoryview(buf)[:2]) == b"ok"


def test_listener_connect_and_a_queue_server_loop():
    name = f"mbmq-pytest-{os.getpid()}"
    listener = mbmq.Listener(name)
    queue = mbmq.MsgQueue()
    listener.redirect(queue, 0)

    def serve():
        msg = queue.wait(timeout=10)
        next_key = 1
        while True:
            if msg.kind == mbmq.Kind.Connection:
                queue.adopt(msg.channel, next_key)
                next_key += 1
            elif msg.kind == mbmq.Kind.Request:
                v = np.frombuffer(msg.buffer, dtype=np.int64)
                v += 1
                del v
            elif msg.kind == mbmq.Kind.PeerClosed:
                return
            msg = queue.reply_and_wait(msg, timeout=10)

    t = threading.Thread(target=serve)
    t.start()
    ch = mbmq.connect(name, timeout=5)
    buf = ch.buffer(8 * 1000)
    arr = np.frombuffer(buf, dtype=np.int64)
    arr[:] = np.arange(1000)
    for _ in range(3):
        ch.call(buf, timeout=5)
    assert arr[0] == 3 and arr[-1] == 1002
    ch.close()
    t.join(10)
    assert not t.is_alive()
    with pytest.raises(mbmq.System):  # the name is taken
        mbmq.Listener(name)
    listener.close()
    with pytest.raises(mbmq.Error):
        mbmq.connect(name, timeout=0.2)


def test_misuse_of_channels_queues_and_listeners_raises():
    a, b = mbmq.Channel.pair()
    c, d = mbmq.Channel.pair()
    with pytest.raises(mbmq.InvalidArgument):  # a buffer of another channel
        a.call(c.buffer(8), timeout=0.1)
    a.send(a.buffer(8))
    one_way = b.receive(timeout=1)
    with pytest.raises(ValueError):  # not a request
        one_way.reply()
    t = threading.Thread(target=lambda: a.call(a.buffer(8), timeout=5))
    t.start()
    req = b.receive(timeout=5)
    req.reply()
    t.join()
    with pytest.raises(ValueError):  # replied already
        req.reply()
    q = mbmq.MsgQueue()
    with pytest.raises(ValueError):
        q.reply_and_wait(req, timeout=0.01)
    b.redirect(q, 1)
    with pytest.raises(mbmq.InvalidArgument):
        b.receive(timeout=0.01)
    q.adopt(d, 3)
    with pytest.raises(mbmq.InvalidArgument):  # adopted: this handle is closed
        q.adopt(d, 4)
    with pytest.raises(mbmq.InvalidArgument):
        d.buffer(8)
    listener = mbmq.Listener(f"mbmq-pytest-misuse-{os.getpid()}")
    listener.close()
    with pytest.raises(mbmq.InvalidArgument):
        listener.accept(timeout=0.01)
    q.close()
    with pytest.raises(mbmq.InvalidArgument):
        q.wait(timeout=0.01)
    with pytest.raises(TypeError):
        mbmq.Buffer()
