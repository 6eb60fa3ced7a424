// Decode attention over paged packed KV, mma.sync tensor cores: `int` (token axis, per-token fp16 scale/zero; 2, 3,
// 4 or 8 bits) and `turbo_mse` (rotated, per-token fp16 norm, a Lloyd-Max codebook; 1-4 bits) for K and V, each.
// Compiled at first use by NVRTC (kvpack/kernels/cuda_decode.py), one variant per set of macros:
//   D (head_dim), KKIND / VKIND (0 int, 1 turbo_mse), KBITS / VBITS (code bits of K and V), GQA (query heads per KV
//   head), HKV (KV heads), HG (KV heads per CTA = warps),
//   BLOCK_SIZE (tokens per page, a multiple of 16), STAGES (cp.async pipeline depth),
//   CHUNK (16 or 4: cp.async width; 16 needs 16-byte aligned rows of HG heads), OUT_BF16, MINB (0 or the CTAs per
//   SM that the register allocation must allow), TREP (copies of a 4-bit turbo_mse table: 1, 2, 4, 8, 16 or 32).
// No headers: every conversion is inline PTX, so NVRTC needs no CUDA include path.
//
// Grid (splits + 1, HKV / HG, batch). Split s < splits: packed tokens [s * TPS, min((s+1) * TPS, seq_len)),
// 16-token tiles of all HG heads copied page -> shared memory with cp.async (STAGES deep); warp w scores
// KV head hg*HG + w. Splits >= splits: the 16-bit window (sinks + residual), window_per_split tokens each (at small
// batch a few CTAs: one CTA for a 132-token window was the tail of a batch-1 launch, its loads not pipelined), read
// straight from global. Parts (B, HQ, num_parts): the splits', then the window's.
// Scores: S^T (16 tokens x 8 query heads) = K (tokens on M) . Q^T (query heads on N, padded to 8) with
// m16n8k16; int codes become fp16 with the 0x6400 magic number (one shift per 32-bit word, no per-value shift
// and convert: a code at bit 2^j of a half is taken in place as 1024 + 2^j c and scaled back by one fma), and the
// per-token scale and zero are applied to the 16x8 scores (s = scale <q,c> + zero sum q), not to values.
// turbo_mse codes become fp16 centroids through a table in shared memory built from the codebook at the start:
// one 32-bit load gives the half2 of two codes (4 bits: 256 entries; 2 bits: 16), 3 bits (planes 2 + 1) load the
// two candidates of the low 2 bits at once (16 x 8 bytes) and the third bit selects (prmt sign replication + lop3);
// 1 bit is affine (c0 + c (c1 - c0)) and takes the int path. The norm is the token's scale, its zero 0.
// Values: O^T (dims on M) += V^T (tokens on K) . (p * v_scale)^T, plus sum p * v_zero per head.
// Dims are permuted freely inside a thread's fragment (a dot product does not care); Q is loaded with the
// same permutation, and the output store undoes the value permutation.
// Code planes: a row holds the codes' planes (3 bits: the 2-bit plane, then the 1-bit plane), then 4 side bytes.
// The "main" plane (KPLANE / VPLANE bits: 2 for 3-bit codes) sets the pairing of a word's codes into half2s.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

struct __align__(8) pair32 {
  u32 x, y;
};
struct __align__(16) quad32 {
  u32 x, y, z, w;
};

#define MAGIC 0x64006400u
#define NT ((GQA + 7) / 8)           // n-tiles of 8 query heads
#define KSTEPS (D / 16)
#define KPLANE (KBITS == 3 ? 2 : KBITS)  // bits of the main plane's codes (3: the 2-bit plane; its 1-bit plane follows)
#define VPLANE (VBITS == 3 ? 2 : VBITS)
#define K_CODE (D * KBITS / 8)       // code bytes of one token of one KV head, then 4 bytes of scale and zero
#define V_CODE (D * VBITS / 8)
#define K_ROW (K_CODE + 4)
#define V_ROW (V_CODE + 4)
#define K_TILE (16 * HG * K_ROW)     // one stage: the K tile, then the V tile
#define V_TILE (16 * HG * V_ROW)
#define STAGE_BYTES (K_TILE + V_TILE)
#define KWORDS (D / 4 * KPLANE / 32)  // main-plane words of one token a thread reads for K (D/4 dims)
#define KPAIRS (16 / KPLANE)          // half2 pairs a word of K codes makes: codes (s, s + KPAIRS), s < KPAIRS
// 4-bit turbo_mse keys pair adjacent codes instead, (2s, 2s + 1): byte s of a word is then the table index itself
// (one shift and one lop3 per lookup; pairing (s, s + 4) first took 5 more instructions per word)
#define KADJ (KKIND == 1 && KBITS == 4)
#define VTB (D / 8 * VPLANE)          // main-plane bits of one token a thread reads for V (D/8 dims)
#define VWORDS (VTB / 32)             // as words (0: 8 or 16 bits)
#define VPAIRS (16 / VPLANE)
// 4-bit tables are held TREP times, entry e of copy j at word e TREP + j, copy lane % TREP: lanes of different copies
// never share a bank (the 256 entries of one copy spread over 32 / TREP banks; 32 copies: no bank conflicts at all)
#define KREP (KKIND == 1 && KBITS == 4 ? TREP : 1)
#define VREP (VKIND == 1 && VBITS == 4 ? TREP : 1)
#define KTAB (KKIND == 1 ? (KBITS == 4 ? 256 * TREP : KBITS == 3 ? 32 : KBITS == 2 ? 16 : 0) : 0)  // table words
#define VTAB (VKIND == 1 ? (VBITS == 4 ? 256 * TREP : VBITS == 3 ? 32 : VBITS == 2 ? 16 : 0) : 0)
#define TAB_OFFSET ((STAGES * STAGE_BYTES + 15) / 16 * 16)  // the turbo_mse tables after the pipeline's stages
#define NEG_INF (-__int_as_float(0x7f800000))
// "Raw" streams: int codes at 2, 4 or 8 bits (and 1-bit turbo_mse values, affine) go to the mma as the magic number's
// 1024 + 2^j c, without the subtraction or fma that brings them to c, for the pairs whose codes sit high enough in the
// mantissa (`raw_pair`: the cancelled 1024 at most ~2^6 times the mean code 2^j c; with every pair raw, 2-bit codes at
// j = 0 lost 2x SDPA's accuracy at head_dim 256). K: the query element that meets a raw pair is scaled by 2^-j once,
// and the per-head constant 1024 sum(q') leaves the scores before the token's scale (one fadd per score). V: the output
// row of a raw pair collects 1024 R + 2^j sum(r c) (r = p v_scale as rounded to fp16, R = sum r); the finish takes
// 1024 R out and divides by 2^j once.
#define KRAW (KKIND == 0 && (KBITS == 2 || KBITS == 4 || KBITS == 8))
#define VRAW ((VKIND == 0 && (VBITS == 2 || VBITS == 4 || VBITS == 8)) || (VKIND == 1 && VBITS == 1))
// j of pair s of `unpack<bits, RAW>`: the code's bit offset in its 16-bit half
__host__ __device__ constexpr int raw_shift(int bits, int s) { return bits * (s % (8 / bits)); }
// Whether pair s stays raw: 8-bit codes (mean 2^7), else codes at j >= 4 (1 bit: j >= 5)
__host__ __device__ constexpr bool raw_pair(int bits, int s) {
  return bits == 8 || raw_shift(bits, s) >= (bits == 1 ? 5 : 4);
}
// fp16 bits of 2^-j, both halves
__host__ __device__ constexpr u32 pow2_neg(int j) { return (u32(15 - j) << 10) * 0x10001u; }

__device__ __forceinline__ u32 lop_or(u32 x, u32 mask, u32 magic) {  // (x & mask) | magic
  u32 r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(x), "r"(mask), "r"(magic));
  return r;
}
__device__ __forceinline__ u32 hsub2(u32 a, u32 b) {
  u32 r;
  asm("sub.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
  u32 r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}
__device__ __forceinline__ u32 pack2(float lo, float hi) {  // half2 {lo, hi}
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
__device__ __forceinline__ float lo_f(u32 x) {
  float f;
  asm("{.reg .f16 l, h; mov.b32 {l, h}, %1; cvt.f32.f16 %0, l;}" : "=f"(f) : "r"(x));
  return f;
}
__device__ __forceinline__ float hi_f(u32 x) {
  float f;
  asm("{.reg .f16 l, h; mov.b32 {l, h}, %1; cvt.f32.f16 %0, h;}" : "=f"(f) : "r"(x));
  return f;
}
__device__ __forceinline__ float ex2(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
  u32 r;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}
// A code at bits [j, j + width) of each half of x (mask = 2^width - 1), as the half2 of its two values (exact).
__device__ __forceinline__ u32 magic_code(u32 x, int j, u32 mask) {
  const u32 m = lop_or(x, (mask << j) * 0x10001u, MAGIC);
  if (j == 0) return hsub2(m, MAGIC);
  return hfma2(m, (u32(15 - j) << 10) * 0x10001u, (0x8000u | (u32(25 - j) << 10)) * 0x10001u);  // x 2^-j - 2^(10-j)
}
// fp16 bits of -(2^a + 2^b), a, b in [0, 15] (exact: two powers of two at most 10 binades apart)
__host__ __device__ constexpr u32 neg_pow2_sum(int a, int b) {
  return a == b ? 0x8000u | (u32(a + 16) << 10)
                : 0x8000u | (u32((a > b ? a : b) + 15) << 10) | (1u << (10 - ((a > b ? a - b : b - a))));
}
// The codes of a 32-bit word (BITS 1, 2, 4, 8) as half2 pairs h[s] = {code s, code s + 16 / BITS}: pair
// s = (8 / BITS) half + k holds the code at bits [BITS k, BITS (k + 1)) of each 16-bit half of w >> (8 half), taken in
// place as 1024 + 2^j c with the magic number (j = BITS k, `raw_shift`: one shift per word instead of one per pair),
// then brought to c by `magic_code`'s one fma or subtraction; RAW: the raw pairs (`raw_pair`) keep 1024 + 2^j c.
template <int BITS, bool RAW>
__device__ __forceinline__ void unpack(u32 w, u32* h) {
  constexpr int PER = 8 / BITS;
  constexpr u32 MASK = (1u << BITS) - 1u;
#pragma unroll
  for (int half = 0; half < 2; half++)
#pragma unroll
    for (int k = 0; k < PER; k++)
      h[PER * half + k] = RAW && raw_pair(BITS, k) ? lop_or(half ? w >> 8 : w, (MASK << (BITS * k)) * 0x10001u, MAGIC)
                                                   : magic_code(half ? w >> 8 : w, BITS * k, MASK);
}
// The nibble (code s, code s + 8) of 2-bit pair s of w: pairs 2k in nibble k of c, 2k + 1 in nibble k of d.
__device__ __forceinline__ void pair_nibbles(u32 w, u32& c, u32& d) {
  const u32 u = w & 0x33333333u, v = (w >> 2) & 0x33333333u;
  c = u | (u >> 14);
  d = v | (v >> 14);
}
// Codes of one main-plane word as the half2 pairs of `unpack` (pairs (s, s + 16 / plane bits)), as values:
// int: the codes (3 bits: low 2 bits from w, the third from bits (s, s + 16) of y); turbo_mse: the centroids
// through the shared-memory table (1 bit: the codes; the launch folds c0 + c (c1 - c0) into scale and zero).
// RAW: `unpack<BITS, true>` (KRAW / VRAW streams). tab: the table (copy 0); lane_off: the byte offset of this
// lane's copy.
template <int KIND, int BITS, int REP, bool RAW>
__device__ __forceinline__ void decode_codes(u32 w, u32 y, u32* h, const u32* tab, u32 lane_off) {
  if constexpr (RAW) {
    unpack<BITS, true>(w, h);
  } else if constexpr (BITS == 3 && KIND == 0) {
    // pair s = 4 half + jj: c2 at bit j = 2 jj of its half (magic m2 = 1024 + 2^j c2), c1 at bit s of y (m1 = 1024 +
    // 2^s c1). Two fmas, each exact: c2' = m2 2^-j - (2^(10-j) + 2^(12-s)) = c2 - 2^(12-s), then m1 2^(2-s) + c2' =
    // c2 + 4 c1 (s = 0: c2 - 4096 is not an fp16 integer, so that pair takes c1 itself, then c2 + 4 c1)
#pragma unroll
    for (int half = 0; half < 2; half++)
#pragma unroll
      for (int jj = 0; jj < 4; jj++) {
        const int s = 4 * half + jj;
        const u32 m2 = lop_or(half ? w >> 8 : w, (3u << (2 * jj)) * 0x10001u, MAGIC);
        const u32 m1 = lop_or(y, (1u << s) * 0x10001u, MAGIC);
        if (s == 0) {
          h[0] = hfma2(hsub2(m1, MAGIC), 0x44004400u, hsub2(m2, MAGIC));
        } else {
          const u32 c2p = hfma2(m2, (u32(15 - 2 * jj) << 10) * 0x10001u, neg_pow2_sum(10 - 2 * jj, 12 - s) * 0x10001u);
          h[s] = hfma2(m1, (u32(17 - s) << 10) * 0x10001u, c2p);
        }
      }
  } else if constexpr (BITS == 3) {
    u32 c, d;
    pair_nibbles(w, c, d);
#pragma unroll
    for (int s = 0; s < 8; s++) {
      // byte offset 8 nib of the pair of nibble nib (one lop3 after the shifts, as for the 4-bit table)
      const u32 off = ((((s & 1) ? d : c) << 3) >> (4 * (s >> 1))) & 0x78u;
      const pair32 cand = *reinterpret_cast<const pair32*>(reinterpret_cast<const u8*>(tab) + off);  // bit 0 and 1
      const u32 sh = y << (7 - s);                                  // bits s, s + 16 -> the byte signs 7, 23
      const u32 m = prmt(sh, sh, 0xAA88);                            // 0xFFFF in each half whose bit is set
      u32 r;
      asm("lop3.b32 %0, %1, %2, %3, 0xD8;" : "=r"(r) : "r"(cand.x), "r"(cand.y), "r"(m));  // m ? y : x
      h[s] = r;
    }
  } else if constexpr (KIND == 1 && BITS == 4) {
    const u32 u = w & 0x0F0F0F0Fu, v = (w >> 4) & 0x0F0F0F0Fu;
    const u32 c = u | (u >> 12), d = v | (v >> 12);  // bytes (code s, code s + 4): s = 0, 2 in c; 1, 3 in d
    // entry e of this lane's copy at byte 4 REP e + lane_off: one lop3 ((e << S) & M | lane_off) per entry, the
    // table's base left to the load's uniform register (a word index cost a shift, a lop3 and a lea per entry)
    constexpr int S = 2 + (REP == 1 ? 0 : REP == 2 ? 1 : REP == 4 ? 2 : REP == 8 ? 3 : REP == 16 ? 4 : 5);
    constexpr u32 M = 0xFFu << S;
    const u8* tb = reinterpret_cast<const u8*>(tab);
    const u32 xc = c << S, xd = d << S;
    h[0] = *reinterpret_cast<const u32*>(tb + ((xc & M) | lane_off));
    h[1] = *reinterpret_cast<const u32*>(tb + ((xd & M) | lane_off));
    h[2] = *reinterpret_cast<const u32*>(tb + (((xc >> 8) & M) | lane_off));
    h[3] = *reinterpret_cast<const u32*>(tb + (((xd >> 8) & M) | lane_off));
  } else if constexpr (KIND == 1 && BITS == 2) {
    u32 c, d;
    pair_nibbles(w, c, d);
#pragma unroll
    for (int k = 0; k < 4; k++) {
      h[2 * k] = tab[(c >> (4 * k)) & 0xFu];
      h[2 * k + 1] = tab[(d >> (4 * k)) & 0xFu];
    }
  } else {
    unpack<BITS, false>(w, h);
  }
}
// 4-bit turbo_mse keys (KADJ): pair s = bytes s of w, codes (2s, 2s + 1), looked up in this lane's table copy.
template <int REP>
__device__ __forceinline__ void decode_bytes(u32 w, u32* h, const u32* tab, u32 lane_off) {
  constexpr int S = 2 + (REP == 1 ? 0 : REP == 2 ? 1 : REP == 4 ? 2 : REP == 8 ? 3 : REP == 16 ? 4 : 5);
  constexpr u32 M = 0xFFu << S;
  const u8* tb = reinterpret_cast<const u8*>(tab);
  h[0] = *reinterpret_cast<const u32*>(tb + (((w << S) & M) | lane_off));
  h[1] = *reinterpret_cast<const u32*>(tb + (((w >> (8 - S)) & M) | lane_off));
  h[2] = *reinterpret_cast<const u32*>(tb + (((w >> (16 - S)) & M) | lane_off));
  h[3] = *reinterpret_cast<const u32*>(tb + (((w >> (24 - S)) & M) | lane_off));
}
// Entry i of a turbo_mse table from the fp16 codebook: half2 {cb[low code], cb[high code]} of index i; 3 bits: the
// 16 (low 2 bits) pairs, each followed by the pair of third bit 1.
template <int BITS>
__device__ __forceinline__ u32 table_entry(const u16* cb, int i) {
  if constexpr (BITS == 4) {
    i /= TREP;  // copies side by side
    return u32(cb[i & 15]) | (u32(cb[i >> 4]) << 16);
  }
  if constexpr (BITS == 2) return u32(cb[i & 3]) | (u32(cb[i >> 2]) << 16);
  const int e = i >> 1, hi = (i & 1) * 4;  // BITS == 3
  return u32(cb[hi + (e & 3)]) | (u32(cb[hi + (e >> 2)]) << 16);
}
// A turbo_mse table (WORDS words) into shared memory by the CTA's threads; 4 bits with REP >= 4 copies: the copies of
// an entry are adjacent words, so one 16-byte store writes 4 of them (the word-by-word build was ~500 instructions
// per thread, a tile's worth, in CTAs of 8 tiles at batch 1)
template <int BITS, int REP, int WORDS>
__device__ __forceinline__ void build_table(u32* tab, const u16* cb) {
  if constexpr (BITS == 4 && REP >= 4) {
    for (int c = threadIdx.x; c < WORDS / 4; c += 32 * HG) {
      const int e = c / (REP / 4);
      const u32 v = u32(cb[e & 15]) | (u32(cb[e >> 4]) << 16);
      reinterpret_cast<quad32*>(tab)[c] = quad32{v, v, v, v};
    }
  } else {
    for (int i = threadIdx.x; i < WORDS; i += 32 * HG) tab[i] = table_entry<BITS>(cb, i);
  }
}
// Per-token scale and zero from the 4 side bytes: int (scale, zero); turbo_mse (norm * sa, norm * sz).
template <int KIND>
__device__ __forceinline__ void side(u32 sd, float sa, float sz, float& a, float& z) {
  if constexpr (KIND == 0) {
    a = lo_f(sd), z = hi_f(sd);
  } else {
    const float n = lo_f(sd);
    a = n * sa, z = n * sz;
  }
}
// 3-bit K: the third bits of main-plane word w of thread t's dims, bits (s, s + 16) for pair s (dims 16w + s,
// 16w + s + 8): bytes 2w, 2w + 1 of the thread's D/4 bits, which start at byte D/4 + t D/32 of the row.
__device__ __forceinline__ u32 k_third(const u32* row, int t, int w) {
  const u8* p = reinterpret_cast<const u8*>(row) + D / 4 + t * (D / 32);
  const u32 word = D == 64 ? u32(*reinterpret_cast<const u16*>(p)) : reinterpret_cast<const u32*>(p)[(2 * w) >> 2];
  const int k = (2 * w) & 3;
  return prmt(word, 0u, k | (k << 4) | ((k + 1) << 8) | ((k + 1) << 12));
}
// 3-bit V: thread g's D/8 third bits of a token (at byte D/4 + g D/64 of the row), zero-extended.
__device__ __forceinline__ u32 v_third(const u8* row, int g) {
  const u8* p = row + D / 4 + g * (D / 64);
  if (D == 64) return *p;
  if (D == 128) return *reinterpret_cast<const u16*>(p);
  return *reinterpret_cast<const u32*>(p);
}
// Byte k of a and of b into bytes 0 and 2 (bits (s, s + 16) of the result: bit s of each byte).
__device__ __forceinline__ u32 byte_pair(u32 a, u32 b, int k) {
  return prmt(a, b, k | (k << 4) | ((4 + k) << 8) | ((4 + k) << 12));
}
__device__ __forceinline__ void mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ u32 smem_addr(const void* p) {
  u32 a;
  asm("{.reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t;}" : "=r"(a) : "l"(p));
  return a;
}
__device__ __forceinline__ void cp_async(u32 dst, const void* src) {
#if CHUNK == 16
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src));
#else
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src));
#endif
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

// State of one warp: the online softmax of its (up to 8 * NT) query heads over its tokens.
struct Acc {
  float o[KSTEPS][NT][4];  // O^T fragments: (dim 2mt / 2mt+1 of the thread's D/8, heads 2t, 2t+1)
  float m[NT][2], l[NT][2], z[NT][2];  // running max (log2), partial sum, partial sum p * v_zero
  float r[NT][2];                      // VRAW: partial sum of p * v_scale as rounded to fp16 (R)
};

// Scores in the C layout -> online softmax update, p * v_scale transposed to the B layout, V mma.
// s[nt][4]: (token g, heads 2t, 2t+1), (token g+8, ...); vs/vz: v scale and zero of tokens g, g+8.
// va[KSTEPS][4]: V^T A fragments of this tile. RAW: va holds raw codes (VRAW), R is kept.
template <bool RAW>
__device__ __forceinline__ void softmax_pv(Acc& acc, float (*s)[4], float vs0, float vs8, float vz0, float vz8,
                                           const u32 (*va)[4], int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < NT; nt++) {
    u32 x[2];
    float alpha[2];
    bool grew = false;
#pragma unroll
    for (int i = 0; i < 2; i++) {
      float mx = fmaxf(s[nt][i], s[nt][2 + i]);
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
      const float m_new = fmaxf(acc.m[nt][i], mx);
      const float m_use = m_new == NEG_INF ? 0.f : m_new;
      grew |= m_new > acc.m[nt][i];
      alpha[i] = ex2(acc.m[nt][i] - m_use);
      const float p0 = ex2(s[nt][i] - m_use), p8 = ex2(s[nt][2 + i] - m_use);
      acc.m[nt][i] = m_new;
      acc.l[nt][i] = acc.l[nt][i] * alpha[i] + p0 + p8;
      acc.z[nt][i] = acc.z[nt][i] * alpha[i] + p0 * vz0 + p8 * vz8;
      x[i] = pack2(p0 * vs0, p8 * vs8);  // head 2t+i: tokens (g, g+8)
      if constexpr (RAW) acc.r[nt][i] = acc.r[nt][i] * alpha[i] + lo_f(x[i]) + hi_f(x[i]);
    }
    // the output is rescaled only when some head's running max grew (rare after the first tiles: alpha is 1 else)
    if (__any_sync(0xffffffffu, grew)) {
#pragma unroll
      for (int mt = 0; mt < KSTEPS; mt++) {
        acc.o[mt][nt][0] *= alpha[0];
        acc.o[mt][nt][1] *= alpha[1];
        acc.o[mt][nt][2] *= alpha[0];
        acc.o[mt][nt][3] *= alpha[1];
      }
    }
    // B fragment for head n = g: b0 = tokens (2t, 2t+8) from lane (2t)*4 + g/2, b1 = (2t+1, 2t+9)
    const int src0 = (2 * t) * 4 + (g >> 1), src1 = (2 * t + 1) * 4 + (g >> 1);
    const u32 y00 = __shfl_sync(0xffffffffu, x[0], src0), y01 = __shfl_sync(0xffffffffu, x[1], src0);
    const u32 y10 = __shfl_sync(0xffffffffu, x[0], src1), y11 = __shfl_sync(0xffffffffu, x[1], src1);
    const u32 b0 = (g & 1) ? y01 : y00, b1 = (g & 1) ? y11 : y10;
#pragma unroll
    for (int mt = 0; mt < KSTEPS; mt++) mma(acc.o[mt][nt], va[mt][0], va[mt][1], va[mt][2], va[mt][3], b0, b1);
  }
}

// Element e of a thread's K fragments from 16-bit values given as words of two (dims 2i, 2i + 1).
__device__ __forceinline__ u32 q_pair(const u32* words, int e) {
  if (KADJ) return words[e];  // dims 2e, 2e + 1
  const int w = e / KPAIRS, s = e % KPAIRS, a = 2 * KPAIRS * w + s;
  return prmt(words[a >> 1], words[(a + KPAIRS) >> 1], (s & 1) ? 0x7632 : 0x5410);
}

// Q B fragments of head n (nt*8 + g), its dims [t*D/4, (t+1)*D/4) paired as K's codes are: dims (a, a + KPAIRS),
// a = 2 KPAIRS w + s, are fragment element e = KPAIRS w + s (`q_pair`).
// q (fp16, or bf16 with OUT_BF16; f32: float32) is scaled here by qscale (the softmax scale times log2(e)) and
// rounded to fp16 once; sums[nt] gets the sum of head n's rounded values (for the zero points). RAW (KRAW): element e
// meets a raw pair (`raw_pair(KBITS, e % KPAIRS)`: codes at 2^j) is scaled by 2^-j; offs[nt] gets 1024 sum(scaled).
template <bool RAW>
__device__ __forceinline__ void load_q(u32 (*qf)[KSTEPS][2], const void* q, bool f32, int lane, float qscale,
                                       float* sums, float* offs) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < NT; nt++) {
    const int n = nt * 8 + g;
    const u32* row = reinterpret_cast<const u32*>(q) + (n * D + t * (D / 4)) / 2;
    const float2* row32 = reinterpret_cast<const float2*>(q) + (n * D + t * (D / 4)) / 2;
    u32 words[D / 8];
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < D / 8; j++) {
      float lo = 0.f, hi = 0.f;
      if (n < GQA && f32) {
        const float2 v = row32[j];
        lo = v.x, hi = v.y;
      } else if (n < GQA) {
        const u32 v = row[j];
#if OUT_BF16
        lo = __uint_as_float(v << 16), hi = __uint_as_float(v & 0xFFFF0000u);
#else
        lo = lo_f(v), hi = hi_f(v);
#endif
      }
      words[j] = pack2(lo * qscale, hi * qscale);
      sum += lo_f(words[j]) + hi_f(words[j]);
    }
    float off = 0.f;
#pragma unroll
    for (int e = 0; e < 2 * KSTEPS; e++) {
      u32 x = q_pair(words, e);
      if constexpr (RAW) {
        if (raw_pair(KBITS, e % KPAIRS)) {
          x = hfma2(x, pow2_neg(raw_shift(KBITS, e % KPAIRS)), 0x80008000u);  // x 2^-j (+ -0: exact)
          off += 1024.f * (lo_f(x) + hi_f(x));
        }
      }
      qf[nt][e >> 1][e & 1] = x;
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sums[nt] = sum + __shfl_xor_sync(0xffffffffu, sum, 2);  // head n's sum, in every lane of group g
    if constexpr (RAW) {
      off += __shfl_xor_sync(0xffffffffu, off, 1);
      offs[nt] = off + __shfl_xor_sync(0xffffffffu, off, 2);
    }
  }
}

// Two accumulators per n-tile: the K steps alternate between them, so two mma chains of D / 32 run side by side
// instead of one of D / 16 (each mma waits for the previous one of its chain).
__device__ __forceinline__ void scores(float (*s)[4], const u32 (*h0)[2], const u32 (*h8)[2],
                                       const u32 (*qf)[KSTEPS][2]) {
#pragma unroll
  for (int nt = 0; nt < NT; nt++) {
    float odd[4] = {0.f, 0.f, 0.f, 0.f};
    s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int j = 0; j < KSTEPS; j++)
      mma(j & 1 ? odd : s[nt], h0[j][0], h8[j][0], h0[j][1], h8[j][1], qf[nt][j][0], qf[nt][j][1]);
#pragma unroll
    for (int c = 0; c < 4; c++) s[nt][c] += odd[c];
  }
}

#if MINB > 0  // a register cap: MINB CTAs of HG warps per SM
#define BOUNDS __launch_bounds__(32 * HG, MINB)
#else
#define BOUNDS __launch_bounds__(32 * HG)
#endif

extern "C" __global__ void BOUNDS kvpack_cuda_decode(
    const void* __restrict__ q_keys,    // (B, HQ, D): the query in the keys' basis (float32 if rotated, else as given)
    const u16* __restrict__ q_window,   // (B, HQ, D) query dtype: the query as given (the 16-bit window's keys)
    const u8* __restrict__ k_cache, const u8* __restrict__ v_cache,  // (num_blocks, BLOCK_SIZE, HKV, K_ROW / V_ROW)
    const int* __restrict__ block_tables, const int* __restrict__ seq_lens, const u16* __restrict__ wk,
    const u16* __restrict__ wv,         // (B, W, HKV, D) fp16
    const int* __restrict__ window_lens, float* __restrict__ part_m, float* __restrict__ part_l,
    float* __restrict__ part_acc,       // (B, HQ, S + 1) and (B, HQ, S + 1, D)
    const u16* __restrict__ k_codebook, const u16* __restrict__ v_codebook,  // turbo_mse: fp16 (2^bits,); else unused
    int num_blocks, int max_blocks, int window, int tokens_per_split, int num_splits, int window_per_split,
    int num_parts, int q_keys_f32, float qscale) {
  extern __shared__ __align__(16) u8 smem[];
  const int split = blockIdx.x, hg = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int h = hg * HG + warp;  // this warp's KV head
  const int HQ = HKV * GQA;
  Acc acc;
#pragma unroll
  for (int nt = 0; nt < NT; nt++) {
#pragma unroll
    for (int i = 0; i < 2; i++) acc.m[nt][i] = NEG_INF, acc.l[nt][i] = 0.f, acc.z[nt][i] = 0.f, acc.r[nt][i] = 0.f;
#pragma unroll
    for (int mt = 0; mt < KSTEPS; mt++) acc.o[mt][nt][0] = acc.o[mt][nt][1] = acc.o[mt][nt][2] = acc.o[mt][nt][3] = 0.f;
  }
  u32 qf[NT][KSTEPS][2];
  float qs[NT][2], qc[NT][2];  // per C-layout head: sum of q (zero points), 1024 sum(q') (KRAW)
  const int qbase = (b * HQ + h * GQA);
  if (split < num_splits) {
    // turbo_mse tables, built from the codebooks once per CTA (the first tile's barrier publishes them)
    u32* ktab = reinterpret_cast<u32*>(smem + TAB_OFFSET);
    u32* vtab = ktab + KTAB;
    const u32 klane_off = 4u * (lane & (KREP - 1)), vlane_off = 4u * (lane & (VREP - 1));  // this lane's copy
#if KTAB > 0
    build_table<KBITS, KREP, KTAB>(ktab, k_codebook);
#endif
#if VTAB > 0
    build_table<VBITS, VREP, VTAB>(vtab, v_codebook);
#endif
    // scale and zero factors of the norm (turbo_mse 1 bit: c0 + c (c1 - c0); more bits: the table's values)
    float ksa = 1.f, ksz = 0.f, vsa = 1.f, vsz = 0.f;
#if KKIND == 1 && KBITS == 1
    ksz = lo_f(k_codebook[0]), ksa = lo_f(k_codebook[1]) - ksz;
#endif
#if VKIND == 1 && VBITS == 1
    vsz = lo_f(v_codebook[0]), vsa = lo_f(v_codebook[1]) - vsz;
#endif
    float sums[NT], offs[NT];
    load_q<KRAW>(qf, reinterpret_cast<const u8*>(q_keys) + (long long)qbase * D * (q_keys_f32 ? 4 : 2), q_keys_f32,
                 lane, qscale, sums, offs);
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
      for (int i = 0; i < 2; i++) {
        const int n = nt * 8 + 2 * t + i;  // the C layout's head of this lane: its sum sits in lanes 4n..4n+3
        const float raw_sum = __shfl_sync(0xffffffffu, sums[nt], 4 * (2 * t + i));
        qs[nt][i] = n >= GQA ? 0.f : raw_sum;
#if KRAW
        qc[nt][i] = __shfl_sync(0xffffffffu, offs[nt], 4 * (2 * t + i));
#else
        qc[nt][i] = 0.f;
#endif
      }
    // device-side clamp: the launcher validates outside graph capture; a bad length never reads past the table
    const int seq_len = min(max(seq_lens[b], 0), max_blocks * BLOCK_SIZE);
    const int start = split * tokens_per_split;
    const int end = min(start + tokens_per_split, seq_len);
    const int n_tiles = end > start ? (end - start + 15) / 16 : 0;
    const int* bt = block_tables + (long long)b * max_blocks;
    const u32 sbase = smem_addr(smem);
    // The chunks this thread copies of every tile are the same; only the page moves. 2 HG threads per token, thread
    // w0 of a token copies its chunks w0, w0 + 2 HG, ...: one base offset in the pool and one in shared memory, the
    // chunks at immediate offsets from them (one LDGSTS each; chunk indices over the whole tile cost a division by
    // the row's chunks, which ptxas redid in every tile: ~60 of the loop's ~425 instructions at head_dim 128).
    constexpr int TPT = 2 * HG;  // threads per token
    constexpr int K_PER_TOKEN = HG * K_ROW / CHUNK, V_PER_TOKEN = HG * V_ROW / CHUNK;
    constexpr int K_PER_THREAD = (K_PER_TOKEN + TPT - 1) / TPT, V_PER_THREAD = (V_PER_TOKEN + TPT - 1) / TPT;
    const int copy_tok = threadIdx.x / TPT, w0 = threadIdx.x % TPT;
    // the pools as seen from this thread's first chunk of this CTA's heads: a tile at page blk, token offset
    // `within` of it, starts at k_base + blk * K_PAGE + within * HKV * K_ROW
    constexpr long long K_PAGE = (long long)BLOCK_SIZE * HKV * K_ROW, V_PAGE = (long long)BLOCK_SIZE * HKV * V_ROW;
    const u8* const k_base = k_cache + (hg * HG * K_ROW + copy_tok * HKV * K_ROW + w0 * CHUNK);
    const u8* const v_base = v_cache + (hg * HG * V_ROW + copy_tok * HKV * V_ROW + w0 * CHUNK);
    const u32 k_dst = copy_tok * HG * K_ROW + w0 * CHUNK, v_dst = K_TILE + copy_tok * HG * V_ROW + w0 * CHUNK;
    // the last chunk of a thread exists where the token's chunks reach it
    const bool k_last = w0 + (K_PER_THREAD - 1) * TPT < K_PER_TOKEN;
    const bool v_last = w0 + (V_PER_THREAD - 1) * TPT < V_PER_TOKEN;
    constexpr u32 TILES_PER_PAGE = BLOCK_SIZE / 16;
    const u32 first_tile = u32(start) / 16;  // start: a multiple of 16
    // block ids are read one tile before their copy is issued: the table load's latency hides behind a tile
    auto block_of = [&](int i) {
      return min(max(bt[(first_tile + u32(i)) / TILES_PER_PAGE], 0), num_blocks - 1);
    };
    int next_blk = n_tiles > 0 ? block_of(0) : 0;
    auto issue = [&](int i) {
      if (i < n_tiles) {
        const int blk = next_blk;
        if (i + 1 < n_tiles) next_blk = block_of(i + 1);
        const u32 within = (first_tile + u32(i)) % TILES_PER_PAGE * 16 * HKV;  // 0 for 16-token pages
        const u8* kp = k_base + blk * K_PAGE + within * K_ROW;
        const u8* vp = v_base + blk * V_PAGE + within * V_ROW;
        // opaque to the compiler: each chunk's address is then an immediate offset from kp / vp, not a wide product
        // of the row re-derived per chunk (sm_90 SASS: ~90 -> ~40 instructions to issue a tile)
        asm("" : "+l"(kp), "+l"(vp));
        const u32 dst = sbase + (i % STAGES) * STAGE_BYTES;
#pragma unroll
        for (int j = 0; j < K_PER_THREAD; j++)
          if (j + 1 < K_PER_THREAD || k_last) cp_async(dst + k_dst + j * TPT * CHUNK, kp + j * TPT * CHUNK);
#pragma unroll
        for (int j = 0; j < V_PER_THREAD; j++)
          if (j + 1 < V_PER_THREAD || v_last) cp_async(dst + v_dst + j * TPT * CHUNK, vp + j * TPT * CHUNK);
      }
      cp_commit();
    };
#pragma unroll
    for (int i = 0; i < STAGES - 1; i++) issue(i);
    for (int i = 0; i < n_tiles; i++) {
      cp_wait<STAGES - 2>();
      __syncthreads();
      issue(i + STAGES - 1);  // into the stage every warp finished reading before the barrier
      const u8* ks = smem + (i % STAGES) * STAGE_BYTES;
      const u8* vs = ks + K_TILE;
      const int valid = end - (start + 16 * i);  // tokens of this tile inside the split
      // K: tokens g, g+8, words [t*KWORDS, ...) of the codes
      u32 h0[KSTEPS][2], h8[KSTEPS][2];
      const u32* k0 = reinterpret_cast<const u32*>(ks + (g * HG + warp) * K_ROW);
      const u32* k8 = reinterpret_cast<const u32*>(ks + ((g + 8) * HG + warp) * K_ROW);
#pragma unroll
      for (int w = 0; w < KWORDS; w++) {  // fragment elements e = KPAIRS w + s
        u32 y0 = 0u, y8 = 0u;
#if KBITS == 3
        y0 = k_third(k0, t, w), y8 = k_third(k8, t, w);
#endif
#if KADJ
        decode_bytes<KREP>(k0[t * KWORDS + w], &h0[0][0] + KPAIRS * w, ktab, klane_off);
        decode_bytes<KREP>(k8[t * KWORDS + w], &h8[0][0] + KPAIRS * w, ktab, klane_off);
#else
        decode_codes<KKIND, KBITS, KREP, KRAW>(k0[t * KWORDS + w], y0, &h0[0][0] + KPAIRS * w, ktab, klane_off);
        decode_codes<KKIND, KBITS, KREP, KRAW>(k8[t * KWORDS + w], y8, &h8[0][0] + KPAIRS * w, ktab, klane_off);
#endif
      }
      const u32 ksd0 = k0[K_CODE / 4], ksd8 = k8[K_CODE / 4];
      float s[NT][4];
      scores(s, h0, h8, qf);
      float ka0, kz0, ka8, kz8;
      side<KKIND>(ksd0, ksa, ksz, ka0, kz0);
      side<KKIND>(ksd8, ksa, ksz, ka8, kz8);
      const bool ok0 = g < valid, ok8 = g + 8 < valid;
#pragma unroll
      for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int i = 0; i < 2; i++) {
          s[nt][i] = ok0 ? (s[nt][i] - qc[nt][i]) * ka0 + kz0 * qs[nt][i] : NEG_INF;
          s[nt][2 + i] = ok8 ? (s[nt][2 + i] - qc[nt][i]) * ka8 + kz8 * qs[nt][i] : NEG_INF;
        }
      const u32 vsd0 = *reinterpret_cast<const u32*>(vs + (g * HG + warp) * V_ROW + V_CODE);
      const u32 vsd8 = *reinterpret_cast<const u32*>(vs + ((g + 8) * HG + warp) * V_ROW + V_CODE);
      float va0, vz0, va8, vz8;
      side<VKIND>(vsd0, vsa, vsz, va0, vz0);
      side<VKIND>(vsd8, vsa, vsz, va8, vz8);
      if (!ok0) va0 = vz0 = 0.f;
      if (!ok8) va8 = vz8 = 0.f;
      // V: tokens (2t, 2t+8) and (2t+1, 2t+9), dims [g*D/8, (g+1)*D/8): the low halves of a word of each token
      // (prmt) make local dims L = 2 VPAIRS w + s, the high halves L = 2 VPAIRS w + VPAIRS + s
      u32 va[KSTEPS][4];
#pragma unroll
      for (int pr = 0; pr < 2; pr++) {
        const u8* ra = vs + ((2 * t + pr) * HG + warp) * V_ROW;
        const u8* rb = vs + ((2 * t + 8 + pr) * HG + warp) * V_ROW;
#if VBITS == 3
        const u32 ta = v_third(ra, g), tb = v_third(rb, g);
#else
        const u32 ta = 0u, tb = 0u;
#endif
#if VWORDS == 0  // 8 or 16 main-plane bits per thread and token (head_dim 64 at 1 or 2 bits): one merged word
        u32 h[VPAIRS];
        const u32 a = VTB == 16 ? u32(reinterpret_cast<const u16*>(ra)[g]) : u32(ra[g]);
        const u32 bb = VTB == 16 ? u32(reinterpret_cast<const u16*>(rb)[g]) : u32(rb[g]);
        decode_codes<VKIND, VBITS, VREP, VRAW>(a | (bb << 16), byte_pair(ta, tb, 0), h, vtab, vlane_off);
#pragma unroll
        for (int L = 0; L < (VPAIRS < D / 8 ? VPAIRS : D / 8); L++) va[L >> 1][2 * pr + (L & 1)] = h[L];
#else
#pragma unroll
        for (int w = 0; w < VWORDS; w++) {
          const u32 a = reinterpret_cast<const u32*>(ra)[g * VWORDS + w];
          const u32 bb = reinterpret_cast<const u32*>(rb)[g * VWORDS + w];
          u32 lo[VPAIRS], hi[VPAIRS];
          decode_codes<VKIND, VBITS, VREP, VRAW>(prmt(a, bb, 0x5410), byte_pair(ta, tb, 2 * w), lo, vtab, vlane_off);
          decode_codes<VKIND, VBITS, VREP, VRAW>(prmt(a, bb, 0x7632), byte_pair(ta, tb, 2 * w + 1), hi, vtab,
                                                 vlane_off);
#pragma unroll
          for (int sft = 0; sft < VPAIRS; sft++) {
            const int l0 = 2 * VPAIRS * w + sft, l1 = l0 + VPAIRS;
            va[l0 >> 1][2 * pr + (l0 & 1)] = lo[sft];
            va[l1 >> 1][2 * pr + (l1 & 1)] = hi[sft];
          }
        }
#endif
      }
      softmax_pv<VRAW>(acc, s, va0, va8, vz0, vz8, va, lane);
    }
    cp_wait<0>();
  } else {
    float sums[NT];
    load_q<false>(qf, q_window + qbase * D, false, lane, qscale, sums, nullptr);
    const int w_begin = (split - num_splits) * window_per_split;
    const int wl = min(min(max(window_lens[b], 0), window), w_begin + window_per_split);
    for (int t0 = w_begin; t0 < wl; t0 += 16) {
      const int valid = wl - t0;
      const bool ok0 = g < valid, ok8 = g + 8 < valid;
      // K rows g, g+8: dims [t*D/4, ...) as D/8 words; pairs (8w+s, 8w+s+4)
      u32 h0[KSTEPS][2], h8[KSTEPS][2];
      const u32* r0 = reinterpret_cast<const u32*>(wk + (((long long)b * window + t0 + g) * HKV + h) * D + t * (D / 4));
      const u32* r8 = reinterpret_cast<const u32*>(wk + (((long long)b * window + t0 + g + 8) * HKV + h) * D + t * (D / 4));
#pragma unroll
      for (int e = 0; e < 2 * KSTEPS; e++) {
        h0[e >> 1][e & 1] = ok0 ? q_pair(r0, e) : 0u;
        h8[e >> 1][e & 1] = ok8 ? q_pair(r8, e) : 0u;
      }
      float s[NT][4];
      scores(s, h0, h8, qf);
#pragma unroll
      for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int i = 0; i < 2; i++) {
          if (!ok0) s[nt][i] = NEG_INF;
          if (!ok8) s[nt][2 + i] = NEG_INF;
        }
      u32 va[KSTEPS][4];
#pragma unroll
      for (int pr = 0; pr < 2; pr++) {
        const int ta = 2 * t + pr, tb = 2 * t + 8 + pr;
        const bool oka = ta < valid, okb = tb < valid;
        const u32* ra = reinterpret_cast<const u32*>(wv + (((long long)b * window + t0 + ta) * HKV + h) * D + g * (D / 8));
        const u32* rb = reinterpret_cast<const u32*>(wv + (((long long)b * window + t0 + tb) * HKV + h) * D + g * (D / 8));
#pragma unroll
        for (int L = 0; L < D / 8; L += 2) {  // dims L, L+1 of token a and b: one word each
          const u32 a = oka ? ra[L >> 1] : 0u, bb = okb ? rb[L >> 1] : 0u;
          va[L >> 1][2 * pr] = prmt(a, bb, 0x5410);
          va[L >> 1][2 * pr + 1] = prmt(a, bb, 0x7632);
        }
      }
      softmax_pv<false>(acc, s, ok0 ? 1.f : 0.f, ok8 ? 1.f : 0.f, 0.f, 0.f, va, lane);
    }
  }
  // finish: sums over the 8 token lanes, then the zero term into every dim, then store the partials
#pragma unroll
  for (int nt = 0; nt < NT; nt++)
#pragma unroll
    for (int i = 0; i < 2; i++) {
#pragma unroll
      for (int x = 4; x < 32; x <<= 1) {
        acc.l[nt][i] += __shfl_xor_sync(0xffffffffu, acc.l[nt][i], x);
        acc.z[nt][i] += __shfl_xor_sync(0xffffffffu, acc.z[nt][i], x);
#if VRAW
        acc.r[nt][i] += __shfl_xor_sync(0xffffffffu, acc.r[nt][i], x);
#endif
      }
    }
  const int S1 = num_parts;
#pragma unroll
  for (int nt = 0; nt < NT; nt++)
#pragma unroll
    for (int i = 0; i < 2; i++) {
      const int n = nt * 8 + 2 * t + i;
      if (n >= GQA) continue;
      const long long part = (long long)(qbase + n) * S1 + split;
      if (g == 0) {
        part_m[part] = acc.m[nt][i];
        part_l[part] = acc.l[nt][i];
      }
      float* dst = part_acc + part * D + g * (D / 8);
#if VRAW
      const bool raw = split < num_splits;  // the window's CTAs hold fp16 values
      const float r1024 = raw ? 1024.f * acc.r[nt][i] : 0.f;
#pragma unroll
      for (int mt = 0; mt < KSTEPS; mt++) {  // local dims 2 mt, 2 mt + 1: raw pairs' codes at 2^j
        const int s0 = (2 * mt) % VPAIRS, s1 = (2 * mt + 1) % VPAIRS;
        const bool raw0 = raw && raw_pair(VBITS, s0), raw1 = raw && raw_pair(VBITS, s1);
        const float f0 = raw0 ? __uint_as_float(u32(127 - raw_shift(VBITS, s0)) << 23) : 1.f;
        const float f1 = raw1 ? __uint_as_float(u32(127 - raw_shift(VBITS, s1)) << 23) : 1.f;
        dst[2 * mt] = (acc.o[mt][nt][i] - (raw0 ? r1024 : 0.f)) * f0 + acc.z[nt][i];
        dst[2 * mt + 1] = (acc.o[mt][nt][2 + i] - (raw1 ? r1024 : 0.f)) * f1 + acc.z[nt][i];
      }
#else
#pragma unroll
      for (int mt = 0; mt < KSTEPS; mt++) {
        dst[2 * mt] = acc.o[mt][nt][i] + acc.z[nt][i];
        dst[2 * mt + 1] = acc.o[mt][nt][2 + i] + acc.z[nt][i];
      }
#endif
    }
}

// Merge the splits of one (query head, sequence): RW warps, warp w taking parts w, w + RW, ... (lane: D / 32
// consecutive dims, one vector load per part), then a sum over the warps in shared memory. Parts [0, num_splits) are
// the packed tokens', the rest the window's. Rotated values (unrot: M_v.T, float32 (D, D); else null): the packed
// sum p goes back to the values' basis here, out = p @ unrot + window sum, the 32 RW threads splitting the D x D
// products (one GEMM and a copy after the kernel were 3 launches per layer). (One thread per dim looping over every
// split was latency-bound at batch 1: ~130 splits in a row.)
#define RW 8
#define DL (D / 32)
#define UPARTS ((32 * RW) / D)  // threads per output dim in the unrotation (4, 2, 1 at head_dim 64, 128, 256)
__device__ __forceinline__ u16 to_out(float v) {
  u16 r;
#if OUT_BF16
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(v));
#else
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(v));
#endif
  return r;
}
// The largest running max of a (query head, sequence)'s parts (part_m: its first), in every thread of the RW warps.
__device__ __forceinline__ float parts_max(const float* __restrict__ part_m, int parts) {
  __shared__ float s_m[RW];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float m = NEG_INF;
  for (int s = threadIdx.x; s < parts; s += 32 * RW) m = fmaxf(m, part_m[s]);
#pragma unroll
  for (int x = 16; x; x >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, x));
  if (lane == 0) s_m[warp] = m;
  __syncthreads();
  float m_all = s_m[0];
#pragma unroll
  for (int w = 1; w < RW; w++) m_all = fmaxf(m_all, s_m[w]);
  return m_all;
}
extern "C" __global__ void __launch_bounds__(32 * RW) kvpack_cuda_reduce(
    const float* __restrict__ part_m, const float* __restrict__ part_l, const float* __restrict__ part_acc,
    const float* __restrict__ unrot, u16* __restrict__ out, int hq, int num_splits, int parts) {
  __shared__ float s_acc[2][RW][D];
  __shared__ float s_l[RW];
  const int qh = blockIdx.x, b = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const long long base = ((long long)b * hq + qh) * parts;
  const float m_all = parts_max(part_m + base, parts);
  float l = 0.f, a[2][DL];
#pragma unroll
  for (int i = 0; i < DL; i++) a[0][i] = a[1][i] = 0.f;
#pragma unroll 16  // loads of 16 parts in flight per warp (with 4: ~9 dependent rounds over batch 1's ~260 parts)
  for (int s = warp; s < parts; s += RW) {
    const float w = ex2(part_m[base + s] - m_all);
    l += w * part_l[base + s];
    const float* src = part_acc + (base + s) * D + lane * DL;
    float v[DL];
#pragma unroll
    for (int i = 0; i < DL; i += 2) {
      const float2 x = *reinterpret_cast<const float2*>(src + i);
      v[i] = w * x.x, v[i + 1] = w * x.y;
    }
    const bool win = s >= num_splits;
#pragma unroll
    for (int i = 0; i < DL; i++) {
      a[0][i] += win ? 0.f : v[i];
      a[1][i] += win ? v[i] : 0.f;
    }
  }
#pragma unroll
  for (int i = 0; i < DL; i++) s_acc[0][warp][lane * DL + i] = a[0][i], s_acc[1][warp][lane * DL + i] = a[1][i];
  if (lane == 0) s_l[warp] = l;
  __syncthreads();
  float l_all = 0.f;
#pragma unroll
  for (int w = 0; w < RW; w++) l_all += s_l[w];
  const long long o = ((long long)b * hq + qh) * D;
  if (unrot == nullptr) {
    for (int d = threadIdx.x; d < D; d += 32 * RW) {
      float sa = 0.f, sw = 0.f;
#pragma unroll
      for (int w = 0; w < RW; w++) sa += s_acc[0][w][d], sw += s_acc[1][w][d];
      out[o + d] = to_out((sa + sw) / l_all);
    }
    return;
  }
  float sa = 0.f, sw = 0.f;  // D <= 32 RW: one dim per thread of the first D
  const int d = threadIdx.x;
  if (d < D) {
#pragma unroll
    for (int w = 0; w < RW; w++) sa += s_acc[0][w][d], sw += s_acc[1][w][d];
  }
  __syncthreads();  // s_acc is reused: row 0 of stream 0 the packed sum, stream 1 the unrotation's partial sums
  float* packed = s_acc[0][0];
  float(*partial)[D] = s_acc[1];
  if (d < D) packed[d] = sa / l_all;
  __syncthreads();
  const int col = threadIdx.x % D, part = threadIdx.x / D;  // thread (col, part): rows part, part + UPARTS, ...
  float u = 0.f;
#pragma unroll 8
  for (int j = part; j < D; j += UPARTS) u += packed[j] * unrot[j * D + col];
  partial[part][col] = u;
  __syncthreads();
  if (d < D) {
    float v = sw / l_all;
#pragma unroll
    for (int p = 0; p < UPARTS; p++) v += partial[p][d];
    out[o + d] = to_out(v);
  }
}

// The merge of unrotated values where few (query head, sequence) pairs leave SMs idle: CTA (qh, b, c) takes dims
// [32 c, 32 c + 32) (lane = dim), warp w the parts w, w + RW, ...: D / 32 times the CTAs of kvpack_cuda_reduce, each
// reading D / 32 times fewer bytes (batch 1: 32 CTAs of kvpack_cuda_reduce on 132 SMs took 7.6 us per layer).
extern "C" __global__ void __launch_bounds__(32 * RW) kvpack_cuda_reduce_dims(
    const float* __restrict__ part_m, const float* __restrict__ part_l, const float* __restrict__ part_acc,
    u16* __restrict__ out, int hq, int parts) {
  __shared__ float s_acc[RW][32];
  __shared__ float s_l[RW];
  const int qh = blockIdx.x, b = blockIdx.y, d = 32 * blockIdx.z + (threadIdx.x & 31);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const long long base = ((long long)b * hq + qh) * parts;
  const float m_all = parts_max(part_m + base, parts);
  float l = 0.f, a = 0.f;
#pragma unroll 16  // loads of 16 parts in flight per warp (with 4: ~9 dependent rounds over batch 1's ~260 parts)
  for (int s = warp; s < parts; s += RW) {
    const float w = ex2(part_m[base + s] - m_all);
    l += w * part_l[base + s];
    a += w * part_acc[(base + s) * D + d];
  }
  s_acc[warp][lane] = a;
  if (lane == 0) s_l[warp] = l;
  __syncthreads();
  if (warp == 0) {
    float sum = 0.f, l_all = 0.f;
#pragma unroll
    for (int w = 0; w < RW; w++) sum += s_acc[w][lane], l_all += s_l[w];
    out[((long long)b * hq + qh) * D + d] = to_out(sum / l_all);
  }
}

// The query in the keys' basis, q @ M (M the keys' rotation, (D, D) float32 or float16 by m_f32; q the query's
// dtype), float32 out: RQ rows per CTA of 8 warps; warp w takes rows j in [w D / 8, (w + 1) D / 8) of M, lane l
// the D / 32 columns from l D / 32 (one vector load per row j), then the 8 warps' partial sums meet in shared
// memory (a cast, a GEMM and its split-K reduce were 3 launches per layer; one thread per column looping over all
// of M was latency-bound: 16 us at batch 1).
#define RQ 4
#define QW 8            // warps of the rotation kernel
#define QC (D / 32)     // columns per lane
#define QJ (D / QW)     // rows of M per warp
extern "C" __global__ void __launch_bounds__(32 * QW) kvpack_rotate_query(
    const u16* __restrict__ q, const void* __restrict__ rot, float* __restrict__ q_out, int rows, int m_f32) {
  __shared__ float s_q[RQ][D];
  __shared__ float s_part[QW][RQ][D];
  const int r0 = blockIdx.x * RQ, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int i = threadIdx.x; i < RQ * D; i += 32 * QW) {
    const int r = r0 + i / D;
    float x = 0.f;
    if (r < rows) {
      const u16 v = q[(long long)r * D + i % D];
#if OUT_BF16
      x = __uint_as_float(u32(v) << 16);
#else
      x = lo_f(u32(v));
#endif
    }
    s_q[i / D][i % D] = x;
  }
  __syncthreads();
  float acc[RQ][QC];
#pragma unroll
  for (int r = 0; r < RQ; r++)
#pragma unroll
    for (int c = 0; c < QC; c++) acc[r][c] = 0.f;
  const int c0 = lane * QC;
#pragma unroll 4
  for (int jj = 0; jj < QJ; jj++) {
    const int j = warp * QJ + jj;
    float m[QC];
    if (m_f32) {
      const float* src = reinterpret_cast<const float*>(rot) + j * D + c0;
#pragma unroll
      for (int c = 0; c < QC; c += 2) {
        const float2 x = *reinterpret_cast<const float2*>(src + c);
        m[c] = x.x, m[c + 1] = x.y;
      }
    } else {
      const u32* src = reinterpret_cast<const u32*>(reinterpret_cast<const u16*>(rot) + j * D + c0);
#pragma unroll
      for (int c = 0; c < QC; c += 2) {
        const u32 x = src[c / 2];
        m[c] = lo_f(x), m[c + 1] = hi_f(x);
      }
    }
#pragma unroll
    for (int r = 0; r < RQ; r++) {
      const float qv = s_q[r][j];
#pragma unroll
      for (int c = 0; c < QC; c++) acc[r][c] += qv * m[c];
    }
  }
#pragma unroll
  for (int r = 0; r < RQ; r++)
#pragma unroll
    for (int c = 0; c < QC; c++) s_part[warp][r][c0 + c] = acc[r][c];
  __syncthreads();
  for (int i = threadIdx.x; i < RQ * D; i += 32 * QW) {
    const int r = i / D, col = i % D;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < QW; w++) v += s_part[w][r][col];
    if (r0 + r < rows) q_out[(long long)(r0 + r) * D + col] = v;
  }
}
