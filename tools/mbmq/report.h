// tools/mbmq/report.h: what `mbmq bench` prints: the terminal table, JSON, Markdown, an SVG plot,
// the target checks, and the `mbmq copies` report.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "bench.h"

namespace mbmq::tool {

struct Check {
  std::string what;
  double measured, limit;
  bool pass;
};

// Fills memcpy_eq for sizes >= 64 KiB: (p50 - raw-spin's p50) / one memcpy of the payload.
void derive_copies(std::vector<CellResult>& rs);
std::vector<Check> evaluate(const std::vector<CellResult>& rs,
                            const std::vector<std::size_t>& sizes);

nlohmann::json to_json(const std::vector<CellResult>& rs, const std::vector<Check>& checks,
                       const Options& opt);
void print_table(const std::vector<CellResult>& rs, const std::vector<Check>& checks,
                 const Options& opt);
// `mbmq bench --channels`: the cells grouped by channel count. fd_limit: RLIMIT_NOFILE in force.
void print_channels_table(const std::vector<CellResult>& rs, const Options& opt,
                          std::uint64_t fd_limit);
// With --channels rows (CellResult::channels > 0) the table has a channels column.
std::string markdown(const std::vector<CellResult>& rs);
// Log-log p50 latency against payload size, one line per mechanism.
std::string svg_plot(const std::vector<CellResult>& rs);
void print_copies(const std::vector<CellResult>& rs, const std::vector<Mechanism>& mechs,
                  const std::vector<std::size_t>& sizes);

}  // namespace mbmq::tool
