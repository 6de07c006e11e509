// The normalise kernel: uint8 images to float32/float16/bfloat16, (x * scale - mean[c]) / std[c] per channel,
// optionally from [N, H, W, C] to [N, C, H, W]. Compiled by nvcc only with the STOKER_CUDA build option, into a
// fatbin that the module embeds and loads through the driver API (cuModuleLoadData); it needs no CUDA runtime.
//
// Each step is rounded to nearest on its own (no fused multiply-add), so the values equal torch's eager ops
// (stoker.normalize's fallback) bit for bit: multiply, subtract, divide in float32, then one rounding to the
// output type.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

constexpr int kMaxChannels = 8;

struct Params {
  float mean[kMaxChannels];
  float std[kMaxChannels];
  float scale;
  int channels;
  int channels_last;  // input [N, H, W, C] when nonzero, else [N, C, H, W]; the output is always [N, C, H, W]
  long long plane;    // H * W
  long long total;    // N * C * H * W
};

__device__ __forceinline__ float normalised(uint8_t v, const Params& p, int c) {
  float x = __fmul_rn(static_cast<float>(v), p.scale);
  x = __fsub_rn(x, p.mean[c]);
  return __fdiv_rn(x, p.std[c]);
}

// Index: 32-bit arithmetic when the batch has fewer than 2^32 elements (64-bit division is slow on the GPU).
template <typename Index, typename Out, typename Convert>
__device__ void run(const uint8_t* __restrict__ in, Out* __restrict__ out, const Params& p, Convert convert) {
  const Index total = static_cast<Index>(p.total), plane = static_cast<Index>(p.plane);
  const Index channels = static_cast<Index>(p.channels);
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index o = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; o < total; o += stride) {
    // o indexes the output [N, C, H, W].
    const Index pixel = o % plane;
    const Index nc = o / plane;
    const Index c = nc % channels;
    const Index i = p.channels_last ? ((nc / channels) * plane + pixel) * channels + c : o;
    out[o] = convert(normalised(in[i], p, static_cast<int>(c)));
  }
}

template <typename Out, typename Convert>
__device__ void dispatch(const uint8_t* in, Out* out, const Params& p, Convert convert) {
  if (p.total < (1LL << 32) - (1LL << 26))  // room for the last stride step without wrapping
    run<unsigned>(in, out, p, convert);
  else
    run<unsigned long long>(in, out, p, convert);
}

}  // namespace

extern "C" __global__ void stoker_normalize_f32(const uint8_t* in, float* out, Params p) {
  dispatch(in, out, p, [](float x) { return x; });
}

extern "C" __global__ void stoker_normalize_f16(const uint8_t* in, __half* out, Params p) {
  dispatch(in, out, p, [](float x) { return __float2half_rn(x); });
}

extern "C" __global__ void stoker_normalize_bf16(const uint8_t* in, __nv_bfloat16* out, Params p) {
  dispatch(in, out, p, [](float x) { return __float2bfloat16_rn(x); });
}
