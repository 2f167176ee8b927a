#pragma once
// What duquant-pack and duquant-inspect share on the terminal side: the exit-code policy, one-line
// error messages, byte and shape formatting, and the progress bar.

#include <chrono>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

namespace duquant::tools {

// Exit codes of every tool: 0 ok, 1 failure (bad file, bad weight, I/O), 2 usage error.
constexpr int kExitOk = 0;
constexpr int kExitFailure = 1;
constexpr int kExitUsage = 2;

// A bad flag or flag value: the tool exits with kExitUsage.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Runs `body` and turns what it throws into the exit-code policy, printing
// "<tool>: error: <message>" as one line on stderr (LibTorch errors without their backtrace).
int run_tool(const std::string& tool, const std::function<int()>& body);

// "1.23 MB", "512 B" (decimal units, as the Python report prints).
std::string format_bytes(int64_t bytes);
// "[2048, 256]"
std::string format_shape(const std::vector<int64_t>& shape);

// The progress of a long loop on stderr: a redrawn bar on a terminal, one plain line per step
// otherwise (logs, CI), nothing when disabled.
class ProgressBar {
 public:
  ProgressBar(std::string verb, size_t total, bool enabled = true);
  void update(size_t done, const std::string& item);
  void finish();  // ends the bar's line on a terminal

 private:
  std::string verb_;
  size_t total_;
  bool enabled_, terminal_, open_line_ = false;
  std::chrono::steady_clock::time_point start_;
};

// Seconds since `start`.
double seconds_since(std::chrono::steady_clock::time_point start);

}  // namespace duquant::tools
