// CUDA kernels of the fused SDE step (contract in csrc/include/dancegrpo/ops.h).
//
// Grid (chunks, B): each block handles kCudaSdeChunk elements of one sample and writes one
// partial sum of (action - mean)^2; a second kernel adds the partials of each sample in a
// fixed order. Rollout and training share the kernel template (kSample only changes where the
// action comes from), so both produce the same partials for the same action.
#include "common.cuh"

namespace dancegrpo {
namespace {

using namespace cuda_detail;

template <typename V, typename X, typename Acc, bool kSample>
__global__ void __launch_bounds__(kThreads) sde_step_kernel(const V* __restrict__ v, const X* __restrict__ x,
                                                           const X* __restrict__ action, X* __restrict__ next,
                                                           const Acc* __restrict__ coef_x,
                                                           const Acc* __restrict__ coef_v,
                                                           const Acc* __restrict__ std, double* __restrict__ partial,
                                                           int64_t numel, int64_t chunks) {
  __shared__ Acc shared[kThreads / 32];
  const int64_t b = blockIdx.y, chunk = blockIdx.x;
  const int64_t start = chunk * kCudaSdeChunk;
  const int64_t stop = start + kCudaSdeChunk < numel ? start + kCudaSdeChunk : numel;
  const Acc cx = coef_x[b], cv = coef_v[b];
  const Acc s = kSample ? std[b] : Acc(0);
  const int64_t base = b * numel;
  Acc acc = 0;
  for (int64_t i = base + start + threadIdx.x; i < base + stop; i += kThreads) {
    const Acc mean = add_rn(mul_rn(cx, widen(x[i])), mul_rn(cv, widen(v[i])));
    Acc taken;
    if constexpr (kSample) {
      const X stored = narrow<X, Acc>(add_rn(mean, mul_rn(s, widen(action[i]))));
      next[i] = stored;
      taken = widen(stored);  // score the action as stored
    } else {
      taken = widen(action[i]);
    }
    const Acc diff = sub_rn(taken, mean);
    acc = fma(diff, diff, acc);
  }
  acc = block_reduce(acc, Sum{}, shared);
  if (threadIdx.x == 0) partial[b * chunks + chunk] = static_cast<double>(acc);
}

__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const double* __restrict__ partial,
                                                               double* __restrict__ sumsq, int64_t chunks) {
  __shared__ double shared[kThreads / 32];
  const int64_t b = blockIdx.x;
  double acc = 0;
  for (int64_t c = threadIdx.x; c < chunks; c += kThreads) acc += partial[b * chunks + c];
  acc = block_reduce(acc, Sum{}, shared);
  if (threadIdx.x == 0) sumsq[b] = acc;
}

template <typename V, typename X, typename Acc>
__global__ void __launch_bounds__(kThreads) sde_step_backward_kernel(const V* __restrict__ v,
                                                                    const X* __restrict__ x,
                                                                    const X* __restrict__ prev, V* __restrict__ grad,
                                                                    const Acc* __restrict__ coef_x,
                                                                    const Acc* __restrict__ coef_v,
                                                                    const Acc* __restrict__ scale, int64_t numel) {
  const int64_t b = blockIdx.y;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kCudaSdeChunk;
  const int64_t stop = start + kCudaSdeChunk < numel ? start + kCudaSdeChunk : numel;
  const Acc cx = coef_x[b], cv = coef_v[b], k = scale[b];
  const int64_t base = b * numel;
  for (int64_t i = base + start + threadIdx.x; i < base + stop; i += kThreads) {
    const Acc mean = add_rn(mul_rn(cx, widen(x[i])), mul_rn(cv, widen(v[i])));
    grad[i] = narrow<V, Acc>(k * sub_rn(widen(prev[i]), mean));
  }
}

enum class Mode { kSample, kSumsq, kBackward };

template <typename V, typename X, typename Acc>
void launch(Mode mode, const SdeStepProblem& p, const void* std_ptr, const void* action, void* out,
            const void* scale, double* sumsq, double* workspace, cudaStream_t stream) {
  if (p.batch == 0) return;
  const int64_t chunks = p.numel == 0 ? 1 : (p.numel + kCudaSdeChunk - 1) / kCudaSdeChunk;
  if (chunks > 2147483647LL || p.batch > 65535) throw std::invalid_argument("fused SDE step: too many samples or elements for the CUDA grid");
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(p.batch));
  const auto* v = static_cast<const V*>(p.model_output);
  const auto* x = static_cast<const X*>(p.sample);
  const auto* cx = static_cast<const Acc*>(p.coef_x);
  const auto* cv = static_cast<const Acc*>(p.coef_v);
  if (mode == Mode::kBackward) {
    sde_step_backward_kernel<V, X, Acc><<<grid, kThreads, 0, stream>>>(
        v, x, static_cast<const X*>(action), static_cast<V*>(out), cx, cv, static_cast<const Acc*>(scale), p.numel);
    check_launch("sde_step_backward_kernel");
    return;
  }
  if (mode == Mode::kSample) {
    sde_step_kernel<V, X, Acc, true><<<grid, kThreads, 0, stream>>>(
        v, x, static_cast<const X*>(action), static_cast<X*>(out), cx, cv, static_cast<const Acc*>(std_ptr),
        workspace, p.numel, chunks);
  } else {
    sde_step_kernel<V, X, Acc, false><<<grid, kThreads, 0, stream>>>(
        v, x, static_cast<const X*>(action), nullptr, cx, cv, nullptr, workspace, p.numel, chunks);
  }
  check_launch("sde_step_kernel");
  sum_partials_kernel<<<static_cast<unsigned>(p.batch), kThreads, 0, stream>>>(workspace, sumsq, chunks);
  check_launch("sum_partials_kernel");
}

void dispatch(Mode mode, const SdeStepProblem& p, const void* std_ptr, const void* action, void* out,
              const void* scale, double* sumsq, double* workspace, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const DType lt = p.latent_dtype, ot = p.output_dtype;
#define DANCEGRPO_LAUNCH(V, X, ACC) return launch<V, X, ACC>(mode, p, std_ptr, action, out, scale, sumsq, workspace, stream)
  if (lt == DType::kFloat32 && ot == DType::kFloat32) DANCEGRPO_LAUNCH(float, float, float);
  if (lt == DType::kFloat64 && ot == DType::kFloat64) DANCEGRPO_LAUNCH(double, double, double);
  if (lt == DType::kBFloat16 && ot == DType::kBFloat16) DANCEGRPO_LAUNCH(__nv_bfloat16, __nv_bfloat16, float);
  if (lt == DType::kFloat16 && ot == DType::kFloat16) DANCEGRPO_LAUNCH(__half, __half, float);
  if (lt == DType::kFloat32 && ot == DType::kBFloat16) DANCEGRPO_LAUNCH(__nv_bfloat16, float, float);
  if (lt == DType::kFloat32 && ot == DType::kFloat16) DANCEGRPO_LAUNCH(__half, float, float);
#undef DANCEGRPO_LAUNCH
  throw std::invalid_argument("fused SDE step: unsupported dtype combination; use one dtype for all, or a "
                              "bfloat16/float16 model output with float32 latents");
}

}  // namespace

void sde_step_sample_cuda(const SdeStepProblem& p, const void* std, const void* noise, void* next, double* sumsq,
                          double* workspace, void* stream) {
  dispatch(Mode::kSample, p, std, noise, next, nullptr, sumsq, workspace, stream);
}

void sde_step_sumsq_cuda(const SdeStepProblem& p, const void* prev, double* sumsq, double* workspace, void* stream) {
  dispatch(Mode::kSumsq, p, nullptr, prev, nullptr, nullptr, sumsq, workspace, stream);
}

void sde_step_backward_cuda(const SdeStepProblem& p, const void* prev, const void* grad_scale, void* grad_v,
                            void* stream) {
  dispatch(Mode::kBackward, p, nullptr, prev, grad_v, grad_scale, nullptr, nullptr, stream);
}

}  // namespace dancegrpo
