#include "addon/log.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "ggml.h"
#include "llama.h"

namespace genesis {

namespace {

thread_local LogCapture* current_capture = nullptr;

int threshold() {
  const char* env = std::getenv("GENESIS_LOG");
  if (env == nullptr) return GGML_LOG_LEVEL_NONE;
  if (std::strcmp(env, "debug") == 0) return GGML_LOG_LEVEL_DEBUG;
  if (std::strcmp(env, "info") == 0) return GGML_LOG_LEVEL_INFO;
  if (std::strcmp(env, "warn") == 0) return GGML_LOG_LEVEL_WARN;
  return GGML_LOG_LEVEL_ERROR;
}

int last_level = GGML_LOG_LEVEL_INFO;

void on_log(ggml_log_level level, const char* text, void*) {
  // CONT continues the previous line at the previous line's level.
  const int effective = level == GGML_LOG_LEVEL_CONT ? last_level : static_cast<int>(level);
  if (level != GGML_LOG_LEVEL_CONT) last_level = level;
  static const int limit = threshold();
  if (limit != GGML_LOG_LEVEL_NONE && effective >= limit) std::fputs(text, stderr);
  if (current_capture != nullptr && effective >= GGML_LOG_LEVEL_WARN) current_capture->append(text);
}

}  // namespace

void install_log_callback() { llama_log_set(on_log, nullptr); }

LogCapture::LogCapture() : previous_(current_capture) { current_capture = this; }

LogCapture::~LogCapture() { current_capture = previous_; }

void LogCapture::append(const char* line) {
  if (text_.size() < 16384) text_ += line;
}

}  // namespace genesis
