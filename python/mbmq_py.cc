// python/mbmq_py.cc: the Python module `mbmq` (pybind11), over the public API only (mbmq::mbmq).
//
//   a, b = mbmq.Channel.pair()
//   buf = a.buffer(1 << 20)
//   arr = numpy.frombuffer(buf, dtype=numpy.float32)   # a view of the shared memory, no copy
//   arr[:] = 1.0
//   a.call(buf, timeout=1.0)                           # the reply is now in arr
//
// Errors are exceptions: mbmq.Error, and one subclass per mbmq::Errc (mbmq.TimedOut, ...).
// Every call that waits releases the GIL.
//
// Memory safety: no Python code can make a view (memoryview, numpy array) point at unmapped memory.
//  (1) A view never points at the library's own mapping of a buffer, which the library unmaps when
//      the buffer goes back to its pool (an extent is unmapped when freed, e.g. when the late reply
//      to a timed-out call arrives). The first view of a Buffer makes a second mapping of the same
//      shared pages (mremap with old_size 0); every view of the Buffer shares it. It is unmapped
//      when the buffer is given away or released (no view exists then), or, for a buffer given
//      up while views exist (a call that timed out), when the last view goes. The pages are the
//      buffer's, so a view sees exactly what the peer writes (np.shares_memory holds between
//      views). Cost: each page first touched through this mapping faults once (about 2 us per
//      4 KiB page here; mremap itself about 3 us).
//  (2) While views exist, nothing gives the buffer away or moves it: send(), reply(),
//      reply_and_wait(), release() and a resize past capacity raise BufferError, as bytearray does
//      on resize. call() keeps the buffer, so views stay valid and show the reply.
//  (3) While a call that released the GIL uses a Buffer, other threads cannot move it or make new
//      views of it (BufferError).
// Only cooperative ends are offered: an untrusted end may move a buffer's bytes to a private copy,
// which (1) does not cover. The module uses the public API only, so it calls mremap/munmap itself
// (the os/ layer is internal to the library).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <sys/mman.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "mbmq/mbmq.h"
#include "mbmq/rendezvous.h"

namespace py = pybind11;

namespace mbmq::python {
namespace {

// ---- errors -------------------------------------------------------------------------------------

struct Exceptions {
  PyObject* base = nullptr;
  PyObject* by_code[16] = {};
};
Exceptions g_exc;  // created once at import; the module keeps them alive

[[noreturn]] void raise(const Error& e) {
  const auto i = static_cast<std::size_t>(e.code);
  PyObject* type = i < 16 && g_exc.by_code[i] != nullptr ? g_exc.by_code[i] : g_exc.base;
  py::object exc =
      py::reinterpret_steal<py::object>(PyObject_CallFunction(type, "s", e.message().c_str()));
  if (!exc) throw py::error_already_set();
  exc.attr("code") = errc_name(e.code);
  exc.attr("errno") = e.sys_errno;
  PyErr_SetObject(type, exc.ptr());
  throw py::error_already_set();
}

template <class T>
T check(Result<T>&& r) {
  if (!r) raise(r.error());
  return std::move(*r);
}
void check(Status&& s) {
  if (!s) raise(s.error());
}

[[noreturn]] void buffer_error(const char* what) {
  PyErr_SetString(PyExc_BufferError, what);
  throw py::error_already_set();
}

// timeout=None: never; seconds >= 0 otherwise (0: do not wait).
Deadline deadline_of(const std::optional<double>& timeout) {
  if (!timeout) return Deadline::never();
  if (std::isnan(*timeout) || *timeout < 0) throw py::value_error("timeout must be None or >= 0");
  return Deadline::after(std::chrono::duration<double>(*timeout));
}

std::size_t size_of(std::int64_t n) {
  if (n < 0) throw py::value_error("size must be >= 0");
  return static_cast<std::size_t>(n);
}

WaitPolicy policy_of(WaitMode mode, double spin_us) {
  if (std::isnan(spin_us) || spin_us < 0) throw py::value_error("spin_us must be >= 0");
  // Past 2^63 ns the conversion would be undefined (inf, 1e300): a year of spinning is plenty.
  if (spin_us > 365.0 * 86400 * 1e6) throw py::value_error("spin_us must be at most a year");
  return WaitPolicy{mode, std::chrono::nanoseconds(static_cast<std::int64_t>(spin_us * 1e3))};
}

// Counts the threads inside a call that released the GIL, so that another thread cannot destroy or
// move the object under it. Changed with the GIL held only.
class InUse {
 public:
  explicit InUse(int& n) : n_(n) { ++n_; }
  ~InUse() { --n_; }
  InUse(const InUse&) = delete;
  InUse& operator=(const InUse&) = delete;

 private:
  int& n_;
};

// ---- Buffer -------------------------------------------------------------------------------------

class PyBuffer {
 public:
  PyBuffer() = default;
  explicit PyBuffer(Buffer b) : buf_(std::move(b)) {}
  // Moved only while new (no view, no alias yet): into the Python object that owns it.
  PyBuffer(PyBuffer&& o) noexcept : buf_(std::move(o.buf_)) {}
  PyBuffer(const PyBuffer&) = delete;
  PyBuffer& operator=(const PyBuffer&) = delete;
  PyBuffer& operator=(PyBuffer&&) = delete;
  ~PyBuffer() { unmap_alias(); }

  // Takes the buffer out to give it away (send, reply): refused while views or a call use it.
  Buffer take(const char* op) {
    guard(op);
    if (!buf_.valid()) throw py::value_error(std::string(op) + ": the buffer is not valid");
    unmap_alias();
    return std::move(buf_);
  }
  // Puts back a buffer the library left with the caller (a send that failed with WouldBlock).
  void put_back(Buffer&& b) {
    if (b.valid()) buf_ = std::move(b);
  }
  Buffer& use(const char* op) {
    if (busy_ != 0) buffer_error("the buffer is in use by a call on another thread");
    if (!buf_.valid()) throw py::value_error(std::string(op) + ": the buffer is not valid");
    return buf_;
  }
  int& busy() { return busy_; }

  std::size_t size() const { return buf_.size(); }
  std::size_t capacity() const { return buf_.capacity(); }
  bool valid() const { return buf_.valid(); }
  int exports() const { return exports_; }
  std::uint32_t id() const { return buf_.id(); }

  void resize(std::int64_t n) {
    const std::size_t want = size_of(n);
    Buffer& b = use("resize");
    if (want > b.capacity() && exports_ != 0)
      buffer_error("resize: past capacity would move the buffer while views of it exist");
    if (want > b.capacity()) unmap_alias();  // the buffer may move (no view exists)
    check(b.resize(want));
  }
  // After a call that gave the buffer up (it timed out: the library reclaims it when the late
  // reply comes, and may hand its pages out again): views must not keep writing them. With no
  // view, the second mapping goes; with views, a private copy of its bytes replaces it at the
  // same addresses (mremap MREMAP_FIXED), so the views stay valid and write only there.
  void detach_if_given_up() noexcept {
    if (buf_.valid() || alias_ == nullptr) return;
    if (exports_ == 0) {
      unmap_alias();
      return;
    }
    void* priv =
        ::mmap(nullptr, alias_len_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (priv != MAP_FAILED) {
      std::memcpy(priv, alias_, alias_len_);
      if (::mremap(priv, alias_len_, alias_len_, MREMAP_MAYMOVE | MREMAP_FIXED, alias_) !=
          MAP_FAILED)
        return;
      ::munmap(priv, alias_len_);
    }
    // Out of memory: zeroed private pages at the same addresses (the bytes are lost, not shared).
    (void)::mmap(alias_, alias_len_, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
  }
  void release() {
    guard("release");
    unmap_alias();
    buf_.reset();
  }

  // Buffer protocol: (1) above.
  static int get_buffer(PyObject* self, Py_buffer* view, int flags) {
    PyBuffer* p = nullptr;
    try {
      p = py::cast<PyBuffer*>(py::handle(self));
    } catch (...) {
      PyErr_SetString(PyExc_BufferError, "not an mbmq.Buffer");
      return -1;
    }
    if (p->busy_ != 0) {  // (3): its fields change under the call; views made before stay
      PyErr_SetString(PyExc_BufferError, "the buffer is in use by a call on another thread");
      return -1;
    }
    if (!p->buf_.valid()) {
      PyErr_SetString(PyExc_BufferError, "the buffer is not valid (sent, released or abandoned)");
      return -1;
    }
    if (p->alias_ == nullptr && !p->map_alias()) return -1;  // (1)
    const auto off = reinterpret_cast<std::uintptr_t>(p->buf_.data().data()) % kPage;
    const auto len = static_cast<Py_ssize_t>(p->buf_.size());
    if (PyBuffer_FillInfo(view, self, p->alias_ + off, len, 0, flags) != 0) return -1;
    ++p->exports_;
    return 0;
  }
  // The mapping stays while the buffer is valid: the next view costs no system call, and pages
  // already touched through it fault no more. A buffer given up meanwhile (a call that timed out)
  // unmaps it with its last view.
  static void release_buffer(PyObject* self, Py_buffer* /*view*/) {
    auto* p = py::cast<PyBuffer*>(py::handle(self));
    if (--p->exports_ == 0 && !p->buf_.valid()) p->unmap_alias();
  }

 private:
  static constexpr std::uintptr_t kPage = 4096;

  void guard(const char* op) {
    if (busy_ != 0) buffer_error("the buffer is in use by a call on another thread");
    if (exports_ != 0)
      buffer_error((std::string(op) + ": views of the buffer exist (release them first)").c_str());
  }
  // A second mapping of the pages under the buffer's capacity, which the library cannot unmap.
  bool map_alias() {
    const auto start = reinterpret_cast<std::uintptr_t>(buf_.data().data());
    const std::uintptr_t base = start & ~(kPage - 1);
    const std::size_t len = (start - base + buf_.capacity() + kPage - 1) & ~(kPage - 1);
    // NOLINTNEXTLINE(performance-no-int-to-ptr): the address of a mapping we hold
    void* a = ::mremap(reinterpret_cast<void*>(base), 0, len, MREMAP_MAYMOVE);
    if (a == MAP_FAILED) {
      PyErr_SetFromErrno(PyExc_BufferError);
      return false;
    }
    alias_ = static_cast<char*>(a);
    alias_len_ = len;
    return true;
  }
  void unmap_alias() noexcept {
    if (alias_ != nullptr) ::munmap(alias_, alias_len_);
    alias_ = nullptr;
    alias_len_ = 0;
  }

  Buffer buf_;
  char* alias_ = nullptr;
  std::size_t alias_len_ = 0;
  int exports_ = 0;
  int busy_ = 0;
};

// ---- Message ------------------------------------------------------------------------------------

struct PyMessage {
  std::uint64_t key = 0;
  Kind kind = Kind::PeerClosed;
  py::object buffer;  // a PyBuffer (empty for PeerClosed and Connection)
  Errc error = Errc::PeerClosed;
  std::string why;
  py::object channel = py::none();  // Kind::Connection: a Channel

  // MsgQueue::reply, with the buffer taken back out of its Python object.
  void reply() {
    if (kind != Kind::Request) throw py::value_error("reply: the message is not a request");
    auto& pb = buffer.cast<PyBuffer&>();
    Message m;
    m.key = key;
    m.kind = kind;
    m.buffer = pb.take("reply");
    Status s = MsgQueue::reply(std::move(m));
    pb.put_back(std::move(m.buffer));  // NOLINT(bugprone-use-after-move): left there on WouldBlock
    check(std::move(s));
  }
};

class PyChannel;
class PyQueue;
py::object wrap(Message&& m);

// ---- Channel ------------------------------------------------------------------------------------

class PyChannel {
 public:
  explicit PyChannel(Channel c) : ch_(std::move(c)) {}

  static py::tuple pair(std::uint32_t slots, std::uint32_t slot_size, WaitMode mode,
                        double spin_us) {
    ChannelOptions o;
    o.slots_per_side = slots;
    o.slot_size = slot_size;
    o.wait = policy_of(mode, spin_us);
    auto p = check(Channel::pair(o));
    return py::make_tuple(PyChannel(std::move(p.first)), PyChannel(std::move(p.second)));
  }

  PyBuffer buffer(std::int64_t n, std::optional<double> timeout) {
    const std::size_t size = size_of(n);
    if (!timeout) return PyBuffer(check(ch_.buffer(size)));
    const Deadline d = deadline_of(timeout);
    InUse in(busy_);
    Result<Buffer> r;
    {
      py::gil_scoped_release nogil;
      r = ch_.buffer(size, d);
    }
    return PyBuffer(check(std::move(r)));
  }

  void call(PyBuffer& pb, std::optional<double> timeout) {
    const Deadline d = deadline_of(timeout);
    Buffer& b = pb.use("call");
    InUse in(busy_), in_buf(pb.busy());
    Status s;
    {
      py::gil_scoped_release nogil;
      s = ch_.call(b, d);
    }
    pb.detach_if_given_up();
    check(std::move(s));
  }

  void send(PyBuffer& pb) {
    Buffer b = pb.take("send");
    Status s = ch_.send(std::move(b));
    pb.put_back(std::move(b));  // NOLINT(bugprone-use-after-move): kept on WouldBlock/Busy
    check(std::move(s));
  }

  py::object receive(std::optional<double> timeout) {
    const Deadline d = deadline_of(timeout);
    InUse in(busy_);
    Result<Message> r;
    {
      py::gil_scoped_release nogil;
      r = ch_.receive(d);
    }
    Message m = check(std::move(r));
    if (m.kind == Kind::PeerClosed) raise(Error::make(m.error, *m.why ? m.why : "receive"));
    return wrap(std::move(m));
  }

  void redirect(PyQueue& queue, std::uint64_t key);
  void close() { ch_.close(); }
  bool valid() const { return ch_.valid(); }
  int busy() const { return busy_; }
  Channel& get() { return ch_; }

 private:
  Channel ch_;
  int busy_ = 0;
};

py::object wrap(Message&& m) {
  PyMessage pm;
  pm.key = m.key;
  pm.kind = m.kind;
  pm.error = m.error;
  pm.why = m.why;
  pm.buffer = py::cast(PyBuffer(std::move(m.buffer)));
  if (m.kind == Kind::Connection) pm.channel = py::cast(PyChannel(std::move(m.channel)));
  return py::cast(std::move(pm));
}

// ---- MsgQueue, Listener -------------------------------------------------------------------------

class PyQueue {
 public:
  PyQueue(WaitMode mode, double spin_us) : q_(check(MsgQueue::create(policy_of(mode, spin_us)))) {}

  py::object wait(std::optional<double> timeout) {
    const Deadline d = deadline_of(timeout);
    InUse in(busy_);
    Result<Message> r;
    {
      py::gil_scoped_release nogil;
      r = q_.wait(d);
    }
    return wrap(check(std::move(r)));
  }

  py::object reply_and_wait(PyMessage& pm, std::optional<double> timeout) {
    const Deadline d = deadline_of(timeout);
    Message m;
    m.key = pm.key;
    m.kind = pm.kind;
    PyBuffer* pb = nullptr;
    if (pm.kind == Kind::Request) {
      pb = &pm.buffer.cast<PyBuffer&>();
      m.buffer = pb->take("reply_and_wait");
    }
    InUse in(busy_);
    Result<Message> r;
    {
      py::gil_scoped_release nogil;
      r = q_.reply_and_wait(std::move(m), d);
    }
    return wrap(check(std::move(r)));
  }

  void adopt(PyChannel& c, std::uint64_t key) {
    if (c.busy() != 0) throw py::value_error("adopt: the channel is in use on another thread");
    check(q_.adopt(std::move(c.get()), key));
  }
  int fd() const { return q_.fd(); }
  std::size_t channel_count() const { return q_.channel_count(); }
  void close() {
    if (busy_ != 0) throw py::value_error("close: the queue is in use on another thread");
    q_ = MsgQueue();
  }
  MsgQueue& get() { return q_; }

 private:
  MsgQueue q_;
  int busy_ = 0;
};

void PyChannel::redirect(PyQueue& queue, std::uint64_t key) {
  check(ch_.redirect(queue.get(), key));
}

class PyListener {
 public:
  explicit PyListener(const std::string& name) : l_(check(Listener::create(name))) {}

  PyChannel accept(std::optional<double> timeout) {
    const Deadline d = deadline_of(timeout);
    InUse in(busy_);
    Result<Channel> r;
    {
      py::gil_scoped_release nogil;
      r = l_.accept(d);
    }
    return PyChannel(check(std::move(r)));
  }
  void redirect(PyQueue& q, std::uint64_t key) { check(l_.redirect(q.get(), key)); }
  void close() {
    if (busy_ != 0) throw py::value_error("close: the listener is in use on another thread");
    l_ = Listener();
  }
  std::string name() const { return l_.name(); }

 private:
  Listener l_;
  int busy_ = 0;
};

PyChannel connect_to(const std::string& name, std::optional<double> timeout, WaitMode mode,
                     double spin_us) {
  const Deadline d = deadline_of(timeout);
  const WaitPolicy w = policy_of(mode, spin_us);
  Result<Channel> r;
  {
    py::gil_scoped_release nogil;
    r = connect(name, d, w);
  }
  return PyChannel(check(std::move(r)));
}

// pybind11's def_buffer cannot count exports: install our own slots on the heap type.
void install_buffer_protocol(py::handle type) {
  auto* heap = reinterpret_cast<PyHeapTypeObject*>(type.ptr());
  heap->as_buffer.bf_getbuffer = &PyBuffer::get_buffer;
  heap->as_buffer.bf_releasebuffer = &PyBuffer::release_buffer;
  reinterpret_cast<PyTypeObject*>(type.ptr())->tp_as_buffer = &heap->as_buffer;
}

}  // namespace
}  // namespace mbmq::python

PYBIND11_MODULE(mbmq, m) {
  using namespace mbmq;          // NOLINT(google-build-using-namespace)
  using namespace mbmq::python;  // NOLINT(google-build-using-namespace)
  using py::arg;
  m.doc() = "mbmq: zero-copy request/response IPC over shared memory (Linux)";

  g_exc.base = PyErr_NewException("mbmq.Error", PyExc_Exception, nullptr);
  m.attr("Error") = py::handle(g_exc.base);
  struct Sub {
    Errc code;
    const char* name;
    PyObject* also;
  };
  const Sub subs[] = {{Errc::TimedOut, "TimedOut", PyExc_TimeoutError},
                      {Errc::WouldBlock, "WouldBlock", nullptr},
                      {Errc::PeerClosed, "PeerClosed", nullptr},
                      {Errc::NoReply, "NoReply", nullptr},
                      {Errc::Protocol, "Protocol", nullptr},
                      {Errc::System, "System", PyExc_OSError},
                      {Errc::InvalidArgument, "InvalidArgument", nullptr},
                      {Errc::NoBuffers, "NoBuffers", nullptr},
                      {Errc::Busy, "Busy", nullptr},
                      {Errc::Refused, "Refused", PyExc_PermissionError}};
  for (const Sub& s : subs) {
    py::tuple bases = s.also != nullptr ? py::make_tuple(py::handle(g_exc.base), py::handle(s.also))
                                        : py::make_tuple(py::handle(g_exc.base));
    const std::string qualified = std::string("mbmq.") + s.name;
    PyObject* e = PyErr_NewException(qualified.c_str(), bases.ptr(), nullptr);
    g_exc.by_code[static_cast<std::size_t>(s.code)] = e;
    m.attr(s.name) = py::handle(e);
  }

  py::enum_<Kind>(m, "Kind")
      .value("Request", Kind::Request)
      .value("Reply", Kind::Reply)
      .value("Message", Kind::Message)
      .value("PeerClosed", Kind::PeerClosed)
      .value("Connection", Kind::Connection);
  py::enum_<WaitMode>(m, "WaitMode")
      .value("Spin", WaitMode::Spin)
      .value("Adaptive", WaitMode::Adaptive)
      .value("Sleep", WaitMode::Sleep);

  py::class_<PyBuffer> buffer(m, "Buffer", py::buffer_protocol(),
                              "Bytes in shared memory; memoryview(buf) and numpy.frombuffer(buf) "
                              "are writable views of them, not copies.");
  buffer.def("__len__", &PyBuffer::size)
      .def_property_readonly("size", &PyBuffer::size)
      .def_property_readonly("capacity", &PyBuffer::capacity)
      .def_property_readonly("valid", &PyBuffer::valid)
      .def_property_readonly("exports", &PyBuffer::exports, "views alive now")
      .def_property_readonly("id", &PyBuffer::id)
      .def("resize", &PyBuffer::resize, arg("n"),
           "Sets the size; past capacity only while no view exists (BufferError otherwise).")
      .def("release", &PyBuffer::release, "Gives the buffer up now (BufferError if views exist).")
      .def("__bool__", &PyBuffer::valid);
  install_buffer_protocol(buffer);

  py::class_<PyMessage>(m, "Message")
      .def_readonly("key", &PyMessage::key)
      .def_readonly("kind", &PyMessage::kind)
      .def_readonly("buffer", &PyMessage::buffer)
      .def_property_readonly("error", [](const PyMessage& pm) { return errc_name(pm.error); })
      .def_readonly("why", &PyMessage::why)
      .def_readonly("channel", &PyMessage::channel)
      .def("reply", &PyMessage::reply,
           "Answers a Request with the bytes now in .buffer (BufferError if views exist).");

  py::class_<PyChannel>(m, "Channel")
      .def_static("pair", &PyChannel::pair, arg("slots_per_side") = 16,
                  arg("slot_size") = 64 * 1024, arg("wait") = WaitMode::Adaptive,
                  arg("spin_us") = 50.0, "Two connected ends (usable across fork()).")
      .def("buffer", &PyChannel::buffer, arg("size"), arg("timeout") = py::none(),
           "A buffer of `size` bytes; with a timeout, waits for one to come back.")
      .def("call", &PyChannel::call, arg("buf"), arg("timeout") = py::none(),
           "Sends buf as a request; the reply arrives in buf (views see it).")
      .def("send", &PyChannel::send, arg("buf"), "Sends buf one-way; buf is given away.")
      .def("receive", &PyChannel::receive, arg("timeout") = py::none(),
           "The next request or message; PeerClosed (or Protocol) when the channel ends.")
      .def("redirect", &PyChannel::redirect, arg("queue"), arg("key"))
      .def("close", &PyChannel::close)
      .def_property_readonly("valid", &PyChannel::valid)
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](PyChannel& c, py::args) { c.close(); });

  py::class_<PyQueue>(m, "MsgQueue")
      .def(py::init<WaitMode, double>(), arg("wait") = WaitMode::Adaptive, arg("spin_us") = 50.0)
      .def("wait", &PyQueue::wait, arg("timeout") = py::none())
      .def("reply_and_wait", &PyQueue::reply_and_wait, arg("msg"), arg("timeout") = py::none())
      .def("adopt", &PyQueue::adopt, arg("channel"), arg("key"))
      .def("fileno", &PyQueue::fd)
      .def_property_readonly("channel_count", &PyQueue::channel_count)
      .def("close", &PyQueue::close);

  py::class_<PyListener>(m, "Listener")
      .def(py::init<const std::string&>(), arg("name"))
      .def("accept", &PyListener::accept, arg("timeout") = py::none())
      .def("redirect", &PyListener::redirect, arg("queue"), arg("key"))
      .def_property_readonly("name", &PyListener::name)
      .def("close", &PyListener::close);

  m.def("connect", &connect_to, arg("name"), arg("timeout") = py::none(),
        arg("wait") = WaitMode::Adaptive, arg("spin_us") = 50.0, "Connects to a Listener by name.");
}
