// Thin pybind11 layer over mel.hpp: argument checks and conversion only; compute runs in the
// core with the GIL released. C++ exceptions arrive in Python as ValueError / TypeError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "mel.hpp"

namespace py = pybind11;
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

namespace {

// A 1-D float array as contiguous float32: float32 input is used in place, float64 converted.
FloatArray as_wave(const py::array& a, const char* what) {
  if (a.dtype().kind() != 'f')
    throw py::type_error(std::string(what) + ": expected a float32 or float64 array, got dtype " +
                         py::str(a.dtype()).cast<std::string>());
  if (a.ndim() != 1)
    throw py::value_error(std::string(what) + ": expected a 1-D array, got " + std::to_string(a.ndim()) + " dimensions");
  return FloatArray::ensure(a);
}

// Thread counts are resolved once, in Python (mdl_edge.runtime.options.resolve_threads).
void check_threads(int n_threads, const char* what) {
  if (n_threads < 1) throw py::value_error(std::string(what) + ": n_threads must be >= 1, got " + std::to_string(n_threads));
}

py::array_t<float> to_array(const std::vector<float>& v, std::vector<py::ssize_t> shape) {
  py::array_t<float> out(shape);
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

}  // namespace

PYBIND11_MODULE(_mel, m) {
  m.doc() = "mdl-edge C++ front end: the exact MiDashengLM log-mel spectrogram";
  m.attr("N_MELS") = mdl_edge::kNmels;

  m.def(
      "hann_periodic",
      [](long length) {
        if (length <= 0)
          throw py::value_error("hann_periodic: window length must be positive, got " + std::to_string(length));
        std::vector<float> w;
        {
          py::gil_scoped_release release;
          w = mdl_edge::hann_periodic(static_cast<std::size_t>(length));
        }
        return to_array(w, {static_cast<py::ssize_t>(w.size())});
      },
      py::arg("length"), "Periodic Hann window of `length` samples as float32 (torch.hann_window).");

  m.def(
      "window", [](bool bf16) { return to_array(mdl_edge::MelFrontEnd::get(bf16).window(), {mdl_edge::kNfft}); },
      py::kw_only(), py::arg("bf16_buffers") = false, "The cached analysis window [512].");
  m.def(
      "filterbank",
      [](bool bf16) { return to_array(mdl_edge::MelFrontEnd::get(bf16).filterbank(), {mdl_edge::kNfreqs, mdl_edge::kNmels}); },
      py::kw_only(), py::arg("bf16_buffers") = false, "The cached HTK mel filterbank [257, 64].");

  m.def(
      "log_mel",
      [](const py::array& wave, bool bf16, int n_threads) {
        check_threads(n_threads, "log_mel");
        FloatArray x = as_wave(wave, "log_mel");
        const std::size_t n = static_cast<std::size_t>(x.size());
        if (n == 0) throw py::value_error("log_mel: the clip is empty (0 samples)");
        py::array_t<float> out({static_cast<py::ssize_t>(mdl_edge::kNmels), static_cast<py::ssize_t>(mdl_edge::n_frames(n))});
        const float* src = x.data();
        float* dst = out.mutable_data();
        {
          py::gil_scoped_release release;
          mdl_edge::MelFrontEnd::get(bf16).log_mel(src, n, dst, n_threads);
        }
        return out;
      },
      py::arg("wave"), py::kw_only(), py::arg("bf16_buffers") = false, py::arg("n_threads"),
      R"doc(Log-mel [64, 1 + max(L, 3200) // 160] of a 16 kHz mono clip (float32 in, float32 out).

Reflect centre padding, periodic Hann 512, hop 160, power spectrum, 64 HTK mel bands,
10*log10(max(x, 1e-10)), per-clip top_db 120; clips under 3200 samples are zero-padded.
n_threads >= 1 (the Python layer resolves the default). Raises ValueError for an empty clip or non-finite samples.)doc");

  m.def(
      "raw_db_frames",
      [](const py::array& padded, long n_frames, bool bf16, int n_threads) {
        check_threads(n_threads, "raw_db_frames");
        FloatArray x = as_wave(padded, "raw_db_frames");
        if (n_frames < 0) throw py::value_error("raw_db_frames: n_frames must be >= 0");
        const std::size_t nf = static_cast<std::size_t>(n_frames);
        py::array_t<float> out({static_cast<py::ssize_t>(mdl_edge::kNmels), static_cast<py::ssize_t>(nf)});
        const float* src = x.data();
        float* dst = out.mutable_data();
        const std::size_t n = static_cast<std::size_t>(x.size());
        float peak;
        {
          py::gil_scoped_release release;
          peak = mdl_edge::MelFrontEnd::get(bf16).raw_db_frames(src, n, nf, dst, nf, 0, n_threads);
        }
        return py::make_tuple(out, peak);
      },
      py::arg("padded"), py::arg("n_frames"), py::kw_only(), py::arg("bf16_buffers") = false, py::arg("n_threads"),
      "dB [64, n_frames] (no top_db) of frames of an already reflect-padded signal, and their maximum.");
}
