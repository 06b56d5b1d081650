// Plain C++ core of the MiDashengLM front end (no Python in here).
#pragma once

#include <cstddef>
#include <vector>

namespace mdl_edge {

// Periodic Hann window, w[n] = 0.5 - 0.5 cos(2 pi n / N), as torch.hann_window(N) builds it.
// Computed in double and rounded once to float so it matches a float64 reference to 1 ulp.
// Throws std::invalid_argument for length 0.
std::vector<float> hann_periodic(std::size_t length);

}  // namespace mdl_edge
