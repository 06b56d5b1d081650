#include "mel.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>

#define POCKETFFT_NO_MULTITHREADING  // we parallelise over frames ourselves
#include "third_party/pocketfft/pocketfft_hdronly.h"

namespace mdl_edge {

struct MelFrontEnd::Plan {
  pocketfft::detail::pocketfft_r<double> rfft{kNfft};
};

std::vector<float> hann_periodic(std::size_t length) {
  if (length == 0) throw std::invalid_argument("hann_periodic: window length must be positive");
  std::vector<float> w(length);
  const double two_pi_over_n = 2.0 * M_PI / static_cast<double>(length);
  for (std::size_t n = 0; n < length; ++n)
    w[n] = static_cast<float>(0.5 - 0.5 * std::cos(two_pi_over_n * static_cast<double>(n)));
  return w;
}

namespace {

// numpy.linspace(start, stop, num): start + i * step, with the last point exactly stop.
std::vector<double> linspace(double start, double stop, int num) {
  std::vector<double> y(num);
  const double step = (stop - start) / (num - 1);
  for (int i = 0; i < num; ++i) y[i] = i * step + start;
  y[num - 1] = stop;
  return y;
}

double hz_to_mel(double f) { return 2595.0 * std::log10(1.0 + f / 700.0); }

}  // namespace

std::vector<float> mel_filterbank() {
  const std::vector<double> freqs = linspace(0.0, kSampleRate / 2.0, kNfreqs);
  std::vector<double> f_pts = linspace(hz_to_mel(0.0), hz_to_mel(kSampleRate / 2.0), kNmels + 2);
  for (double& m : f_pts) m = 700.0 * (std::pow(10.0, m / 2595.0) - 1.0);
  std::vector<float> fb(static_cast<std::size_t>(kNfreqs) * kNmels);
  for (int k = 0; k < kNfreqs; ++k) {
    for (int j = 0; j < kNmels; ++j) {
      const double down = -(f_pts[j] - freqs[k]) / (f_pts[j + 1] - f_pts[j]);
      const double up = (f_pts[j + 2] - freqs[k]) / (f_pts[j + 2] - f_pts[j + 1]);
      fb[static_cast<std::size_t>(k) * kNmels + j] = static_cast<float>(std::max(0.0, std::min(down, up)));
    }
  }
  return fb;
}

float bf16_round(float x) {
  std::uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if (std::isnan(x)) return x;
  bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

std::size_t n_frames(std::size_t n_samples) { return 1 + std::max(n_samples, kMinSamples) / kHop; }

MelFrontEnd::MelFrontEnd(bool bf16_buffers)
    : window_(hann_periodic(kNfft)), fb_(mel_filterbank()), plan_(std::make_shared<Plan>()) {
  if (bf16_buffers) {
    for (float& w : window_) w = bf16_round(w);
    for (float& f : fb_) f = bf16_round(f);
  }
  window_d_.assign(window_.begin(), window_.end());
  bands_.resize(kNmels);
  for (int j = 0; j < kNmels; ++j) {
    int first = -1, last = -1;
    for (int k = 0; k < kNfreqs; ++k) {
      if (fb_[static_cast<std::size_t>(k) * kNmels + j] != 0.0f) {
        if (first < 0) first = k;
        last = k;
      }
    }
    bands_[j].first_bin = std::max(first, 0);
    for (int k = bands_[j].first_bin; first >= 0 && k <= last; ++k)
      bands_[j].weights.push_back(fb_[static_cast<std::size_t>(k) * kNmels + j]);
  }
}

const MelFrontEnd& MelFrontEnd::get(bool bf16_buffers) {
  // Function-local statics: built on first use, thread-safe since C++11.
  static const MelFrontEnd fp32(false);
  static const MelFrontEnd bf16(true);
  return bf16_buffers ? bf16 : fp32;
}

namespace {

template <typename Fn>
void parallel_for(std::size_t n, int n_threads, Fn fn) {
  unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  std::size_t t = n_threads > 0 ? static_cast<std::size_t>(n_threads) : hw;
  t = std::min(t, std::max<std::size_t>(1, n / 64));  // not worth a thread for fewer frames
  if (t <= 1) {
    fn(0, n);
    return;
  }
  std::vector<std::thread> pool;
  std::vector<std::exception_ptr> errors(t);
  const std::size_t per = (n + t - 1) / t;
  for (std::size_t i = 0; i < t; ++i) {
    const std::size_t b = i * per, e = std::min(n, b + per);
    if (b >= e) break;
    pool.emplace_back([&, i, b, e] {
      try {
        fn(b, e);
      } catch (...) {
        errors[i] = std::current_exception();
      }
    });
  }
  for (auto& th : pool) th.join();
  for (auto& err : errors)
    if (err) std::rethrow_exception(err);
}

}  // namespace

float MelFrontEnd::raw_db_frames(const float* padded, std::size_t n_padded, std::size_t n_out_frames, float* out,
                                 std::size_t out_stride, std::size_t out_offset, int n_threads) const {
  if (n_out_frames == 0) return -std::numeric_limits<float>::infinity();
  if ((n_out_frames - 1) * kHop + kNfft > n_padded)
    throw std::invalid_argument("raw_db_frames: padded signal too short for " + std::to_string(n_out_frames) + " frames");
  if (out_offset + n_out_frames > out_stride) throw std::invalid_argument("raw_db_frames: output too small");
  unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  std::size_t t = n_threads > 0 ? static_cast<std::size_t>(n_threads) : hw;
  std::vector<float> peaks(std::max<std::size_t>(t, 1), -std::numeric_limits<float>::infinity());
  std::atomic<std::size_t> slot{0};
  parallel_for(n_out_frames, n_threads, [&](std::size_t begin, std::size_t end) {
    const std::size_t my = slot.fetch_add(1);
    // pocketfft runs VLEN frames at once in SIMD lanes (GCC/Clang vector types); lanes past the
    // last frame repeat it and are not written.
    using V = pocketfft::detail::vtype_t<double>;
    constexpr std::size_t L = pocketfft::detail::VLEN<double>::val;
    std::vector<V> buf(kNfft);
    double power[kNfreqs];
    float peak = -std::numeric_limits<float>::infinity();
    for (std::size_t f0 = begin; f0 < end; f0 += L) {
      const float* x[L];
      for (std::size_t l = 0; l < L; ++l) x[l] = padded + std::min(f0 + l, end - 1) * kHop;
      for (int i = 0; i < kNfft; ++i) {
        V v;
        for (std::size_t l = 0; l < L; ++l) v[l] = static_cast<double>(x[l][i]);
        buf[i] = v * window_d_[i];
      }
      plan_->rfft.exec(buf.data(), 1.0, true);  // FFTPACK order: r0, r1, i1, ..., r255, i255, r256
      for (std::size_t l = 0; l < L && f0 + l < end; ++l) {
        power[0] = buf[0][l] * buf[0][l];
        for (int k = 1; k < kNfreqs - 1; ++k) power[k] = buf[2 * k - 1][l] * buf[2 * k - 1][l] + buf[2 * k][l] * buf[2 * k][l];
        power[kNfreqs - 1] = buf[kNfft - 1][l] * buf[kNfft - 1][l];
        for (int j = 0; j < kNmels; ++j) {
          const Band& band = bands_[j];
          double acc = 0.0;
          for (std::size_t i = 0; i < band.weights.size(); ++i) acc += power[band.first_bin + i] * band.weights[i];
          const float db = static_cast<float>(10.0 * std::log10(std::max(acc, kLogFloor)));
          out[static_cast<std::size_t>(j) * out_stride + out_offset + f0 + l] = db;
          peak = std::max(peak, db);
        }
      }
    }
    peaks[my % peaks.size()] = std::max(peaks[my % peaks.size()], peak);
  });
  return *std::max_element(peaks.begin(), peaks.end());
}

void apply_top_db(float* db, std::size_t n, float peak) {
  const float floor = static_cast<float>(static_cast<double>(peak) - kTopDb);
  for (std::size_t i = 0; i < n; ++i) db[i] = std::max(db[i], floor);
}

void MelFrontEnd::log_mel(const float* wave, std::size_t n, float* out, int n_threads) const {
  if (n == 0) throw std::invalid_argument("log_mel: the clip is empty (0 samples)");
  std::size_t bad = 0;
  for (std::size_t i = 0; i < n; ++i) bad += !std::isfinite(wave[i]);
  if (bad) throw std::invalid_argument("log_mel: " + std::to_string(bad) + " of " + std::to_string(n) + " samples are NaN or infinite");
  const std::size_t len = std::max(n, kMinSamples);  // zero-padded to 3200 samples
  const std::size_t half = kNfft / 2;
  // Reflect padding (numpy "reflect": the edge sample is not repeated), over the zero-padded clip.
  std::vector<float> padded(len + 2 * half, 0.0f);
  std::copy(wave, wave + n, padded.begin() + half);
  for (std::size_t i = 1; i <= half; ++i) {
    padded[half - i] = padded[half + i];
    padded[half + len - 1 + i] = padded[half + len - 1 - i];
  }
  const std::size_t frames = n_frames(n);
  const float peak = raw_db_frames(padded.data(), padded.size(), frames, out, frames, 0, n_threads);
  apply_top_db(out, frames * kNmels, peak);
}

}  // namespace mdl_edge
