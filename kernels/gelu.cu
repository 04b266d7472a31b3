// GELU, tanh approximation (GPT-2's), forward and backward, elementwise.
//
// Layout: any N bf16 values, flat. Thread i < N / 8 takes chunk i with one 16-byte load and
// store; the N % 8 values past the last whole chunk go one each to the threads after those.
// The base pointers must be 16-byte aligned (the wrapper checks).
//
// Precision: fp32 in registers (tanhf, the accurate one), rounded to bf16 once per output.
//
// In place: gelu_backward's dinp may be dout itself. Each thread reads its own chunk of dout
// before writing the same chunk of dinp, so no pointer here is __restrict__.
//
// Launch shape: 256 threads per block, ceil((N / 8 + N % 8) / 256) blocks.
#include "common.cuh"

constexpr float GELU_SCALE = 0.7978845608028654f;  // sqrt(2 / pi)

static __device__ __forceinline__ float gelu(float x) {
    return 0.5f * x * (1.0f + tanhf(GELU_SCALE * (x + 0.044715f * x * x * x)));
}

static __device__ __forceinline__ float gelu_grad(float x) {
    const float th = tanhf(GELU_SCALE * (x + 0.044715f * x * x * x));
    const float dth = (1.0f - th * th) * GELU_SCALE * (1.0f + 3.0f * 0.044715f * x * x);
    return 0.5f * (1.0f + th) + 0.5f * x * dth;
}

extern "C" __global__ void gelu_forward(bf16* out, const bf16* inp, int N) {
    const int n8 = N / 8;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n8) {
        const bf16x8 x = load8_stream(inp + (size_t)i * 8);
        bf16x8 y;
        for (int k = 0; k < 8; k++) y.v[k] = __float2bfloat16(gelu(__bfloat162float(x.v[k])));
        store8(out + (size_t)i * 8, y);
    } else if (i - n8 < N - n8 * 8) {
        const size_t j = (size_t)n8 * 8 + (i - n8);
        out[j] = __float2bfloat16(gelu(__bfloat162float(inp[j])));
    }
}

extern "C" __global__ void gelu_backward(bf16* dinp, const bf16* inp, const bf16* dout, int N) {
    const int n8 = N / 8;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n8) {
        const bf16x8 x = load8_stream(inp + (size_t)i * 8), dy = load8(dout + (size_t)i * 8);
        bf16x8 dx;
        for (int k = 0; k < 8; k++)
            dx.v[k] = __float2bfloat16(gelu_grad(__bfloat162float(x.v[k])) * __bfloat162float(dy.v[k]));
        store8(dinp + (size_t)i * 8, dx);
    } else if (i - n8 < N - n8 * 8) {
        const size_t j = (size_t)n8 * 8 + (i - n8);
        dinp[j] = __float2bfloat16(gelu_grad(__bfloat162float(inp[j])) * __bfloat162float(dout[j]));
    }
}
