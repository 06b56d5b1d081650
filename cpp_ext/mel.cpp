#include "mel.hpp"

#include <cmath>
#include <stdexcept>

namespace mdl_edge {

std::vector<float> hann_periodic(std::size_t length) {
  if (length == 0) {
    throw std::invalid_argument("hann_periodic: window length must be positive");
  }
  std::vector<float> w(length);
  const double two_pi_over_n = 2.0 * M_PI / static_cast<double>(length);
  for (std::size_t n = 0; n < length; ++n) {
    w[n] = static_cast<float>(0.5 - 0.5 * std::cos(two_pi_over_n * static_cast<double>(n)));
  }
  return w;
}

}  // namespace mdl_edge
