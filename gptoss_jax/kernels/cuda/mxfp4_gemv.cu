// MXFP4 expert GEMVs on tensor cores, called from JAX through XLA's FFI.
//
// The two batch-1 MoE kernels of gpt-oss (kernels/moe.py has the Triton versions and the
// contracts; kernels/cuda_moe.py builds and calls these):
//   gptoss_mxfp4_gemv_swiglu: a[p] = SwiGLU(round(round(x[p / pairs_per_x] @ W1[e_p]^T) + b1[e_p]))
//   gptoss_mxfp4_gemv_mix:    out[n] = residual[n] + round(sum_j w[n, j] * (round(round(a[nk + j] @ W2[e]^T) + b2[e])))
//
// Weights stay as the checkpoint stores them: uint8 [E, O, D/32, 16] (element 2i of a
// 32-element block in the low nibble of byte i, 2i+1 in the high nibble) and uint8 E8M0
// scales [E, O, D/32].
//
// How the arithmetic stays exact (spec 2.5, "Numerics"):
// - An FP4 code `s e1 e0 m` placed in an fp16 as s at bit 15 and e1 e0 m at bits 11..9 is
//   exactly the FP4 value times 2^-14 (the FP4 subnormal 0.5 becomes an fp16 subnormal).
// - x (bf16) enters the tensor cores as fp16, scaled per warp by a power of two so that its
//   largest element lies in [2^14, 2^15): every bf16 value within 2^31 of that maximum
//   converts exactly.
// - mma.sync m16n8k16 multiplies the fp16 operands exactly and accumulates in fp32, one
//   32-element block (two MMAs) at a time; the block's partial sum is then scaled by
//   2^(scale - 127 + 14) (exact for scales 0..240, as in moe.block_scale) and added to an
//   fp32 accumulator.
// - The roundings after the dot (to bf16, bias, SwiGLU, the weighted sum, the residual) are
//   those of the reference (model.MoE.experts_gathered / expert_mix).
//
// Tiling: a CTA owns R = 16 * MT rows of G pairs (G = 1 for mlp1, the token's k experts
// for mlp2) and splits the contraction across KSPLIT warps per pair. Thread (g, t) of a
// warp (lane = 4g + t) holds, for each 16-row tile, rows g and g + 8 and the 32-bit word t
// of each 16-byte block: the 8 weights it feeds to the two MMAs of that block. The k order
// inside an MMA is free as long as x follows it, so x is stored in shared memory already
// permuted to match the decode (x_fragment below). All eight MMA columns carry the same x.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kBlock = 32;       // FP4 elements per scale block
constexpr int kBlockBytes = 16;  // packed bytes per block

struct GemvParams {
  const __nv_bfloat16* x;            // [X, D]
  const int32_t* pair_expert;        // [P]
  const uint8_t* w;                  // [E, O, NB, 16]
  const uint8_t* scales;             // [E, O, NB]
  const __nv_bfloat16* bias;         // [E, O]
  const __nv_bfloat16* pair_weight;  // [P] (mix)
  const __nv_bfloat16* residual;     // [P / G, O] (mix) or null
  void* out;  // swiglu: bf16 [P, O / 2]; mix: bf16 [P / G, O] with a residual, else f32
  int num_experts, out_rows, num_blocks, pairs_per_x, group;
  float limit, alpha;
};

__device__ __forceinline__ float round_bf16(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

// Eight FP4 codes (one 32-bit word: bytes b0..b3) -> four fp16x2 values * 2^-14:
// l01 = (b0.lo, b1.lo), l23 = (b2.lo, b3.lo), h01 = (b0.hi, b1.hi), h23 = (b2.hi, b3.hi).
// The fp16 of a code has a zero low byte and the high byte s000 e1 e0 m 0.
__device__ __forceinline__ void decode8(uint32_t w, uint32_t& l01, uint32_t& l23, uint32_t& h01, uint32_t& h23) {
  const uint32_t lo = ((w << 1) & 0x0E0E0E0Eu) | ((w << 4) & 0x80808080u);
  const uint32_t hi = ((w >> 3) & 0x0E0E0E0Eu) | (w & 0x80808080u);
  l01 = __byte_perm(lo, 0, 0x1404);
  l23 = __byte_perm(lo, 0, 0x3424);
  h01 = __byte_perm(hi, 0, 0x1404);
  h23 = __byte_perm(hi, 0, 0x3424);
}

__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1, const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

// 2^(scale - 127 + 14) from an E8M0 byte: exact for scales 0..240 (moe.block_scale).
__device__ __forceinline__ float block_scale(uint32_t s) { return __uint_as_float(s * (1u << 23) + (14u << 23)); }

__device__ __forceinline__ uint32_t bf16_abs_max2(uint32_t a, uint32_t b) {
  return __vmaxu2(a & 0x7FFF7FFFu, b & 0x7FFF7FFFu);
}

__device__ __forceinline__ uint32_t to_half2(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// The fragment thread t of a group feeds for one block: features 8t..8t+7 as fp16 pairs
// (0,2), (4,6), (1,3), (5,7), matching decode8's l01, l23, h01, h23.
__device__ __forceinline__ uint4 x_fragment(uint4 raw, float inv) {
  const uint32_t r[4] = {raw.x, raw.y, raw.z, raw.w};
  float f[8];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(r[i] << 16) * inv;
    f[2 * i + 1] = __uint_as_float(r[i] & 0xFFFF0000u) * inv;
  }
  return make_uint4(to_half2(f[0], f[2]), to_half2(f[4], f[6]), to_half2(f[1], f[3]), to_half2(f[5], f[7]));
}

// Converts this warp's blocks [kb0, kb1) of the x row into fragments in xs and returns the
// power of two 2^e the partial sums must be multiplied by (x was multiplied by 2^-e). Up to
// 64 blocks are read once into registers (all loads in flight together); more are read twice.
__device__ float prepare_x(const __nv_bfloat16* xrow, int kb0, int kb1, uint4* xs, int lane) {
  constexpr int kHeld = 8;  // uint4 per lane kept in registers
  const uint4* src = reinterpret_cast<const uint4*>(xrow) + kb0 * 4;
  const int groups = (kb1 - kb0) * 4;  // 8 features each
  uint4 held[kHeld];
  uint32_t m = 0;
#pragma unroll
  for (int i = 0; i < kHeld; ++i) {
    const int q = lane + 32 * i;
    held[i] = q < groups ? src[q] : make_uint4(0, 0, 0, 0);
  }
#pragma unroll
  for (int i = 0; i < kHeld; ++i)
    m = __vmaxu2(m, __vmaxu2(bf16_abs_max2(held[i].x, held[i].y), bf16_abs_max2(held[i].z, held[i].w)));
  for (int q = lane + 32 * kHeld; q < groups; q += 32) {
    const uint4 v = src[q];
    m = __vmaxu2(m, __vmaxu2(bf16_abs_max2(v.x, v.y), bf16_abs_max2(v.z, v.w)));
  }
#pragma unroll
  for (int off = 16; off; off >>= 1) m = __vmaxu2(m, __shfl_xor_sync(0xFFFFFFFFu, m, off));
  const uint32_t top = max(m & 0xFFFFu, m >> 16);
  // Biased exponent of the largest |x| (bf16 and fp32 share the bias): put it in
  // [2^14, 2^15), but never scale by less than 2^-114 or more than 2^126.
  int e = static_cast<int>((top >> 7) & 0xFF) - 127 - 14;
  e = max(-126, e);
  if (top == 0) e = 0;
  const float inv = __uint_as_float(static_cast<uint32_t>(127 - e) << 23);
#pragma unroll
  for (int i = 0; i < kHeld; ++i) {
    const int q = lane + 32 * i;
    if (q < groups) xs[q] = x_fragment(held[i], inv);
  }
  for (int q = lane + 32 * kHeld; q < groups; q += 32) xs[q] = x_fragment(src[q], inv);
  __syncwarp();
  return __uint_as_float(static_cast<uint32_t>(127 + e) << 23);
}

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared without registers; src_bytes 0 writes zeros and reads nothing.
__device__ __forceinline__ void copy16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void copy_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void copy_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix4(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// A stage holds kStageBlocks blocks of each of the warp's R rows: R rows of 128 bytes, the
// 16-byte block j of row r stored at column j ^ (r % 8) so that ldmatrix's 8 rows hit
// distinct banks.
constexpr int kStageBlocks = 8;
constexpr int kStageRowBytes = kStageBlocks * kBlockBytes;

__device__ __forceinline__ int swizzled(int row, int blk) { return row * kStageRowBytes + ((blk ^ (row & 7)) << 4); }

template <int MT>
__device__ __forceinline__ void load_stage(uint32_t stage, const uint8_t* wrows, size_t row_bytes, int first,
                                           int kb1, int lane) {
  constexpr int R = 16 * MT;
#pragma unroll
  for (int i = 0; i < R * kStageBlocks / 32; ++i) {
    const int c = lane + 32 * i, row = c / kStageBlocks, blk = c % kStageBlocks;
    const int b = first + blk;
    const bool inside = b < kb1;
    copy16(stage + swizzled(row, blk), wrows + row * row_bytes + (inside ? b : first) * kBlockBytes,
           inside ? 16 : 0);
  }
}

// Issues the first STAGES - 1 stages (one commit group each, empty past the end).
template <int MT, int STAGES>
__device__ __forceinline__ void start_pipeline(uint8_t* stages, const uint8_t* wrows, size_t row_bytes, int kb0,
                                               int kb1, int lane) {
  constexpr int kStageBytes = 16 * MT * kStageRowBytes;
  const uint32_t base = smem_address(stages);
  const int num_stages = (kb1 - kb0 + kStageBlocks - 1) / kStageBlocks;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < num_stages) load_stage<MT>(base + s * kStageBytes, wrows, row_bytes, kb0 + s * kStageBlocks, kb1, lane);
    copy_commit();
  }
}

// The warp's R rows over blocks [kb0, kb1) after start_pipeline: a STAGES-deep cp.async pipeline of 8-block
// stages; per pair of blocks and 16-row tile one ldmatrix (the words of rows g and g + 8),
// four MMAs and the scaled adds. scales: block_scale per [block][tile][g][h] of the range.
template <int MT, int STAGES>
__device__ __forceinline__ void accumulate(uint8_t* stages, const float* scales, const uint4* xs,
                                           const uint8_t* wrows, size_t row_bytes, int kb0, int kb1, int lane,
                                           float (&acc)[MT][2]) {
  constexpr int R = 16 * MT;
  constexpr int kStageBytes = R * kStageRowBytes;
  const int g = lane >> 2, t = lane & 3;
  const uint32_t base = smem_address(stages);
  const int num_stages = (kb1 - kb0 + kStageBlocks - 1) / kStageBlocks;
  // ldmatrix lane roles: matrix q = lane / 8 is (rows 0-7 | 8-15 of the tile) x (block 2j | 2j + 1).
  const int q = lane >> 3, lrow = (lane & 7) + 8 * (q & 1), lblk = q >> 1;
  for (int st = 0; st < num_stages; ++st) {
    const int next = st + STAGES - 1;
    if (next < num_stages)
      load_stage<MT>(base + (next % STAGES) * kStageBytes, wrows, row_bytes, kb0 + next * kStageBlocks, kb1, lane);
    copy_commit();
    copy_wait<STAGES - 1>();
    __syncwarp();
    const uint32_t stage = base + (st % STAGES) * kStageBytes;
    const int first = st * kStageBlocks;  // relative to kb0
    const int count = min(kStageBlocks, kb1 - kb0 - first);
#pragma unroll
    for (int j = 0; j < kStageBlocks / 2; ++j) {
      if (2 * j >= count) break;
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        uint32_t w[4];  // row g, row g + 8 of block 2j, then of block 2j + 1
        ldmatrix4(w, stage + swizzled(m * 16 + lrow, 2 * j + lblk));
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          if (2 * j + k >= count) break;
          const int blk = first + 2 * j + k;
          const uint4 xf = xs[blk * 4 + t];
          const float2 sc = reinterpret_cast<const float2*>(scales)[(blk * MT + m) * 8 + g];
          uint32_t l01[2], l23[2], h01[2], h23[2];
          decode8(w[2 * k], l01[0], l23[0], h01[0], h23[0]);
          decode8(w[2 * k + 1], l01[1], l23[1], h01[1], h23[1]);
          const float zero[4] = {0.f, 0.f, 0.f, 0.f};
          float d[4];
          mma16816(d, l01[0], l01[1], l23[0], l23[1], xf.x, xf.y, zero);
          mma16816(d, h01[0], h01[1], h23[0], h23[1], xf.z, xf.w, d);
          acc[m][0] = fmaf(d[0], sc.x, acc[m][0]);
          acc[m][1] = fmaf(d[2], sc.y, acc[m][1]);
        }
      }
    }
    __syncwarp();
  }
  copy_wait<0>();
}

// The block scales of the warp's rows and blocks as fp32 factors, [block][tile][g][h]. Lane
// l reads rows l, l + 32, ... (R >= 32) or row l % R and every (32 / R)-th block (R < 32);
// the loads of a batch are in flight together.
template <int MT>
__device__ void prepare_scales(const uint8_t* srows, int nb, int kb0, int kb1, float* scales, int lane) {
  constexpr int R = 16 * MT, kBatch = 16;
  constexpr int kRowsPerLane = R >= 32 ? R / 32 : 1, kBlockStep = R >= 32 ? 1 : 32 / R;
  const int blocks = kb1 - kb0;
  const int first_blk = R >= 32 ? 0 : lane / R;
#pragma unroll
  for (int k = 0; k < kRowsPerLane; ++k) {
    const int row = R >= 32 ? lane + 32 * k : lane % R;
    const int m = row / 16, h = (row % 16) / 8, g = row % 8;
    const uint8_t* src = srows + static_cast<size_t>(row) * nb + kb0;
    for (int start = first_blk; start < blocks; start += kBatch * kBlockStep) {
      uint32_t v[kBatch];
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        const int blk = start + i * kBlockStep;
        v[i] = blk < blocks ? __ldg(src + blk) : 0u;
      }
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        const int blk = start + i * kBlockStep;
        if (blk < blocks) scales[((blk * MT + m) * 8 + g) * 2 + h] = block_scale(v[i]);
      }
    }
  }
}

__device__ __forceinline__ float swiglu(float gate, float up, float limit, float alpha) {
  // model.MoE.swiglu's roundings: every op rounded to bf16 (kernels/moe.py swiglu_pair).
  gate = fminf(gate, limit);
  up = fminf(fmaxf(up, -limit), limit);
  const float z = round_bf16(gate * alpha);
  const float sigmoid = round_bf16(1.0f / round_bf16(1.0f + round_bf16(expf(-z))));
  const float glu = round_bf16(gate * sigmoid);
  return glu * round_bf16(up + 1.0f);
}

// grid (P / G, O / R); block 32 * KSPLIT * G threads. Dynamic shared memory per warp: the
// weight stages, x fragments (64 bytes a block) and block scales (4 bytes a row and block);
// then the partial sums [G][KSPLIT][R].
template <int MT, int KSPLIT, int STAGES>
__host__ __device__ constexpr int warp_smem_bytes(int per_warp) {
  return STAGES * 16 * MT * kStageRowBytes + per_warp * 64 + per_warp * 16 * MT * 4;
}

template <int MT, int KSPLIT, int STAGES, bool SWIGLU>
__global__ void __launch_bounds__(256) gemv_kernel(GemvParams p) {
  constexpr int R = 16 * MT;
  extern __shared__ uint4 smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int slot = warp / KSPLIT, split = warp % KSPLIT;
  const int pair = blockIdx.x * p.group + slot;
  const int row0 = blockIdx.y * R;
  const int nb = p.num_blocks;
  const int per_warp = (nb + KSPLIT - 1) / KSPLIT;
  const int kb0 = min(nb, split * per_warp), kb1 = min(nb, kb0 + per_warp);
  const int expert = p.pair_expert[pair];
  const bool live = expert >= 0 && expert < p.num_experts;
  const int e = min(max(expert, 0), p.num_experts - 1);

  uint8_t* region = reinterpret_cast<uint8_t*>(smem) + warp * warp_smem_bytes<MT, KSPLIT, STAGES>(per_warp);
  uint8_t* stages = region;
  uint4* xs = reinterpret_cast<uint4*>(region + STAGES * R * kStageRowBytes);
  float* scales = reinterpret_cast<float*>(xs + per_warp * 4);
  float* partial = reinterpret_cast<float*>(reinterpret_cast<uint8_t*>(smem) +
                                            p.group * KSPLIT * warp_smem_bytes<MT, KSPLIT, STAGES>(per_warp));

  float acc[MT][2];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = 0.f;
  float x_scale = 1.f;
  if (live && kb0 < kb1) {
    const size_t first_row = static_cast<size_t>(e) * p.out_rows + row0;
    const size_t row_bytes = static_cast<size_t>(nb) * kBlockBytes;
    const uint8_t* wrows = p.w + first_row * row_bytes;
    start_pipeline<MT, STAGES>(stages, wrows, row_bytes, kb0, kb1, lane);  // weights first: the longest wait
    prepare_scales<MT>(p.scales + first_row * nb, nb, kb0, kb1, scales, lane);
    const __nv_bfloat16* xrow = p.x + static_cast<size_t>(pair / p.pairs_per_x) * nb * kBlock;
    x_scale = prepare_x(xrow, kb0, kb1, xs, lane);  // ends with __syncwarp
    accumulate<MT, STAGES>(stages, scales, xs, wrows, row_bytes, kb0, kb1, lane, acc);
  }
  if ((lane & 3) == 0) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      partial[(slot * KSPLIT + split) * R + m * 16 + g] = acc[m][0] * x_scale;
      partial[(slot * KSPLIT + split) * R + m * 16 + g + 8] = acc[m][1] * x_scale;
    }
  }
  __syncthreads();

  auto pair_output = [&](int s, int r) {  // round(round(x @ W^T) + bias) of slot s, CTA row r
    const int ps = blockIdx.x * p.group + s;
    const int es = min(max(p.pair_expert[ps], 0), p.num_experts - 1);
    float dot = 0.f;
    for (int k = 0; k < KSPLIT; ++k) dot += partial[(s * KSPLIT + k) * R + r];
    const float b = __bfloat162float(p.bias[static_cast<size_t>(es) * p.out_rows + row0 + r]);
    return round_bf16(round_bf16(dot) + b);
  };

  if constexpr (SWIGLU) {  // gate j at row 2j, up j at row 2j + 1 (spec 2.5)
    if (threadIdx.x < R / 2) {
      const int j = threadIdx.x;
      const float a = swiglu(pair_output(0, 2 * j), pair_output(0, 2 * j + 1), p.limit, p.alpha);
      static_cast<__nv_bfloat16*>(p.out)[static_cast<size_t>(pair) * (p.out_rows / 2) + row0 / 2 + j] =
          __float2bfloat16_rn(a);
    }
  } else {
    if (threadIdx.x < R) {
      const int r = threadIdx.x;
      float total = 0.f;  // in slot order, as the reference's weighted sum
      for (int s = 0; s < p.group; ++s) {
        const int ps = blockIdx.x * p.group + s;
        const int es = p.pair_expert[ps];
        const float y = pair_output(s, r);
        if (es >= 0 && es < p.num_experts) total += __bfloat162float(p.pair_weight[ps]) * y;
      }
      const size_t at = static_cast<size_t>(blockIdx.x) * p.out_rows + row0 + r;
      if (p.residual != nullptr) {
        static_cast<__nv_bfloat16*>(p.out)[at] =
            __float2bfloat16_rn(round_bf16(total) + __bfloat162float(p.residual[at]));
      } else {
        static_cast<float*>(p.out)[at] = total;
      }
    }
  }
}

using KernelFn = void (*)(GemvParams);

struct Variant {
  KernelFn fn;
  int mt, ksplit, stages;
};

template <bool SWIGLU, int MT, int KSPLIT, int STAGES>
Variant make_variant() {
  return {gemv_kernel<MT, KSPLIT, STAGES, SWIGLU>, MT, KSPLIT, STAGES};
}

// The instantiated tilings (MT, KSPLIT, STAGES), by the `variant` attribute.
template <bool SWIGLU>
Variant variant(int64_t i) {
  switch (i) {
    case 0: return make_variant<SWIGLU, 2, 4, 3>();
    case 1: return make_variant<SWIGLU, 2, 4, 2>();
    case 2: return make_variant<SWIGLU, 1, 4, 3>();
    case 3: return make_variant<SWIGLU, 1, 8, 2>();
    case 4: return make_variant<SWIGLU, 1, 2, 4>();
    case 5: return make_variant<SWIGLU, 1, 2, 3>();
    case 6: return make_variant<SWIGLU, 1, 2, 2>();
    case 7: return make_variant<SWIGLU, 1, 4, 2>();
    default: return {nullptr, 0, 0, 0};
  }
}

ffi::Error launch(cudaStream_t stream, GemvParams p, Variant v, int num_pairs, const char* name) {
  if (v.fn == nullptr) return ffi::Error::InvalidArgument(std::string(name) + ": unknown variant");
  const int rows = 16 * v.mt;
  if (p.out_rows % rows != 0)
    return ffi::Error::InvalidArgument(std::string(name) + ": " + std::to_string(p.out_rows) +
                                       " output rows are not a multiple of the row tile " + std::to_string(rows));
  if (num_pairs % p.group != 0 || 32 * v.ksplit * p.group > 256)
    return ffi::Error::InvalidArgument(std::string(name) + ": bad pair grouping");
  if (num_pairs == 0) return ffi::Error::Success();
  const int per_warp = (p.num_blocks + v.ksplit - 1) / v.ksplit;
  const int warp_bytes = v.stages * rows * kStageRowBytes + per_warp * 64 + per_warp * rows * 4;
  const size_t smem = static_cast<size_t>(p.group) * v.ksplit * (warp_bytes + rows * 4);
  int device = 0, limit = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (smem > static_cast<size_t>(limit))
    return ffi::Error::InvalidArgument(std::string(name) + ": needs " + std::to_string(smem) +
                                       " bytes of shared memory, the GPU allows " + std::to_string(limit) +
                                       "; choose a variant with fewer stages or row tiles");
  if (smem > 48 * 1024) cudaFuncSetAttribute(v.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  const dim3 grid(num_pairs / p.group, p.out_rows / rows);
  v.fn<<<grid, 32 * v.ksplit * p.group, smem, stream>>>(p);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return ffi::Error::Internal(std::string(name) + ": " + cudaGetErrorString(err));
  return ffi::Error::Success();
}

ffi::Error GemvSwigluImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> pair_expert,
                          ffi::Buffer<ffi::U8> w, ffi::Buffer<ffi::U8> scales, ffi::AnyBuffer bias,
                          ffi::Result<ffi::AnyBuffer> out, int64_t pairs_per_x, float limit, float alpha,
                          int64_t variant_id) {
  auto wd = w.dimensions();
  GemvParams p{};
  p.x = static_cast<const __nv_bfloat16*>(x.untyped_data());
  p.pair_expert = pair_expert.typed_data();
  p.w = w.typed_data();
  p.scales = scales.typed_data();
  p.bias = static_cast<const __nv_bfloat16*>(bias.untyped_data());
  p.out = out->untyped_data();
  p.num_experts = static_cast<int>(wd[0]);
  p.out_rows = static_cast<int>(wd[1]);
  p.num_blocks = static_cast<int>(wd[2]);
  p.pairs_per_x = static_cast<int>(pairs_per_x);
  p.group = 1;
  p.limit = limit;
  p.alpha = alpha;
  const int num_pairs = static_cast<int>(pair_expert.element_count());
  return launch(stream, p, variant<true>(variant_id), num_pairs, "gptoss_mxfp4_gemv_swiglu");
}

ffi::Error GemvMixImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> pair_expert,
                       ffi::Buffer<ffi::U8> w, ffi::Buffer<ffi::U8> scales, ffi::AnyBuffer bias,
                       ffi::AnyBuffer pair_weight, ffi::AnyBuffer residual, ffi::Result<ffi::AnyBuffer> out,
                       int64_t group, bool add_residual, int64_t variant_id) {
  auto wd = w.dimensions();
  GemvParams p{};
  p.x = static_cast<const __nv_bfloat16*>(x.untyped_data());
  p.pair_expert = pair_expert.typed_data();
  p.w = w.typed_data();
  p.scales = scales.typed_data();
  p.bias = static_cast<const __nv_bfloat16*>(bias.untyped_data());
  p.pair_weight = static_cast<const __nv_bfloat16*>(pair_weight.untyped_data());
  p.residual = add_residual ? static_cast<const __nv_bfloat16*>(residual.untyped_data()) : nullptr;
  p.out = out->untyped_data();
  p.num_experts = static_cast<int>(wd[0]);
  p.out_rows = static_cast<int>(wd[1]);
  p.num_blocks = static_cast<int>(wd[2]);
  p.pairs_per_x = 1;
  p.group = static_cast<int>(group);
  const int num_pairs = static_cast<int>(pair_expert.element_count());
  return launch(stream, p, variant<false>(variant_id), num_pairs, "gptoss_mxfp4_gemv_mix");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossMxfp4GemvSwiglu, GemvSwigluImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("pairs_per_x")
                                  .Attr<float>("limit")
                                  .Attr<float>("alpha")
                                  .Attr<int64_t>("variant"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossMxfp4GemvMix, GemvMixImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("group")
                                  .Attr<bool>("add_residual")
                                  .Attr<int64_t>("variant"),
                              {ffi::Traits::kCmdBufferCompatible});
