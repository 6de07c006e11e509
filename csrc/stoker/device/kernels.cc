#include "stoker/device/kernels.h"

#include <array>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>

#include "stoker/common/check.h"
#include "stoker/cuda/driver.h"

#if STOKER_HAVE_KERNELS
// Generated at build time from the fatbin nvcc makes of device/normalize.cu (cmake/embed.cmake).
extern "C" const unsigned char stoker_normalize_fatbin[];
#endif

namespace stoker::device {
namespace {

// The kernel's argument block; must match Params in normalize.cu.
struct Params {
  float mean[kMaxNormalizeChannels];
  float std[kMaxNormalizeChannels];
  float scale;
  int channels;
  int channels_last;
  long long plane;
  long long total;
};

constexpr std::array<const char*, 3> kNormalizeNames = {"stoker_normalize_f32", "stoker_normalize_f16",
                                                        "stoker_normalize_bf16"};

struct Loaded {
  std::array<cuda::CUfunction, 3> normalize{};
};

// One module per device's primary context, loaded at first use and kept for the process (as the context's
// retain is: unloading during interpreter exit would race the driver's teardown). A device whose module failed
// to load keeps its error: it is raised again, not loaded again.
Loaded& loaded(int device) {
  static std::mutex mutex;
  static std::map<int, Loaded> modules;
  static std::map<int, std::string> failed;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = modules.find(device);
  if (found != modules.end()) return found->second;
  auto failure = failed.find(device);
  if (failure != failed.end()) throw std::runtime_error(failure->second);
#if STOKER_HAVE_KERNELS
  try {
    const cuda::Api& api = cuda::api();
    auto ctx = cuda::primary_context(device);
    cuda::ScopedContext scope(*ctx);
    cuda::CUmodule module = nullptr;
    cuda::check(api.cuModuleLoadData(&module, stoker_normalize_fatbin), "cuModuleLoadData",
                "stoker's kernels (built for " STOKER_KERNEL_ARCHS ")");
    Loaded entry;
    for (size_t i = 0; i < kNormalizeNames.size(); ++i)
      cuda::check(api.cuModuleGetFunction(&entry.normalize[i], module, kNormalizeNames[i]),
                  "cuModuleGetFunction", kNormalizeNames[i]);
    return modules.emplace(device, entry).first->second;
  } catch (const std::exception& e) {
    failed.emplace(device, e.what());
    throw;
  }
#else
  (void)device;
  throw std::runtime_error(kernels_reason());
#endif
}

}  // namespace

std::string kernels_reason() {
#if STOKER_HAVE_KERNELS
  if (!cuda::available()) return "CUDA is not available: " + cuda::status().reason;
  const cuda::Api& api = cuda::api();
  if (!api.cuModuleLoadData || !api.cuModuleGetFunction || !api.cuLaunchKernel)
    return "the CUDA driver does not provide cuModuleLoadData, cuModuleGetFunction and cuLaunchKernel";
  // Code made by one major version of the toolkit loads on drivers of that major version or later only.
  const int driver = cuda::status().driver_version;
  if (driver / 1000 < STOKER_KERNEL_CUDA_VERSION / 1000)
    return detail::concat("the kernels were built with CUDA ", STOKER_KERNEL_CUDA_VERSION / 1000, ".",
                          STOKER_KERNEL_CUDA_VERSION % 1000 / 10, ", and this driver supports CUDA ", driver / 1000,
                          ".", driver % 1000 / 10, " only: update the driver, or build with an older toolkit");
  return "";
#else
  return "this build of stoker has no CUDA kernels (build it with -DSTOKER_CUDA=ON and nvcc to embed them)";
#endif
}

bool kernels_available() {
  try {
    return kernels_reason().empty();
  } catch (...) {
    return false;
  }
}

void normalize_u8(int device, uintptr_t stream, uintptr_t in, uintptr_t out, int64_t images, int64_t channels,
                  int64_t height, int64_t width, bool channels_last, const std::vector<float>& mean,
                  const std::vector<float>& std, float scale, FloatType type) {
  STOKER_CHECK_AS(ValueError, images >= 0 && height >= 0 && width >= 0, "normalize: negative image dimensions");
  STOKER_CHECK_AS(ValueError, channels >= 1 && channels <= kMaxNormalizeChannels, "normalize: ", channels,
                  " channels; the kernel takes 1 to ", kMaxNormalizeChannels);
  for (const auto* values : {&mean, &std})
    STOKER_CHECK_AS(ValueError, values->size() == 1 || static_cast<int64_t>(values->size()) == channels,
                    "normalize: ", values->size(), " per-channel values for ", channels, " channels");
  const std::string why = kernels_reason();
  if (!why.empty()) throw std::runtime_error("stoker's CUDA kernels are not available: " + why);
  Params p{};
  for (int c = 0; c < channels; ++c) {
    p.mean[c] = mean.size() == 1 ? mean[0] : mean[c];
    p.std[c] = std.size() == 1 ? std[0] : std[c];
    STOKER_CHECK_AS(ValueError, p.std[c] != 0.0f, "normalize: std must not contain 0");
  }
  p.scale = scale;
  p.channels = static_cast<int>(channels);
  p.channels_last = channels_last ? 1 : 0;
  p.plane = height * width;
  p.total = images * channels * p.plane;
  if (p.total == 0) return;
  STOKER_CHECK_AS(ValueError, in != 0 && out != 0, "normalize: null device pointer");
  Loaded& kernels = loaded(device);
  const cuda::Api& api = cuda::api();
  auto ctx = cuda::primary_context(device);
  cuda::ScopedContext scope(*ctx);
  constexpr unsigned kThreads = 256;
  const long long wanted = (p.total + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(wanted < 4096 ? wanted : 4096);  // grid-stride beyond
  const void* in_ptr = reinterpret_cast<const void*>(in);
  void* out_ptr = reinterpret_cast<void*>(out);
  void* args[] = {&in_ptr, &out_ptr, &p};
  cuda::check(api.cuLaunchKernel(kernels.normalize[static_cast<int>(type)], blocks, 1, 1, kThreads, 1, 1, 0,
                                 reinterpret_cast<cuda::CUstream>(stream), args, nullptr),
              "cuLaunchKernel", kNormalizeNames[static_cast<int>(type)]);
}

}  // namespace stoker::device
