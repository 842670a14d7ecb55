// bench/remote_raw_ucx.cc: the raw-UCX request/response of mbmq-net-bench (remote_raw_ucx.h).
#include "remote_raw_ucx.h"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "mbmq/deadline.h"
#include "net/ucx.h"

namespace mbmq::bench {

using net::detail::Ucx;

// Active Message ids of this baseline (its own workers: no clash with mbmq::net's id).
constexpr unsigned kRequest = 1, kReply = 2, kOneWay = 3;
struct RawHeader {
  std::uint64_t a = 0, b = 0;  // 16 bytes, as mbmq::net's header; a: a one-way message's sinks
};
constexpr std::uint64_t kMaxSinks = 64;

struct RawSide {
  const Ucx* u = nullptr;
  ucp_worker_h worker = nullptr;
  ucp_ep_h ep = nullptr;
  ucp_listener_h listener = nullptr;
  std::vector<std::byte> buf;   // requests land here and are answered from here
  std::vector<std::byte> sink;  // one-way payloads land here
  // A StreamShape's buffers (client) or sinks (server) beyond one, used in turn; each grown to the
  // message's size when first used at it (in a cell's warm-up).
  std::vector<std::vector<std::byte>> ring;
  std::size_t next = 0;
  std::size_t answer = SIZE_MAX;  // server: the size of the request to answer
  bool replied = false;           // client: the reply has landed
  int receiving = 0;              // rendezvous receives in flight
  bool closed = false;
  std::string error;
};

// (Outside the anonymous namespace: RawUcxClient::State derives from it.)
namespace {

void on_error(void* arg, ucp_ep_h, ucs_status_t) { static_cast<RawSide*>(arg)->closed = true; }

struct RecvCtx {
  RawSide* s;
  unsigned id;
  std::size_t n;
};

void landed(RawSide* s, unsigned id, std::size_t n) {
  if (id == kRequest) s->answer = n;
  if (id == kReply) s->replied = true;
}

void recv_done(void* req, ucs_status_t, std::size_t, void* user) {
  auto* c = static_cast<RecvCtx*>(user);
  --c->s->receiving;
  landed(c->s, c->id, c->n);
  c->s->u->ucp_request_free(req);
  delete c;
}

// (1) A message arrives: eager, copied out of UCX's buffer now; rendezvous, received into ours.
ucs_status_t on_am(void* arg, const void* header, std::size_t header_length, void* data,
                   std::size_t length, const ucp_am_recv_param_t* param, unsigned id) {
  auto* s = static_cast<RawSide*>(arg);
  std::byte* dst = id == kOneWay ? s->sink.data() : s->buf.data();
  if (length > s->buf.size()) {
    s->closed = true;
    return UCS_OK;
  }
  RawHeader h;
  if (header_length == sizeof h) std::memcpy(&h, header, sizeof h);
  if (id == kOneWay && h.a > 1 && h.a <= kMaxSinks) {  // the next of h.a sinks (StreamShape)
    if (s->ring.size() < h.a) s->ring.resize(h.a);
    auto& v = s->ring[s->next++ % h.a];
    if (v.size() < length) v.resize(length);
    dst = v.data();
  }
  if ((param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) == 0) {
    std::memcpy(dst, data, length);
    landed(s, id, length);
    return UCS_OK;
  }
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  p.cb.recv_am = recv_done;
  auto* c = new RecvCtx{s, id, length};  // rendezvous only: large payloads, rare
  p.user_data = c;
  ucs_status_ptr_t r = s->u->ucp_am_recv_data_nbx(s->worker, data, dst, length, &p);
  if (r == nullptr) {
    landed(s, id, length);
    delete c;
  } else if (UCS_PTR_IS_ERR(r)) {
    delete c;
    s->closed = true;
  } else {
    ++s->receiving;
  }
  return UCS_OK;
}

template <unsigned Id>
ucs_status_t on_am_id(void* arg, const void* h, std::size_t hl, void* d, std::size_t n,
                      const ucp_am_recv_param_t* p) {
  return on_am(arg, h, hl, d, n, p, Id);
}

bool make_worker(RawSide& s) {
  auto u = net::detail::ucx();
  if (!u) {
    s.error = u.error().message();
    return false;
  }
  s.u = *u;
  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SINGLE;
  if (s.u->ucp_worker_create(s.u->context, &wp, &s.worker) != UCS_OK) {
    s.error = "ucp_worker_create failed";
    return false;
  }
  ucp_am_recv_callback_t cbs[] = {on_am_id<kRequest>, on_am_id<kReply>, on_am_id<kOneWay>};
  for (unsigned id = 1; id <= 3; ++id) {
    ucp_am_handler_param_t hp{};
    hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                    UCP_AM_HANDLER_PARAM_FIELD_ARG | UCP_AM_HANDLER_PARAM_FIELD_FLAGS;
    hp.id = id;
    hp.cb = cbs[id - 1];
    hp.arg = &s;
    hp.flags = UCP_AM_FLAG_WHOLE_MSG;
    if (s.u->ucp_worker_set_am_recv_handler(s.worker, &hp) != UCS_OK) {
      s.error = "ucp_worker_set_am_recv_handler failed";
      return false;
    }
  }
  return true;
}

// Sends n bytes of s.buf with id; waits for the send to complete (the buffer is reused).
bool send_wait(RawSide& s, unsigned id, std::size_t n) {
  static const RawHeader hdr{};
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  p.flags = UCP_AM_SEND_FLAG_REPLY;
  ucs_status_ptr_t r = s.u->ucp_am_send_nbx(s.ep, id, &hdr, sizeof hdr, s.buf.data(), n, &p);
  if (r == nullptr) return true;
  if (UCS_PTR_IS_ERR(r)) return false;
  while (s.u->ucp_request_check_status(r) == UCS_INPROGRESS && !s.closed)
    (void)s.u->ucp_worker_progress(s.worker);
  const bool ok = s.u->ucp_request_check_status(r) == UCS_OK;
  s.u->ucp_request_free(r);
  return ok;
}

void on_conn(ucp_conn_request_h req, void* arg) {
  auto* s = static_cast<RawSide*>(arg);
  if (s->ep != nullptr) {
    (void)s->u->ucp_listener_reject(s->listener, req);
    return;
  }
  ucp_ep_params_t ep{};
  ep.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                  UCP_EP_PARAM_FIELD_ERR_HANDLER;
  ep.conn_request = req;
  ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  ep.err_handler.cb = on_error;
  ep.err_handler.arg = s;
  if (s->u->ucp_ep_create(s->worker, &ep, &s->ep) != UCS_OK) s->closed = true;
}

sockaddr_in addr_of(const std::string& ip, std::uint32_t port) {
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(static_cast<std::uint16_t>(port));
  (void)inet_pton(AF_INET, ip.c_str(), &sa.sin_addr);
  return sa;
}

constexpr std::size_t kMax = (64u << 20) + 4096;

}  // namespace

struct RawUcxClient::State : RawSide {};

int raw_ucx_serve(const std::string& ip, void (*put_port)(std::uint32_t, void*), void* arg) {
  RawSide s;
  s.buf.resize(kMax);
  s.sink.resize(kMax);
  if (!make_worker(s)) return 10;
  sockaddr_in sa = addr_of(ip, 0);
  ucp_listener_params_t lp{};
  lp.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
  lp.sockaddr.addr = reinterpret_cast<const sockaddr*>(&sa);
  lp.sockaddr.addrlen = sizeof sa;
  lp.conn_handler.cb = on_conn;
  lp.conn_handler.arg = &s;
  if (s.u->ucp_listener_create(s.worker, &lp, &s.listener) != UCS_OK) return 11;
  ucp_listener_attr_t la{};
  la.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
  if (s.u->ucp_listener_query(s.listener, &la) != UCS_OK) return 12;
  put_port(ntohs(reinterpret_cast<const sockaddr_in*>(&la.sockaddr)->sin_port), arg);
  const std::int64_t give_up = monotonic_ns() + 30'000'000'000;  // no client: 30 s
  while (!s.closed && (s.ep != nullptr || monotonic_ns() < give_up)) {
    (void)s.u->ucp_worker_progress(s.worker);
    // (2) Answer a request once every one-way payload before it has landed (the client's stream
    // ends with a round trip that must not overtake them).
    if (s.answer != SIZE_MAX && s.receiving == 0) {
      const std::size_t n = s.answer;
      s.answer = SIZE_MAX;
      if (!send_wait(s, kReply, n)) break;
    }
  }
  return 0;  // the process exits: UCX's objects go with it
}

RawUcxClient::~RawUcxClient() { delete s_; }

std::string RawUcxClient::connect(const std::string& ip, std::uint32_t port, std::size_t max) {
  s_ = new State;
  s_->buf.resize(max);
  s_->sink.resize(8);
  if (!make_worker(*s_)) return s_->error;
  sockaddr_in sa = addr_of(ip, port);
  ucp_ep_params_t ep{};
  ep.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR |
                  UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
  ep.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
  ep.sockaddr.addr = reinterpret_cast<const sockaddr*>(&sa);
  ep.sockaddr.addrlen = sizeof sa;
  ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  ep.err_handler.cb = on_error;
  ep.err_handler.arg = s_;
  if (s_->u->ucp_ep_create(s_->worker, &ep, &s_->ep) != UCS_OK) return "ucp_ep_create failed";
  if (!call(8, 1)) return "the first round trip failed";
  return {};
}

bool RawUcxClient::call(std::size_t n, std::uint64_t seq) {
  RawSide& s = *s_;
  if (n >= 8) std::memcpy(s.buf.data(), &seq, 8);
  s.replied = false;
  if (!send_wait(s, kRequest, n)) return false;
  while (!s.replied && !s.closed) (void)s.u->ucp_worker_progress(s.worker);
  std::uint64_t back = 0;
  if (n >= 8) std::memcpy(&back, s.buf.data(), 8);
  return s.replied && (n < 8 || back == seq);
}

std::int64_t RawUcxClient::stream(std::size_t n, std::int64_t until_ns, StreamShape shape) {
  RawSide& s = *s_;
  const std::size_t window = std::clamp<std::size_t>(shape.window, 1, kMaxWindow);
  const std::size_t buffers = std::clamp<std::size_t>(shape.buffers, 1, kMaxSinks);
  const RawHeader hdr{std::clamp<std::uint64_t>(shape.sinks, 1, kMaxSinks), 0};
  if (buffers > 1) {
    if (s.ring.size() < buffers) s.ring.resize(buffers);
    for (std::size_t b = 0; b < buffers; ++b)
      if (s.ring[b].size() < n) s.ring[b].resize(n);  // the first (warm-up) stream of a size
  }
  ucs_status_ptr_t inflight[kMaxWindow] = {};
  std::int64_t bytes = 0;
  std::size_t i = 0;
  while (monotonic_ns() < until_ns && !s.closed) {
    ucs_status_ptr_t& slot = inflight[i++ % window];
    if (slot != nullptr) {  // the oldest of the window: wait for it
      while (s.u->ucp_request_check_status(slot) == UCS_INPROGRESS && !s.closed)
        (void)s.u->ucp_worker_progress(s.worker);
      s.u->ucp_request_free(slot);
      slot = nullptr;
    }
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = UCP_AM_SEND_FLAG_REPLY;
    const std::byte* src = buffers > 1 ? s.ring[s.next++ % buffers].data() : s.buf.data();
    ucs_status_ptr_t r = s.u->ucp_am_send_nbx(s.ep, kOneWay, &hdr, sizeof hdr, src, n, &p);
    if (UCS_PTR_IS_ERR(r)) return -1;
    slot = r;
    bytes += static_cast<std::int64_t>(n);
  }
  for (auto& slot : inflight) {
    if (slot == nullptr) continue;
    while (s.u->ucp_request_check_status(slot) == UCS_INPROGRESS && !s.closed)
      (void)s.u->ucp_worker_progress(s.worker);
    s.u->ucp_request_free(slot);
  }
  return call(8, 2) ? bytes : -1;
}

}  // namespace mbmq::bench
