// stoker's CUDA kernels, launched through the driver API. They exist only in a build with the STOKER_CUDA option
// (nvcc compiles device/normalize.cu into a fatbin that the module embeds); elsewhere kernels_available() is
// false and Python falls back to torch ops on the device, which give the same values.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace stoker::device {

/// Output types of normalize_u8.
enum class FloatType { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

/// The most channels normalize_u8 takes (per-channel constants travel as kernel arguments).
constexpr int kMaxNormalizeChannels = 8;

/// True when this build embeds the kernels (STOKER_CUDA) and the driver provides the module and launch entry
/// points. Never throws.
bool kernels_available();
/// Why kernels_available() is false ("" when it is true).
std::string kernels_reason();

/// Queues on `stream` (a CUstream handle, e.g. torch's current stream) of device `device`:
///   out[n, c, h, w] = (in[...] * scale - mean[c]) / std[c], each step rounded to nearest in float32, then
/// rounded to `type`. `in` is [N, C, H, W] uint8, or [N, H, W, C] when channels_last; `out` is [N, C, H, W].
/// Both are contiguous device pointers. `mean`/`std` hold 1 or `channels` values. Throws ValueError for bad
/// arguments, CudaError when the driver fails, RuntimeError when kernels are not available.
void normalize_u8(int device, uintptr_t stream, uintptr_t in, uintptr_t out, int64_t images, int64_t channels,
                  int64_t height, int64_t width, bool channels_last, const std::vector<float>& mean,
                  const std::vector<float>& std, float scale, FloatType type);

}  // namespace stoker::device
