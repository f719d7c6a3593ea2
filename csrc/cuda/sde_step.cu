// CUDA kernels of the fused SDE step (contract in csrc/include/dancegrpo/ops.h).
//
// Grid (chunks, B), so the grid fills the GPU whatever the batch: each block handles
// kCudaSdeChunk elements of one sample and writes one partial sum of (action - mean)^2; the
// last block of each sample to finish adds that sample's partials in a fixed order and writes
// its log-prob. One launch per call (after a memset of the B counters). Rollout and training
// share the kernel template (kSample only changes where the action comes from), so both
// produce the same partials for the same action.
#include "common.cuh"

namespace dancegrpo {
namespace {

using namespace cuda_detail;

// The table row of sample b; a row outside the table is a caller bug (a step index outside
// the sampler's steps): stop the kernel with a device-side trap rather than read past it.
__device__ __forceinline__ const double* coef_row(const double* __restrict__ coefs, const int64_t* __restrict__ index,
                                                  int64_t rows, int64_t b) {
  const int64_t row = index != nullptr ? index[b] : (rows == 1 ? 0 : b);
  if (row < 0 || row >= rows) {
    printf("dancegrpo fused SDE step: sample %lld asks for coefficient row %lld of %lld\n", static_cast<long long>(b),
           static_cast<long long>(row), static_cast<long long>(rows));
    __trap();
  }
  return coefs + row * kSdeCoefs;
}

template <typename V, typename X, typename Acc, bool kSample>
__global__ void __launch_bounds__(kThreads) sde_step_kernel(const V* __restrict__ v, const X* __restrict__ x,
                                                           const X* __restrict__ action, X* __restrict__ next,
                                                           const double* __restrict__ coefs,
                                                           const int64_t* __restrict__ index, int64_t rows,
                                                           Acc* __restrict__ log_prob, double* __restrict__ partial,
                                                           unsigned* __restrict__ count, int64_t numel,
                                                           int64_t chunks) {
  __shared__ Acc shared[kThreads / 32];
  __shared__ double shared_total[kThreads / 32];
  __shared__ bool is_last;
  const int64_t b = blockIdx.y, chunk = blockIdx.x;
  const int64_t start = chunk * kCudaSdeChunk;
  const int64_t stop = start + kCudaSdeChunk < numel ? start + kCudaSdeChunk : numel;
  const double* c = coef_row(coefs, index, rows, b);
  const Acc cx = static_cast<Acc>(c[0]), cv = static_cast<Acc>(c[1]);
  const Acc s = kSample ? static_cast<Acc>(c[2]) : Acc(0);
  const int64_t base = b * numel;
  Acc acc = 0;
#pragma unroll 4
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
  // The last block of sample b to finish adds the sample's partials in a fixed order (so the
  // result does not depend on which block that is) and writes its log-prob.
  if (threadIdx.x == 0) {
    partial[b * chunks + chunk] = static_cast<double>(acc);
    __threadfence();  // the partial is visible to every block before the count says so
    is_last = atomicAdd(count + b, 1u) == static_cast<unsigned>(chunks - 1);
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  double total = 0;
  for (int64_t k = threadIdx.x; k < chunks; k += kThreads) total += __ldcg(partial + b * chunks + k);
  total = block_reduce(total, Sum{}, shared_total);
  if (threadIdx.x == 0) {
    const double sd = c[2];
    log_prob[b] = static_cast<Acc>(
        __dsub_rn(__dsub_rn(__ddiv_rn(-__ddiv_rn(total, static_cast<double>(numel)), __dmul_rn(__dmul_rn(2.0, sd), sd)),
                            c[3]),
                  kHalfLogTwoPi));
  }
}

template <typename V, typename X, typename Acc>
__global__ void __launch_bounds__(kThreads) sde_step_backward_kernel(const V* __restrict__ v,
                                                                    const X* __restrict__ x,
                                                                    const X* __restrict__ prev, V* __restrict__ grad,
                                                                    const double* __restrict__ coefs,
                                                                    const int64_t* __restrict__ index, int64_t rows,
                                                                    const Acc* __restrict__ grad_log_prob,
                                                                    int64_t numel) {
  const int64_t b = blockIdx.y;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kCudaSdeChunk;
  const int64_t stop = start + kCudaSdeChunk < numel ? start + kCudaSdeChunk : numel;
  const double* c = coef_row(coefs, index, rows, b);
  const Acc cx = static_cast<Acc>(c[0]), cv = static_cast<Acc>(c[1]);
  // d logp_b / d v = coef_v_b (prev - mean) / (std_b^2 numel): the factor in double, rounded once.
  const double sd = c[2];
  const Acc k = static_cast<Acc>(__ddiv_rn(__dmul_rn(static_cast<double>(grad_log_prob[b]), c[1]),
                                           __dmul_rn(__dmul_rn(sd, sd), static_cast<double>(numel))));
  const int64_t base = b * numel;
#pragma unroll 4
  for (int64_t i = base + start + threadIdx.x; i < base + stop; i += kThreads) {
    const Acc mean = add_rn(mul_rn(cx, widen(x[i])), mul_rn(cv, widen(v[i])));
    grad[i] = narrow<V, Acc>(k * sub_rn(widen(prev[i]), mean));
  }
}

enum class Mode { kSample, kLogProb, kBackward };

template <typename V, typename X, typename Acc>
void launch(Mode mode, const SdeStepProblem& p, const void* action, void* out, const void* grad_log_prob,
            void* log_prob, void* workspace, cudaStream_t stream) {
  if (p.batch == 0) return;
  const int64_t chunks = sde_cuda_chunks(p.numel);
  if (chunks > 2147483647LL || p.batch > 65535) throw std::invalid_argument("fused SDE step: too many samples or elements for the CUDA grid");
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(p.batch));
  const auto* v = static_cast<const V*>(p.model_output);
  const auto* x = static_cast<const X*>(p.sample);
  if (mode == Mode::kBackward) {
    sde_step_backward_kernel<V, X, Acc><<<grid, kThreads, 0, stream>>>(
        v, x, static_cast<const X*>(action), static_cast<V*>(out), p.coefs, p.index, p.rows,
        static_cast<const Acc*>(grad_log_prob), p.numel);
    check_launch("sde_step_backward_kernel");
    return;
  }
  auto* partial = static_cast<double*>(workspace);
  auto* count = reinterpret_cast<unsigned*>(partial + p.batch * chunks);
  check_cuda(cudaMemsetAsync(count, 0, static_cast<size_t>(p.batch) * sizeof(unsigned), stream), "cudaMemsetAsync");
  auto* logp = static_cast<Acc*>(log_prob);
  if (mode == Mode::kSample) {
    sde_step_kernel<V, X, Acc, true><<<grid, kThreads, 0, stream>>>(
        v, x, static_cast<const X*>(action), static_cast<X*>(out), p.coefs, p.index, p.rows, logp, partial, count,
        p.numel, chunks);
  } else {
    sde_step_kernel<V, X, Acc, false><<<grid, kThreads, 0, stream>>>(
        v, x, static_cast<const X*>(action), nullptr, p.coefs, p.index, p.rows, logp, partial, count, p.numel, chunks);
  }
  check_launch("sde_step_kernel");
}

void dispatch(Mode mode, const SdeStepProblem& p, const void* action, void* out, const void* grad_log_prob,
              void* log_prob, void* workspace, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const DType lt = p.latent_dtype, ot = p.output_dtype;
#define DANCEGRPO_LAUNCH(V, X, ACC) return launch<V, X, ACC>(mode, p, action, out, grad_log_prob, log_prob, workspace, stream)
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

void sde_step_sample_cuda(const SdeStepProblem& p, const void* noise, void* next, void* log_prob, void* workspace,
                          void* stream) {
  dispatch(Mode::kSample, p, noise, next, nullptr, log_prob, workspace, stream);
}

void sde_step_log_prob_cuda(const SdeStepProblem& p, const void* prev, void* log_prob, void* workspace,
                            void* stream) {
  dispatch(Mode::kLogProb, p, prev, nullptr, nullptr, log_prob, workspace, stream);
}

void sde_step_backward_cuda(const SdeStepProblem& p, const void* prev, const void* grad_log_prob, void* grad_v,
                            void* stream) {
  dispatch(Mode::kBackward, p, prev, grad_v, grad_log_prob, nullptr, nullptr, stream);
}

}  // namespace dancegrpo
