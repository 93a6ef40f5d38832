// llama.cpp logs go through one global callback. By default they are silent (a library must not
// write to the host's stderr); GENESIS_LOG=error|warn|info|debug prints them. A thread can capture
// error and warning lines, which is how a failed load reports llama.cpp's own reason.
#pragma once

#include <string>

namespace genesis {

void install_log_callback();

class LogCapture {
 public:
  LogCapture();
  ~LogCapture();
  // The captured warning and error lines, most relevant (last error) last.
  const std::string& text() const { return text_; }
  void append(const char* line);

 private:
  std::string text_;
  LogCapture* previous_;
};

}  // namespace genesis
