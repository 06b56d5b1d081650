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

// The cached front end of a setting; a bad acoustic_mels arrives as ValueError.
const mdl_edge::MelFrontEnd& front_end(int acoustic_mels, bool bf16) {
  try {
    return mdl_edge::MelFrontEnd::get(acoustic_mels, bf16);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
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
      "window",
      [](int acoustic_mels, bool bf16) {
        const auto& fe = front_end(acoustic_mels, bf16);
        return to_array(fe.window(), {static_cast<py::ssize_t>(fe.n_fft())});
      },
      py::kw_only(), py::arg("acoustic_mels") = 0, py::arg("bf16_buffers") = false,
      "The cached analysis window: [512] (semantic mel) or [1024] (acoustic mel, acoustic_mels > 0).");
  m.def(
      "filterbank",
      [](int acoustic_mels, bool bf16) {
        const auto& fe = front_end(acoustic_mels, bf16);
        return to_array(fe.filterbank(), {static_cast<py::ssize_t>(fe.n_fft() / 2 + 1), static_cast<py::ssize_t>(fe.n_mels())});
      },
      py::kw_only(), py::arg("acoustic_mels") = 0, py::arg("bf16_buffers") = false,
      "The cached HTK mel filterbank: [257, 64] (semantic) or [513, acoustic_mels] (acoustic).");

  m.def(
      "log_mel",
      [](const py::array& wave, int acoustic_mels, bool bf16, int n_threads) {
        check_threads(n_threads, "log_mel");
        FloatArray x = as_wave(wave, "log_mel");
        const std::size_t n = static_cast<std::size_t>(x.size());
        if (n == 0) throw py::value_error("log_mel: the clip is empty (0 samples)");
        const auto& semantic = front_end(0, bf16);
        const auto* acoustic = acoustic_mels > 0 ? &front_end(acoustic_mels, bf16) : nullptr;
        const std::size_t frames = mdl_edge::n_frames(n);
        py::array_t<float> out({static_cast<py::ssize_t>(mdl_edge::kNmels + acoustic_mels), static_cast<py::ssize_t>(frames)});
        const float* src = x.data();
        float* dst = out.mutable_data();
        {
          py::gil_scoped_release release;
          semantic.log_mel(src, n, dst, n_threads);
          if (acoustic) acoustic->log_mel(src, n, dst + mdl_edge::kNmels * frames, n_threads);
        }
        return out;
      },
      py::arg("wave"), py::kw_only(), py::arg("acoustic_mels") = 0, py::arg("bf16_buffers") = false, py::arg("n_threads"),
      R"doc(Log-mel [64 + acoustic_mels, 1 + max(L, 3200) // 160] of a 16 kHz mono clip (float32 in and out).

Rows 0-63, the semantic mel: reflect centre padding, periodic Hann 512, hop 160, power spectrum,
64 HTK mel bands, 10*log10(max(x, 1e-10)), per-clip top_db 120. Rows 64-, when acoustic_mels > 0,
the acoustic mel: the same with n_fft 1024, magnitude, acoustic_mels bands, ln(max(x, 1e-7)).
Clips under 3200 samples are zero-padded. n_threads >= 1 (the Python layer resolves the default).
Raises ValueError for an empty clip, non-finite samples or a bad acoustic_mels.)doc");

  m.def(
      "raw_db_frames",
      [](const py::array& padded, long n_frames, int acoustic_mels, bool bf16, int n_threads) {
        check_threads(n_threads, "raw_db_frames");
        FloatArray x = as_wave(padded, "raw_db_frames");
        if (n_frames < 0) throw py::value_error("raw_db_frames: n_frames must be >= 0");
        const std::size_t nf = static_cast<std::size_t>(n_frames);
        const auto& fe = front_end(acoustic_mels, bf16);
        py::array_t<float> out({static_cast<py::ssize_t>(fe.n_mels()), static_cast<py::ssize_t>(nf)});
        const float* src = x.data();
        float* dst = out.mutable_data();
        const std::size_t n = static_cast<std::size_t>(x.size());
        float peak;
        {
          py::gil_scoped_release release;
          peak = fe.raw_db_frames(src, n, nf, dst, nf, 0, n_threads);
        }
        return py::make_tuple(out, peak);
      },
      py::arg("padded"), py::arg("n_frames"), py::kw_only(), py::arg("acoustic_mels") = 0, py::arg("bf16_buffers") = false,
      py::arg("n_threads"),
      "Log frames (no top_db) [n_mels, n_frames] of a signal reflect-padded by n_fft / 2, and their maximum: "
      "the semantic mel (acoustic_mels == 0) or the acoustic one.");
}
