// tools/mbmq/files.cc: `mbmq files`: one file served over loopback HTTP/1.1, per way of sending
// it: file_server's core (src/serve, the very same code) with read+write, mmap+write, sendfile and
// splice, and nginx (Debian's, `sendfile on`) in the same run. Per server: throughput, server CPU
// seconds per GiB served (the server process's CPU clock, every thread, over the measured
// requests only) and the client's, median over interleaved rounds. The client reads every body
// and checks 8 bytes at every MiB of it against the file.
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "mbmq/deadline.h"
#include "os/file.h"
#include "os/process.h"
#include "os/tcp.h"
#include "serve/http.h"

namespace mbmq::tool {
namespace {

std::byte file_byte(std::uint64_t i) {
  return static_cast<std::byte>(((i >> 20) * 131 + (i & 0xfffff) * 7) & 0xff);
}

struct Server {
  std::string name;
  bool nginx = false;
  fileserver::Mode mode = fileserver::Mode::Sendfile;
};

struct Sample {
  double gib_per_s = 0, server_cpu_s_per_gib = 0, client_cpu_s_per_gib = 0;
};

// One keep-alive client connection doing `requests` GETs of /f.bin; false on any error or a
// body that differs from the file.
bool fetch(std::uint16_t port, int requests, std::uint64_t size, std::string* why) {
  auto s = os::tcp_connect("127.0.0.1", port);
  if (!s) return *why = "connect: " + s.error().message(), false;
  std::vector<std::byte> buf(1 << 20);
  static constexpr char kReq[] = "GET /f.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
  std::string head;
  for (int r = 0; r < requests; ++r) {
    if (!os::write_full(s->get(), {reinterpret_cast<const std::byte*>(kReq), sizeof kReq - 1}))
      return *why = "write request", false;
    // Head: read until the blank line; what follows it is body.
    std::size_t end;
    while ((end = head.find("\r\n\r\n")) == std::string::npos) {
      auto n = os::read_some(s->get(), buf);
      if (!n || *n == 0) return *why = "connection closed in the head", false;
      head.append(reinterpret_cast<const char*>(buf.data()), *n);
    }
    if (head.rfind("HTTP/1.1 200", 0) != 0) return *why = "status: " + head.substr(0, 40), false;
    std::uint64_t len = 0;
    auto cl = head.find("Content-Length: ");
    if (cl == std::string::npos || cl > end) cl = head.find("content-length: ");
    if (cl != std::string::npos) len = std::strtoull(head.c_str() + cl + 16, nullptr, 10);
    if (len != size) return *why = "Content-Length " + std::to_string(len), false;
    std::string rest = head.substr(end + 4);
    head.clear();
    std::uint64_t pos = 0;
    auto check = [&](const std::byte* p, std::size_t n) {
      // 8 bytes at every MiB boundary that falls in [pos, pos + n).
      std::uint64_t next = (pos + (1u << 20) - 1) / (1u << 20) * (1u << 20);
      for (; next < pos + n; next += 1u << 20)
        for (std::uint64_t k = next; k < std::min(next + 8, pos + n); ++k)
          if (p[k - pos] != file_byte(k)) return false;
      return true;
    };
    if (rest.size() > len) {  // pipelining is not used: more than the body is an error
      return *why = "extra bytes after a body", false;
    }
    if (!check(reinterpret_cast<const std::byte*>(rest.data()), rest.size()))
      return *why = "body differs", false;
    pos += rest.size();
    while (pos < len) {
      auto n =
          os::read_some(s->get(), {buf.data(), std::min<std::uint64_t>(buf.size(), len - pos)});
      if (!n || *n == 0) return *why = "connection closed in the body", false;
      if (!check(buf.data(), *n)) return *why = "body differs at " + std::to_string(pos), false;
      pos += *n;
    }
  }
  return true;
}

bool wait_for_port(std::uint16_t port) {
  for (int i = 0; i < 200; ++i) {
    if (os::tcp_connect("127.0.0.1", port)) return true;
    ::usleep(25'000);
  }
  return false;
}

struct Running {
  pid_t pid = -1;
  std::uint16_t port = 0;
};

Result<Running> start(const Server& sv, const std::string& dir) {
  Running run;
  // Servers run on CPU 1 (they inherit this process's affinity), the client on CPU 0.
  (void)os::pin_to_cpu(1);
  if (sv.nginx) {
    // A port for nginx: bind an ephemeral one, note it, let it go.
    { auto probe = MBMQ_TRY(os::tcp_listen("127.0.0.1", 0, 1, &run.port)); }
    std::string conf = dir + "/nginx.conf";
    std::ofstream(conf) << "worker_processes 1;\ndaemon off;\nmaster_process off;\n"
                        << "error_log " << dir << "/nginx-error.log;\npid " << dir
                        << "/nginx.pid;\n"
                        << "events { worker_connections 64; }\n"
                        << "http {\n  sendfile on;\n  tcp_nopush on;\n  access_log off;\n"
                        << "  keepalive_requests 1000000;\n  keepalive_timeout 60s;\n"
                        << "  client_body_temp_path " << dir << "/cb;\n  proxy_temp_path " << dir
                        << "/px;\n  fastcgi_temp_path " << dir << "/fc;\n  uwsgi_temp_path " << dir
                        << "/uw;\n  scgi_temp_path " << dir << "/sc;\n"
                        << "  types { application/octet-stream bin; }\n"
                        << "  server {\n    listen 127.0.0.1:" << run.port << ";\n    root " << dir
                        << "/www;\n  }\n}\n";
    run.pid = MBMQ_TRY(os::spawn_program(
        "/usr/sbin/nginx", {"-p", dir, "-c", conf, "-e", dir + "/nginx-error.log"}, -1, -1));
  } else {
    auto l = MBMQ_TRY(os::tcp_listen("127.0.0.1", 0, 64, &run.port));
    auto pid = MBMQ_TRY(os::fork_process());
    if (pid == 0) {
      os::die_with_parent();
      fileserver::Options o;
      o.root = dir + "/www";
      o.mode = sv.mode;
      o.quiet = true;
      fileserver::Counters c;
      os::exit_now(fileserver::serve(o, l.get(), &c, nullptr));
    }
    run.pid = pid;
  }
  (void)os::pin_to_cpu(0);
  if (!wait_for_port(run.port)) {
    (void)os::kill_process(run.pid, SIGKILL);
    (void)os::wait_process(run.pid);
    return fail(Errc::System, "server did not start listening");
  }
  return run;
}

std::string fmt(double v, int prec = 2) {
  char b[32];
  std::snprintf(b, sizeof b, "%.*f", prec, v);
  return b;
}

}  // namespace

int run_files(const std::vector<std::string>& argv_rest) {
  CLI::App app{
      "mbmq files: serving a file over loopback HTTP: read+write, mmap+write, sendfile, "
      "splice, and nginx (sendfile on)"};
  std::uint64_t file_mib = 256;
  int requests = 8, rounds = 3;
  bool json = false, markdown = false, no_nginx = false;
  app.add_option("--file-mib", file_mib, "size of the file served")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  app.add_option("--requests", requests, "requests per server per round (one connection)")
      ->check(CLI::Range(1, 1000))
      ->capture_default_str();
  app.add_option("--rounds", rounds, "interleaved rounds; medians are reported")
      ->check(CLI::Range(1, 50))
      ->capture_default_str();
  app.add_flag("--json", json, "JSON instead of the table");
  app.add_flag("--markdown", markdown, "a Markdown table (for the README)");
  app.add_flag("--no-nginx", no_nginx, "leave nginx out");
  std::vector<const char*> args = {"mbmq files"};
  for (const auto& a : argv_rest) args.push_back(a.c_str());
  try {
    app.parse(static_cast<int>(args.size()), args.data());
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  if (json && markdown) {
    std::fprintf(stderr, "mbmq files: --json and --markdown exclude each other\n");
    return 2;
  }
  const std::uint64_t size = file_mib << 20;
  const std::string dir = "/tmp/mbmq-files-" + std::to_string(os::current_pid());
  std::vector<Server> servers = {{"read+write", false, fileserver::Mode::Copy},
                                 {"mmap+write", false, fileserver::Mode::Mmap},
                                 {"sendfile", false, fileserver::Mode::Sendfile},
                                 {"splice", false, fileserver::Mode::Splice}};
  const bool have_nginx = os::open_read("/usr/sbin/nginx").has_value();
  if (!no_nginx && have_nginx) servers.push_back({"nginx", true, fileserver::Mode::Sendfile});
  if (!no_nginx && !have_nginx)
    std::fprintf(stderr,
                 "mbmq files: /usr/sbin/nginx not found: nginx left out "
                 "(scripts/install-deps.sh installs it)\n");
  std::string cmd = "mkdir -p " + dir + "/www";
  if (std::system(cmd.c_str()) != 0) return 1;
  {
    auto f = os::create_file((dir + "/www/f.bin").c_str());
    if (!f) return std::fprintf(stderr, "mbmq files: %s\n", f.error().message().c_str()), 1;
    std::vector<std::byte> chunk(1 << 20);
    for (std::uint64_t at = 0; at < size; at += chunk.size()) {
      for (std::size_t i = 0; i < chunk.size(); ++i) chunk[i] = file_byte(at + i);
      if (!os::pwrite_full(f->get(), chunk, at)) return 1;
    }
  }
  if (!json)
    std::fprintf(stderr, "mbmq files: a %llu MiB file, %d requests per server, %d rounds\n",
                 static_cast<unsigned long long>(file_mib), requests, rounds);
  std::vector<std::vector<Sample>> samples(servers.size());
  int rc = 0;
  for (int round = 0; round < rounds && rc == 0; ++round) {
    for (std::size_t k = 0; k < servers.size(); ++k) {
      auto run = start(servers[k], dir);
      if (!run) {
        std::fprintf(stderr, "mbmq files: %s: %s\n", servers[k].name.c_str(),
                     run.error().message().c_str());
        rc = 1;
        break;
      }
      std::string why;
      bool ok = fetch(run->port, 1, size, &why);  // warm-up: page cache, connection paths
      const std::int64_t s0 = os::process_cpu_ns(run->pid), c0 = os::process_cpu_ns();
      const std::int64_t t0 = monotonic_ns();
      ok = ok && fetch(run->port, requests, size, &why);
      const std::int64_t t1 = monotonic_ns();
      const std::int64_t s1 = os::process_cpu_ns(run->pid), c1 = os::process_cpu_ns();
      (void)os::kill_process(run->pid, SIGKILL);
      (void)os::wait_process(run->pid);
      if (!ok) {
        std::fprintf(stderr, "mbmq files: %s: %s\n", servers[k].name.c_str(), why.c_str());
        rc = 1;
        break;
      }
      const double gib = static_cast<double>(size) * requests / (1u << 30);
      samples[k].push_back({gib / (static_cast<double>(t1 - t0) / 1e9),
                            static_cast<double>(s1 - s0) / 1e9 / gib,
                            static_cast<double>(c1 - c0) / 1e9 / gib});
    }
  }
  cmd = "rm -rf " + dir;
  (void)std::system(cmd.c_str());
  if (rc != 0) return rc;
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  nlohmann::json out = nlohmann::json::array();
  std::vector<std::array<double, 5>> rows;
  double base_cpu = 0;
  for (std::size_t k = 0; k < servers.size(); ++k) {
    std::vector<double> g, sc, cc;
    for (const auto& s : samples[k]) {
      g.push_back(s.gib_per_s);
      sc.push_back(s.server_cpu_s_per_gib);
      cc.push_back(s.client_cpu_s_per_gib);
    }
    rows.push_back({median(g), median(sc), median(cc), *std::min_element(g.begin(), g.end()),
                    *std::max_element(g.begin(), g.end())});
    if (servers[k].name == "read+write") base_cpu = rows.back()[1];
    out.push_back({{"server", servers[k].name},
                   {"gib_per_s", rows.back()[0]},
                   {"gib_per_s_min", rows.back()[3]},
                   {"gib_per_s_max", rows.back()[4]},
                   {"server_cpu_s_per_gib", rows.back()[1]},
                   {"client_cpu_s_per_gib", rows.back()[2]},
                   {"file_bytes", size},
                   {"requests", requests},
                   {"rounds", rounds}});
  }
  if (json) {
    std::printf("%s\n", out.dump(2).c_str());
    return 0;
  }
  if (markdown) {
    std::printf(
        "| server | GiB/s (median; min-max) | server CPU s/GiB | x read+write | client CPU s/GiB "
        "|\n");
    std::printf("| --- | --- | --- | --- | --- |\n");
  } else {
    std::printf("%-12s %22s %18s %14s %18s\n", "server", "GiB/s (min-max)", "server CPU s/GiB",
                "x read+write", "client CPU s/GiB");
  }
  for (std::size_t k = 0; k < servers.size(); ++k) {
    const auto& r = rows[k];
    std::string gib = fmt(r[0]) + " (" + fmt(r[3]) + "-" + fmt(r[4]) + ")";
    std::string x = base_cpu > 0 ? fmt(r[1] / base_cpu) + "x" : "-";
    if (markdown)
      std::printf("| %s | %s | %s | %s | %s |\n", servers[k].name.c_str(), gib.c_str(),
                  fmt(r[1], 3).c_str(), x.c_str(), fmt(r[2], 3).c_str());
    else
      std::printf("%-12s %22s %18s %14s %18s\n", servers[k].name.c_str(), gib.c_str(),
                  fmt(r[1], 3).c_str(), x.c_str(), fmt(r[2], 3).c_str());
  }
  if (!markdown)
    std::printf(
        "\nServer on CPU 1, client on CPU 0; one keep-alive connection; CPU from each "
        "process's CPU clock over the measured requests.\n");
  return 0;
}

}  // namespace mbmq::tool
