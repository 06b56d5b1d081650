// Plain C++ core of the MiDashengLM log-mel front ends (no Python in here).
//
// Semantic mel (spec §1, every Dasheng encoder): reflect centre padding of 256 samples, periodic
// Hann window of 512, hop 160, |rfft|^2 (257 bins), 64-band HTK mel filterbank 0-8000 Hz without
// area normalisation, 10*log10(max(x, 1e-10)), then per-clip top_db 120.
// Acoustic mel (spec §6.4, DashengTokenizer-style encoders): the same with n_fft = window = 1024
// (reflect padding 512), |rfft| (magnitude, 513 bins), n_mels HTK bands, ln(max(x, 1e-7)), no
// top_db. Both have 1 + L / 160 frames centred on the same samples.
// Clips shorter than 3200 samples are zero-padded to 3200 first. Window and filterbank are
// float32 values (optionally rounded to bfloat16); all arithmetic is double, the result float32.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace mdl_edge {

constexpr int kSampleRate = 16000;
constexpr int kNfft = 512;
constexpr int kHop = 160;
constexpr int kNfreqs = kNfft / 2 + 1;
constexpr int kNmels = 64;
constexpr std::size_t kMinSamples = 3200;
constexpr double kLogFloor = 1e-10;
constexpr double kTopDb = 120.0;
constexpr int kAcousticNfft = 1024;
constexpr double kAcousticLogFloor = 1e-7;
constexpr int kMaxAcousticMels = 512;

// Periodic Hann window, w[n] = 0.5 - 0.5 cos(2 pi n / N), computed in double and rounded once.
// Throws std::invalid_argument for length 0.
std::vector<float> hann_periodic(std::size_t length);

// HTK mel filterbank [n_freqs * n_mels] (row-major: bin, band), 0-8000 Hz, as float32 values.
std::vector<float> mel_filterbank(int n_freqs = kNfreqs, int n_mels = kNmels);

// Round to the nearest bfloat16 (ties to even), returned as float.
float bf16_round(float x);

// Frames of a clip of n samples (after padding to kMinSamples): 1 + n / 160.
std::size_t n_frames(std::size_t n_samples);

// The window, filterbank and FFT plan of one front end, built once per setting and shared
// (thread-safe). acoustic_mels == 0 selects the semantic mel, n > 0 the n-band acoustic mel.
class MelFrontEnd {
 public:
  // Throws std::invalid_argument for acoustic_mels outside [0, kMaxAcousticMels].
  static const MelFrontEnd& get(int acoustic_mels, bool bf16_buffers);

  // Log-mel of a whole clip: out is [n_mels, n_frames(max(n, 3200))], row-major; top_db applied
  // to the semantic mel. Throws std::invalid_argument for n == 0 or non-finite samples.
  void log_mel(const float* wave, std::size_t n, float* out, int n_threads) const;

  // Log values (no top_db) of frames [0, n_out_frames) of a signal already reflect-padded by
  // n_fft / 2: frame f covers padded[f * 160, f * 160 + n_fft). out is [n_mels, out_stride]
  // row-major and frame f goes to column out_offset + f. Returns the maximum value written.
  // For blockwise long audio.
  float raw_db_frames(const float* padded, std::size_t n_padded, std::size_t n_out_frames, float* out,
                      std::size_t out_stride, std::size_t out_offset, int n_threads) const;

  const std::vector<float>& window() const { return window_; }
  const std::vector<float>& filterbank() const { return fb_; }
  int n_fft() const { return n_fft_; }
  int n_mels() const { return n_mels_; }
  bool acoustic() const { return acoustic_; }

  // The reflect-padded signal frame by frame without copying the body: frames near the ends
  // come from small edge buffers.
  struct FrameView {
    const float* body;  // frame f starts at body + f * kHop - half (interior frames)
    const float* head;
    std::size_t head_frames;
    const float* tail;
    std::size_t tail_start;
    std::size_t half;
    const float* at(std::size_t f) const {
      if (f < head_frames) return head + f * kHop;
      if (f >= tail_start) return tail + (f - tail_start) * kHop;
      return body + f * kHop - half;
    }
  };

 private:
  MelFrontEnd(int acoustic_mels, bool bf16_buffers);
  bool acoustic_;
  int n_fft_, n_freqs_, n_mels_;
  struct Band {
    int first_bin;
    std::vector<double> weights;
  };
  std::vector<float> window_;
  std::vector<float> fb_;
  std::vector<double> window_d_;
  std::vector<Band> bands_;  // non-zero run of each mel band, for a sparse matmul
  struct Plan;
  std::shared_ptr<Plan> plan_;
  // Frames [0, n_frames) into out (column out_offset + f); counts non-finite samples of
  // check[0, n_check) on the way. Returns the maximum dB.
  float compute(const FrameView& view, std::size_t n_frames, float* out, std::size_t out_stride, std::size_t out_offset,
                int n_threads, const float* check, std::size_t n_check, std::size_t* n_bad) const;
};

// top_db over a [64, n_frames] matrix in place: x = max(x, max(x) - 120).
void apply_top_db(float* db, std::size_t n, float peak);

}  // namespace mdl_edge
