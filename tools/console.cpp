#include "console.h"

#include <unistd.h>

#include <cstdio>
#include <iostream>
#include <sstream>

#include <c10/util/Exception.h>

namespace duquant::tools {
namespace {

// Messages are one line: a multi-line one (say, from a nested error) is joined with "; ".
std::string one_line(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  std::string out;
  for (char c : s) out += c == '\n' ? std::string("; ") : std::string(1, c);
  return out;
}

}  // namespace

int run_tool(const std::string& tool, const std::function<int()>& body) {
  try {
    return body();
  } catch (const UsageError& e) {
    std::cerr << tool << ": error: " << one_line(e.what()) << "\n"
              << "Run '" << tool << " --help' for the options.\n";
    return kExitUsage;
  } catch (const c10::Error& e) {
    std::cerr << tool << ": error: " << one_line(e.what_without_backtrace()) << "\n";
    return kExitFailure;
  } catch (const std::exception& e) {
    std::cerr << tool << ": error: " << one_line(e.what()) << "\n";
    return kExitFailure;
  }
}

std::string format_bytes(int64_t bytes) {
  const char* units[] = {"B", "kB", "MB", "GB", "TB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1000.0 && u < 4) {
    v /= 1000.0;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), u == 0 ? "%.0f %s" : "%.2f %s", v, units[u]);
  return buf;
}

std::string format_shape(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << "]";
  return s.str();
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

ProgressBar::ProgressBar(std::string verb, size_t total, bool enabled)
    : verb_(std::move(verb)),
      total_(total),
      enabled_(enabled),
      terminal_(isatty(fileno(stderr)) != 0),
      start_(std::chrono::steady_clock::now()) {}

void ProgressBar::update(size_t done, const std::string& item) {
  if (!enabled_) return;
  if (!terminal_) {
    std::cerr << verb_ << " " << done << "/" << total_ << " " << item << "\n";
    return;
  }
  constexpr int kWidth = 30;
  const int filled = total_ ? static_cast<int>(kWidth * done / total_) : kWidth;
  std::string shown = item.size() > 60 ? "..." + item.substr(item.size() - 57) : item;
  char elapsed[32];
  std::snprintf(elapsed, sizeof(elapsed), "%.1fs", seconds_since(start_));
  // \r returns to the line start, \033[K clears what a longer previous name left behind.
  std::cerr << "\r[" << std::string(filled, '#') << std::string(kWidth - filled, '.') << "] " << done << "/"
            << total_ << " " << elapsed << " " << verb_ << " " << shown << "\033[K" << std::flush;
  open_line_ = true;
}

void ProgressBar::finish() {
  if (open_line_) std::cerr << "\n";
  open_line_ = false;
}

}  // namespace duquant::tools
