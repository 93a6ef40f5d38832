// Incremental detokenized text for one sequence: holds back bytes that may still become part of a
// stop string or that end in the middle of a UTF-8 character, so a streamed chunk never splits a
// character and a stop string (even one spanning several tokens) is never emitted.
#pragma once

#include <string>
#include <vector>

namespace genesis {

class TextStream {
 public:
  explicit TextStream(std::vector<std::string> stops);

  struct Update {
    std::string delta;      // newly releasable text
    bool stopped = false;   // a stop string was found; delta ends right before it
  };

  // Appends the bytes of one token's piece.
  Update push(const std::string& piece);
  // Releases everything still held (end of generation without a stop string).
  std::string flush();

  const std::string& text() const { return text_; }

 private:
  size_t safe_end() const;

  std::vector<std::string> stops_;
  size_t max_stop_ = 0;
  std::string text_;    // all generated text (truncated at the stop string once found)
  size_t emitted_ = 0;  // bytes of text_ already released
};

// Length of a trailing incomplete UTF-8 sequence in s (0 when s ends on a character boundary).
size_t incomplete_utf8_tail(const std::string& s);

}  // namespace genesis
