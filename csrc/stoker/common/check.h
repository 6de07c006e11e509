// Errors: one path. STOKER_CHECK throws with file:line and the values at fault; the bindings translate
// IndexError/ValueError/TypeError to the Python exceptions of the same name and anything else to RuntimeError.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace stoker {

/// An index outside the dataset (Python IndexError).
struct IndexError : std::out_of_range {
  using std::out_of_range::out_of_range;
};
/// A bad argument value (Python ValueError).
struct ValueError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
/// An argument of the wrong kind (Python TypeError).
struct TypeError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}
}  // namespace detail

}  // namespace stoker

/// Throws `Kind` with the message built from the arguments when `cond` is false.
#define STOKER_CHECK_AS(Kind, cond, ...)                                      \
  do {                                                                        \
    if (!(cond)) throw Kind(::stoker::detail::concat(__VA_ARGS__));           \
  } while (0)

/// Internal invariant: a failure is a stoker bug, reported with file:line.
#define STOKER_CHECK(cond, ...)                                                            \
  do {                                                                                     \
    if (!(cond))                                                                           \
      throw std::runtime_error(::stoker::detail::concat("stoker internal error at ", __FILE__, \
                                                        ":", __LINE__, ": ", __VA_ARGS__)); \
  } while (0)
