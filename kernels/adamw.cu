// AdamW over a flat slice of the parameters, with fp32 master weights and stochastic rounding into
// the bf16 params.
//
// Layout: N elements, one thread each: params and grads bf16; m, v and (optionally) master fp32.
// With master weights, the fp32 value updated is master's and params only receive its rounding;
// without, the value updated is the bf16 param itself, widened to fp32.
//
// Precision: fp32 throughout, one operation at a time in reference.adamw's order, each rounded
// (the __f*_rn intrinsics keep nvcc from fusing them into FMAs), so m, v and the new fp32 value
// are the twin's bits. The host folds the scalars (bias corrections, decay factor) exactly as the
// twin does and passes them as fp32.
//
// Stochastic rounding: a bf16 is the top half of an fp32. Adding 16 random bits to the bottom
// half carries into the top half (moving the value one bf16 step away from zero) with probability
// equal to the bottom half / 2^16, the value's fractional position between its two bf16
// neighbours: the rounding is unbiased, so updates smaller than a bf16 step still add up over
// many steps. The random bits are a hash of (seed, element index) alone, so the result does not
// depend on the launch shape, and the same seed gives the same bits on every run. The index is the
// element's in its tensor (offset + i: a call may cover part of a tensor, a ZeRO-1 shard's), so
// where the shards fall changes no bit.
//
// Launch shape: 1-D grid, one thread per element, 64-bit indices (N may pass 2^31).
#include "common.cuh"

// murmur3's 32-bit finalizer: a bijection whose every output bit depends on every input bit.
__device__ __forceinline__ uint32_t fmix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return h;
}

__device__ __forceinline__ uint32_t random_bits(unsigned long long seed, unsigned long long index) {
    uint32_t h = fmix32((uint32_t)seed ^ 0x9e3779b9u);
    h = fmix32(h ^ (uint32_t)(seed >> 32));
    h = fmix32(h ^ (uint32_t)index);
    return fmix32(h ^ (uint32_t)(index >> 32));
}

__device__ __forceinline__ bf16 stochastic_round(float x, uint32_t random) {
    const uint32_t bits = __float_as_uint(x);
    if ((bits & 0x7f800000u) == 0x7f800000u) return __float2bfloat16_rn(x);  // inf and NaN stay so
    return __ushort_as_bfloat16((unsigned short)((bits + (random & 0xffffu)) >> 16));
}

template <bool kMaster>
__device__ __forceinline__ void adamw_step(bf16* params, const bf16* grads, float* m, float* v, float* master,
                                           long long n, float beta1, float one_minus_beta1, float beta2,
                                           float one_minus_beta2, float v_hat_scale, float eps, float decay,
                                           float step_size, float grad_scale, unsigned long long seed,
                                           long long offset) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float g = __fmul_rn(__bfloat162float(grads[i]), grad_scale);
    const float mi = __fadd_rn(__fmul_rn(m[i], beta1), __fmul_rn(one_minus_beta1, g));
    const float vi = __fadd_rn(__fmul_rn(v[i], beta2), __fmul_rn(__fmul_rn(g, g), one_minus_beta2));
    m[i] = mi;
    v[i] = vi;
    // m_hat / (sqrt(v_hat) + eps) with 1 / (1 - beta^t) folded into v_hat_scale and step_size
    const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(vi), v_hat_scale), eps);
    float old;
    if constexpr (kMaster) old = master[i];
    else old = __bfloat162float(params[i]);
    const float updated = __fsub_rn(__fmul_rn(old, decay), __fmul_rn(__fdiv_rn(mi, denom), step_size));
    if constexpr (kMaster) master[i] = updated;
    params[i] = stochastic_round(updated, random_bits(seed, (unsigned long long)(offset + i)));
}

extern "C" __global__ void adamw_master_kernel(bf16* params, const bf16* grads, float* m, float* v, float* master,
                                               long long n, float beta1, float one_minus_beta1, float beta2,
                                               float one_minus_beta2, float v_hat_scale, float eps, float decay,
                                               float step_size, float grad_scale, unsigned long long seed,
                                               long long offset) {
    adamw_step<true>(params, grads, m, v, master, n, beta1, one_minus_beta1, beta2, one_minus_beta2, v_hat_scale,
                     eps, decay, step_size, grad_scale, seed, offset);
}

extern "C" __global__ void adamw_kernel(bf16* params, const bf16* grads, float* m, float* v, long long n,
                                        float beta1, float one_minus_beta1, float beta2, float one_minus_beta2,
                                        float v_hat_scale, float eps, float decay, float step_size, float grad_scale,
                                        unsigned long long seed, long long offset) {
    adamw_step<false>(params, grads, m, v, nullptr, n, beta1, one_minus_beta1, beta2, one_minus_beta2, v_hat_scale,
                      eps, decay, step_size, grad_scale, seed, offset);
}
