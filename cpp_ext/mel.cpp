#include "mel.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>

#define POCKETFFT_NO_MULTITHREADING  // we parallelise over frames ourselves
#include "third_party/pocketfft/pocketfft_hdronly.h"

namespace mdl_edge {

struct MelFrontEnd::Plan {
  explicit Plan(int n) : rfft(static_cast<std::size_t>(n)) {}
  pocketfft::detail::pocketfft_r<double> rfft;
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

std::vector<float> mel_filterbank(int n_freqs, int n_mels) {
  if (n_freqs < 2 || n_mels < 1) throw std::invalid_argument("mel_filterbank: need at least 2 bins and 1 band");
  const std::vector<double> freqs = linspace(0.0, kSampleRate / 2.0, n_freqs);
  std::vector<double> f_pts = linspace(hz_to_mel(0.0), hz_to_mel(kSampleRate / 2.0), n_mels + 2);
  for (double& m : f_pts) m = 700.0 * (std::pow(10.0, m / 2595.0) - 1.0);
  std::vector<float> fb(static_cast<std::size_t>(n_freqs) * n_mels);
  for (int k = 0; k < n_freqs; ++k) {
    for (int j = 0; j < n_mels; ++j) {
      const double down = -(f_pts[j] - freqs[k]) / (f_pts[j + 1] - f_pts[j]);
      const double up = (f_pts[j + 2] - freqs[k]) / (f_pts[j + 2] - f_pts[j + 1]);
      fb[static_cast<std::size_t>(k) * n_mels + j] = static_cast<float>(std::max(0.0, std::min(down, up)));
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

MelFrontEnd::MelFrontEnd(int acoustic_mels, bool bf16_buffers)
    : acoustic_(acoustic_mels > 0),
      n_fft_(acoustic_ ? kAcousticNfft : kNfft),
      n_freqs_(n_fft_ / 2 + 1),
      n_mels_(acoustic_ ? acoustic_mels : kNmels),
      window_(hann_periodic(n_fft_)),
      fb_(mel_filterbank(n_freqs_, n_mels_)),
      plan_(std::make_shared<Plan>(n_fft_)) {
  if (bf16_buffers) {
    for (float& w : window_) w = bf16_round(w);
    for (float& f : fb_) f = bf16_round(f);
  }
  window_d_.assign(window_.begin(), window_.end());
  bands_.resize(n_mels_);
  for (int j = 0; j < n_mels_; ++j) {
    int first = -1, last = -1;
    for (int k = 0; k < n_freqs_; ++k) {
      if (fb_[static_cast<std::size_t>(k) * n_mels_ + j] != 0.0f) {
        if (first < 0) first = k;
        last = k;
      }
    }
    bands_[j].first_bin = std::max(first, 0);
    for (int k = bands_[j].first_bin; first >= 0 && k <= last; ++k)
      bands_[j].weights.push_back(fb_[static_cast<std::size_t>(k) * n_mels_ + j]);
  }
}

const MelFrontEnd& MelFrontEnd::get(int acoustic_mels, bool bf16_buffers) {
  if (acoustic_mels < 0 || acoustic_mels > kMaxAcousticMels)
    throw std::invalid_argument("acoustic_mels must be in [0, " + std::to_string(kMaxAcousticMels) + "], got " +
                                std::to_string(acoustic_mels));
  // Built on first use and kept for the life of the process (a handful of settings exist).
  static std::mutex lock;
  static std::map<std::pair<int, bool>, std::unique_ptr<MelFrontEnd>> cache;
  std::lock_guard<std::mutex> guard(lock);
  auto& slot = cache[{acoustic_mels, bf16_buffers}];
  if (!slot) slot.reset(new MelFrontEnd(acoustic_mels, bf16_buffers));
  return *slot;
}

namespace {

// ln of a positive, finite, normal double to ~1e-15 relative: exponent from the bits, and
// ln(m) = 2 atanh((m - 1) / (m + 1)) by its series for m in [sqrt(1/2), sqrt(2)). Branch-free so
// that loops over it vectorise; std::log10 is a libm call per value and dominated the profile.
inline double ln_positive(double x) {
  std::uint64_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  std::int64_t e = static_cast<std::int64_t>((bits >> 52) & 0x7FF) - 1023;
  bits = (bits & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull;  // m in [1, 2)
  double m;
  std::memcpy(&m, &bits, sizeof m);
  const bool big = m > 1.4142135623730951;
  m = big ? m * 0.5 : m;
  e += big ? 1 : 0;
  const double s = (m - 1.0) / (m + 1.0), s2 = s * s;
  // |s| <= 0.1716, s^2 <= 0.0295: terms through s^17 leave < 1e-16 relative error
  double p = 1.0 / 17;
  p = p * s2 + 1.0 / 15;
  p = p * s2 + 1.0 / 13;
  p = p * s2 + 1.0 / 11;
  p = p * s2 + 1.0 / 9;
  p = p * s2 + 1.0 / 7;
  p = p * s2 + 1.0 / 5;
  p = p * s2 + 1.0 / 3;
  p = p * s2 + 1.0;
  const double ln_m = 2.0 * s * p;
  return static_cast<double>(e) * 0.6931471805599453 + ln_m;
}

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
  if ((n_out_frames - 1) * kHop + n_fft_ > n_padded)
    throw std::invalid_argument("raw_db_frames: padded signal too short for " + std::to_string(n_out_frames) + " frames");
  if (out_offset + n_out_frames > out_stride) throw std::invalid_argument("raw_db_frames: output too small");
  const std::size_t half = n_fft_ / 2;
  const FrameView view{padded + half, padded, 0, padded, n_out_frames + 1, half};  // all frames interior
  std::size_t bad = 0;
  return compute(view, n_out_frames, out, out_stride, out_offset, n_threads, nullptr, 0, &bad);
}

float MelFrontEnd::compute(const FrameView& view, std::size_t n_out_frames, float* out, std::size_t out_stride,
                           std::size_t out_offset, int n_threads, const float* check, std::size_t n_check,
                           std::size_t* n_bad) const {
  unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  std::size_t t = n_threads > 0 ? static_cast<std::size_t>(n_threads) : hw;
  std::vector<float> peaks(std::max<std::size_t>(t, 1), -std::numeric_limits<float>::infinity());
  std::vector<std::size_t> bads(peaks.size(), 0);
  std::atomic<std::size_t> slot{0};
  parallel_for(n_out_frames, n_threads, [&](std::size_t begin, std::size_t end) {
    const std::size_t my = slot.fetch_add(1) % peaks.size();
    // each worker checks the samples its frames advance over; the last one checks to the end
    const std::size_t c0 = std::min(n_check, begin * kHop), c1 = end == n_out_frames ? n_check : std::min(n_check, end * kHop);
    std::size_t bad = 0;
    for (std::size_t i = c0; i < c1; ++i) bad += !std::isfinite(check[i]);
    bads[my] += bad;
    // pocketfft transforms VLEN frames at once, one per SIMD lane (GCC/Clang vector types);
    // power and mel bands are computed on whole vectors too. Lanes past the last frame repeat
    // it and are not written.
    using V = pocketfft::detail::vtype_t<double>;
    constexpr std::size_t L = pocketfft::detail::VLEN<double>::val;
    const std::size_t M = n_mels_;
    std::vector<V> buf(n_fft_), power(n_freqs_);
    std::vector<double> mel(M * L);
    float peak = -std::numeric_limits<float>::infinity();
    for (std::size_t f0 = begin; f0 < end; f0 += L) {
      const float* x[L];
      for (std::size_t l = 0; l < L; ++l) x[l] = view.at(std::min(f0 + l, end - 1));
      for (int i = 0; i < n_fft_; ++i) {
        V v;
        for (std::size_t l = 0; l < L; ++l) v[l] = static_cast<double>(x[l][i]);
        buf[i] = v * window_d_[i];
      }
      plan_->rfft.exec(buf.data(), 1.0, true);  // FFTPACK order: r0, r1, i1, ..., r(n/2-1), i(n/2-1), r(n/2)
      power[0] = buf[0] * buf[0];
      for (int k = 1; k < n_freqs_ - 1; ++k) power[k] = buf[2 * k - 1] * buf[2 * k - 1] + buf[2 * k] * buf[2 * k];
      power[n_freqs_ - 1] = buf[n_fft_ - 1] * buf[n_fft_ - 1];
      if (acoustic_)  // magnitude spectrum
        for (int k = 0; k < n_freqs_; ++k)
          for (std::size_t l = 0; l < L; ++l) power[k][l] = std::sqrt(power[k][l]);
      for (std::size_t j = 0; j < M; ++j) {
        const Band& band = bands_[j];
        V acc = power[0] * 0.0;
        for (std::size_t i = 0; i < band.weights.size(); ++i) acc += power[band.first_bin + i] * band.weights[i];
        for (std::size_t l = 0; l < L; ++l) mel[l * M + j] = acc[l];
      }
      if (acoustic_)
        for (std::size_t i = 0; i < M * L; ++i) mel[i] = ln_positive(std::max(mel[i], kAcousticLogFloor));
      else
        for (std::size_t i = 0; i < M * L; ++i) mel[i] = 10.0 * (ln_positive(std::max(mel[i], kLogFloor)) * 0.4342944819032518);
      for (std::size_t l = 0; l < L && f0 + l < end; ++l) {
        for (std::size_t j = 0; j < M; ++j) {
          const float db = static_cast<float>(mel[l * M + j]);
          out[static_cast<std::size_t>(j) * out_stride + out_offset + f0 + l] = db;
          peak = std::max(peak, db);
        }
      }
    }
    peaks[my] = std::max(peaks[my], peak);
  });
  for (std::size_t b : bads) *n_bad += b;
  return *std::max_element(peaks.begin(), peaks.end());
}

void apply_top_db(float* db, std::size_t n, float peak) {
  const float floor = static_cast<float>(static_cast<double>(peak) - kTopDb);
  for (std::size_t i = 0; i < n; ++i) db[i] = std::max(db[i], floor);
}

void MelFrontEnd::log_mel(const float* wave, std::size_t n, float* out, int n_threads) const {
  if (n == 0) throw std::invalid_argument("log_mel: the clip is empty (0 samples)");
  const std::size_t len = std::max(n, kMinSamples);  // zero-padded to 3200 samples
  const std::size_t frames = n_frames(n);
  const long half = n_fft_ / 2;
  // Sample p of the padded signal: reflection about both ends (numpy "reflect": the edge sample
  // is not repeated) of the clip zero-padded to len.
  auto sample = [&](long p) -> float {
    long i = p - half;
    if (i < 0) i = -i;
    if (i >= static_cast<long>(len)) i = 2 * (static_cast<long>(len) - 1) - i;
    return static_cast<std::size_t>(i) < n ? wave[i] : 0.0f;
  };
  // Interior frames read the clip in place; frames whose window reaches past either end of the
  // clip read from copies of the edges.
  const std::size_t head_frames = std::min(frames, static_cast<std::size_t>((half + kHop - 1) / kHop));
  std::size_t tail_start = frames;
  while (tail_start > head_frames && (tail_start - 1) * kHop + half > n) --tail_start;
  std::vector<float> head((head_frames ? head_frames - 1 : 0) * kHop + n_fft_), tail((frames - tail_start) * kHop + n_fft_);
  for (std::size_t p = 0; p < head.size(); ++p) head[p] = sample(static_cast<long>(p));
  for (std::size_t p = 0; p < tail.size(); ++p) tail[p] = sample(static_cast<long>(tail_start * kHop + p));
  const FrameView view{wave, head.data(), head_frames, tail.data(), tail_start, static_cast<std::size_t>(half)};
  std::size_t bad = 0;
  const float peak = compute(view, frames, out, frames, 0, n_threads, wave, n, &bad);
  if (bad) throw std::invalid_argument("log_mel: " + std::to_string(bad) + " of " + std::to_string(n) + " samples are NaN or infinite");
  if (!acoustic_) apply_top_db(out, frames * kNmels, peak);
}

}  // namespace mdl_edge
