// Thin pybind11 layer over mel.hpp: argument conversion only, compute stays in the core.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "mel.hpp"

namespace py = pybind11;

PYBIND11_MODULE(_mel, m) {
  m.doc() = "mdl-edge C++ front end (log-mel spectrogram)";
  m.def(
      "hann_periodic",
      [](long length) {
        if (length <= 0) {
          throw std::invalid_argument("hann_periodic: window length must be positive, got " +
                                      std::to_string(length));
        }
        std::vector<float> w;
        {
          py::gil_scoped_release release;
          w = mdl_edge::hann_periodic(static_cast<std::size_t>(length));
        }
        py::array_t<float> out(static_cast<py::ssize_t>(w.size()));
        std::copy(w.begin(), w.end(), out.mutable_data());
        return out;
      },
      py::arg("length"), "Periodic Hann window of `length` samples as float32 (torch.hann_window).");
}
