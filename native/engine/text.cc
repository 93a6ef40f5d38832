#include "engine/text.h"

#include <algorithm>

namespace genesis {

TextStream::TextStream(std::vector<std::string> stops) {
  for (auto& s : stops) {
    if (s.empty()) continue;
    max_stop_ = std::max(max_stop_, s.size());
    stops_.push_back(std::move(s));
  }
}

size_t incomplete_utf8_tail(const std::string& s) {
  // Walk back over at most 3 continuation bytes to the lead byte of the last character.
  const size_t n = s.size();
  for (size_t back = 1; back <= 4 && back <= n; ++back) {
    const auto c = static_cast<unsigned char>(s[n - back]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte
    size_t need = 1;
    if ((c & 0xE0) == 0xC0) need = 2;
    else if ((c & 0xF0) == 0xE0) need = 3;
    else if ((c & 0xF8) == 0xF0) need = 4;
    return need > back ? back : 0;
  }
  return 0;  // only continuation bytes: invalid text, release it as is
}

size_t TextStream::safe_end() const {
  size_t end = text_.size();
  // Hold back the longest suffix that is a proper prefix of some stop string.
  size_t hold = 0;
  for (const auto& stop : stops_) {
    const size_t max_len = std::min(stop.size() - 1, text_.size() - emitted_);
    for (size_t len = max_len; len > hold; --len) {
      if (text_.compare(text_.size() - len, len, stop, 0, len) == 0) {
        hold = len;
        break;
      }
    }
  }
  end -= hold;
  end -= incomplete_utf8_tail(text_.substr(emitted_, end - emitted_));
  return end;
}

TextStream::Update TextStream::push(const std::string& piece) {
  Update update;
  const size_t before = text_.size();
  text_ += piece;
  if (!stops_.empty()) {
    // A match can start at most max_stop_-1 bytes before the new piece.
    const size_t from = before >= max_stop_ ? before - max_stop_ + 1 : 0;
    size_t found = std::string::npos;
    for (const auto& stop : stops_) {
      const size_t at = text_.find(stop, std::max(from, emitted_));
      if (at != std::string::npos && at < found) found = at;
    }
    if (found != std::string::npos) {
      text_.resize(found);
      update.delta = text_.substr(emitted_);
      emitted_ = text_.size();
      update.stopped = true;
      return update;
    }
  }
  const size_t end = safe_end();
  if (end > emitted_) {
    update.delta = text_.substr(emitted_, end - emitted_);
    emitted_ = end;
  }
  return update;
}

std::string TextStream::flush() {
  std::string rest = text_.substr(emitted_);
  emitted_ = text_.size();
  return rest;
}

}  // namespace genesis
