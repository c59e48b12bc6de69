// The AsFT penalty and the AdamW update over a list of fp32 or bf16 tensors in one pass over memory,
// with the next step's <v, p_new - W0> folded in fp64 while the new values are in registers.
//
// Per element (fp32 math, the order of torch.optim.AdamW's for-loop implementation; built with
// -ffp-contract=off so no multiply-add is fused; bf16 inputs widened exactly, bf16 outputs rounded
// to nearest even once, on store, as torch rounds a float to bf16):
//   dW = p - W0;  R = dW - c*v | c*v | dW;  g~ = (g + coef*R, stored in g's dtype) * (maximize ? -1 : 1)
//   p *= 1 - lr*wd;  m = lerp(m, g~, 1 - beta1);  s = s*beta2 + ((1 - beta2)*g~)*g~
//   p += (-lr/bc1 * m) / (sqrt(s)/sqrt(bc2) + eps)
//   dot += (double)(v * (p - W0))          (p as stored; terms in fp32, as the penalty's dW; sums in fp64)
// Each tensor is cut into blocks of kBlock elements from its start (memory order); a block's dot is
// folded over kLanes fixed lanes, and the blocks of a tensor are summed in block order, so the result
// does not depend on the thread count, and `dots` (the same fold without the update) gives the same
// bits. The loops exist twice: portable C++ (the compiler vectorises the update) and, where
// the build targets AVX-512, explicit 16-lane code that folds from registers; both give the same bits
// (tests/test_native.py compares them with NaN, infinities and subnormals in every input).
#include <ATen/Parallel.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kBlock = 1 << 14;  // elements per fold block
constexpr int64_t kSub = 64;         // elements per inner pass: update, then fold (in L1; short enough
                                     // that the fold overlaps the next pass's memory traffic)
constexpr int kLanes = 16;           // fp64 accumulators per block (two vectors of 8)
constexpr int64_t kGrain = 1 << 15;  // fewer elements than this run on the calling thread

enum Penalty : int64_t { kOrthogonal = 0, kParallel = 1, kFull = 2 };

inline float widen(float x) { return x; }
inline float widen(uint16_t x) {  // bf16 -> fp32 is exact: the high half of the bits
  uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// fp32 -> the storage type: bf16 rounded to nearest even, NaN kept a (quiet) NaN, as c10::BFloat16.
template <typename T>
inline T narrow(float x);
template <>
inline float narrow<float>(float x) { return x; }
template <>
inline uint16_t narrow<uint16_t>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return x != x ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(r);
}

struct Item {  // one tensor of the step, pointers at its first element in memory order
  void* p;           // the parameter (fp32 or bf16), and its gradient in the same dtype
  const void* g;
  void* m;           // the moments: fp32, or bf16 with bf16 parameters
  void* s;
  const void* w0;
  const void* v;
  int64_t n;
  int kind;          // 4*storage + 2*(W0 is bf16) + (v is bf16); storage: see `storage_of`
  float c;           // <v, dW>/|v|^2 (unused for "full")
  float neg_step;    // -lr / (1 - beta1^step)
  float bc2_sqrt;    // sqrt(1 - beta2^step)
};

struct Hyper {  // the group's scalars, cast to fp32 as torch casts them
  float decay;     // 1 - lr*wd
  float w1;        // 1 - beta1 (the lerp weight)
  float w1c;       // 1 - w1, for the lerp's high-weight branch
  bool low;        // torch's lerp: w1 < 0.5 ? m + w1*(g - m) : g - (g - m)*(1 - w1)
  float beta2;
  float one_minus_beta2;
  float eps;
  float coef;
  float sign;
};

// Fixed-width vectors (GCC vector extensions; split into narrower registers where the CPU has none
// this wide): 16 fp32, 8 fp64, 16 bf16 bit patterns.
typedef float vf32 __attribute__((vector_size(64)));
typedef double vf64 __attribute__((vector_size(64)));
typedef uint16_t vu16 __attribute__((vector_size(32)));
typedef uint32_t vu32 __attribute__((vector_size(64)));

inline vf32 load16(const float* x) {
  vf32 r;
  std::memcpy(&r, x, sizeof r);
  return r;
}
inline vf32 load16(const uint16_t* x) {  // bf16 -> fp32, exactly
  vu16 h;
  std::memcpy(&h, x, sizeof h);
  return reinterpret_cast<vf32>(__builtin_convertvector(h, vu32) << 16);
}

// Software prefetch (into L1) of every stream kAhead elements ahead: the hardware prefetchers alone
// keep too few of the six streams' lines in flight for one core (measured, 1 thread, 20 x 2.5M fp32,
// torch's fused AdamW = 1: AVX-512 loops 1.27-1.37x without, 1.14-1.16x with; the portable loops
// 1.34x -> 1.20x, and 1.41x -> 1.14x for bf16; 1 KB ahead, or into L2 only, gained less).
constexpr int64_t kAhead = 512;
template <typename... T>
inline void prefetch(int64_t i, const T*... x) {  // addresses as integers: past a tensor's end is fine
  (__builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(x) + i * sizeof(T))), ...);
}

// The fold's accumulators: lane j (lo[j] for j < 8, hi[j - 8] above) sums, in fp64 and in element
// order, the terms of the elements j, j + kLanes, ... counted from the block's start.
struct Lanes {
  vf64 lo = {0, 0, 0, 0, 0, 0, 0, 0}, hi = {0, 0, 0, 0, 0, 0, 0, 0};
  double combine() const {
    const vf64 s = lo + hi;  // lane j + lane j + 8
    return ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
  }
};

// lanes += v*(p - W0) over one inner pass (its length a multiple of kLanes except at a block's
// end): each term in fp32 (the penalty's own dW), accumulated in fp64.
template <typename TP, typename TW, typename TV>
inline void dot_pass(Lanes& lanes, const TP* __restrict p, const TW* __restrict w0, const TV* __restrict v,
                     int64_t len) {
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    const vf32 t = load16(v + i) * (load16(p + i) - load16(w0 + i));
    lanes.lo += __builtin_convertvector(__builtin_shufflevector(t, t, 0, 1, 2, 3, 4, 5, 6, 7), vf64);
    lanes.hi += __builtin_convertvector(__builtin_shufflevector(t, t, 8, 9, 10, 11, 12, 13, 14, 15), vf64);
  }
  for (int j = 0; i < len; ++i, ++j) {
    const double t = static_cast<double>(widen(v[i]) * (widen(p[i]) - widen(w0[i])));
    if (j < 8)
      lanes.lo[j] += t;
    else
      lanes.hi[j - 8] += t;
  }
}

// One inner pass of the update (LOW: torch's lerp branch for a weight below 0.5).
template <int64_t P, bool LOW, typename TP, typename TM, typename TW, typename TV>
inline void update_pass(TP* __restrict pp, const TP* __restrict gg, TM* __restrict mm, TM* __restrict ss,
                        const TW* __restrict ww, const TV* __restrict vv, int64_t len, const Hyper& h,
                        float c, float neg_step, float bc2_sqrt) {
  const float coef = h.coef, sign = h.sign, decay = h.decay, w1 = h.w1, w1c = h.w1c;
  const float beta2 = h.beta2, omb2 = h.one_minus_beta2, eps = h.eps;
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const float w = widen(ww[i]), d = widen(vv[i]), p0 = widen(pp[i]), m0 = widen(mm[i]);
    const float dw = p0 - w;
    const float r = P == kOrthogonal ? dw - c * d : (P == kParallel ? c * d : dw);
    const float g = widen(narrow<TP>(widen(gg[i]) + coef * r)) * sign;  // g~ in the gradient's dtype
    const float m = LOW ? m0 + w1 * (g - m0) : g - (g - m0) * w1c;
    const float s = widen(ss[i]) * beta2 + (omb2 * g) * g;
    const float p = p0 * decay + (neg_step * m) / (std::sqrt(s) / bc2_sqrt + eps);
    mm[i] = narrow<TM>(m);
    ss[i] = narrow<TM>(s);
    pp[i] = narrow<TP>(p);
  }
}

template <int64_t P, typename TP, typename TM, typename TW, typename TV>
double step_block(const Item& t, const Hyper& h, int64_t lo, int64_t hi) {
  Lanes lanes;
  TP* p = static_cast<TP*>(t.p);
  const TP* g = static_cast<const TP*>(t.g);
  TM* m = static_cast<TM*>(t.m);
  TM* s = static_cast<TM*>(t.s);
  const TW* w0 = static_cast<const TW*>(t.w0);
  const TV* v = static_cast<const TV*>(t.v);
  for (int64_t base = lo; base < hi; base += kSub) {
    const int64_t len = std::min(kSub, hi - base);
    for (int64_t j = base + kAhead; j < base + kAhead + kSub; j += 16) prefetch(j, p, g, m, s, w0, v);
    if (h.low)
      update_pass<P, true>(p + base, g + base, m + base, s + base, w0 + base, v + base, len, h, t.c, t.neg_step,
                           t.bc2_sqrt);
    else
      update_pass<P, false>(p + base, g + base, m + base, s + base, w0 + base, v + base, len, h, t.c,
                            t.neg_step, t.bc2_sqrt);
    dot_pass(lanes, p + base, w0 + base, v + base, len);  // p as stored, read back while the pass is in L1
  }
  return lanes.combine();
}

template <typename TP, typename TW, typename TV>
double dot_block(const Item& t, int64_t lo, int64_t hi) {
  Lanes lanes;
  const TP* p = static_cast<const TP*>(t.p);
  const TW* w0 = static_cast<const TW*>(t.w0);
  const TV* v = static_cast<const TV*>(t.v);
  for (int64_t base = lo; base < hi; base += kSub) {
    for (int64_t j = base + kAhead; j < base + kAhead + kSub; j += 16) prefetch(j, p, w0, v);
    dot_pass(lanes, p + base, w0 + base, v + base, std::min(kSub, hi - base));
  }
  return lanes.combine();
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define ASFT_AVX512 1
// The same step and fold, written for AVX-512 (compiled where -march=native has it): one pass per 16
// elements that updates them and folds their terms while the stored values are in registers, so
// nothing is read twice. The arithmetic is the per-element formula above, operation for operation
// (no fused multiply-add, IEEE division and square root), so the results are the portable loops'
// bit for bit; fold lane j still sums the elements j mod 16 of the block in order (`Lanes`). A
// block's tail uses masked loads and stores; fold lanes past the tail are left untouched.
namespace x512 {

template <bool TAIL>
inline __m512 load(const float* x, __mmask16 k) { return TAIL ? _mm512_maskz_loadu_ps(k, x) : _mm512_loadu_ps(x); }
template <bool TAIL>
inline __m512 load(const uint16_t* x, __mmask16 k) {  // bf16 -> fp32, exactly
  const __m256i h = TAIL ? _mm256_maskz_loadu_epi16(k, x) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// `narrow<uint16_t>` of every lane, in the low half of each 32-bit lane.
inline __m512i bf16_bits(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}

template <typename T>
inline __m512 as_stored(__m512 x) {  // widen(narrow<T>(x)) of every lane
  if constexpr (std::is_same_v<T, float>)
    return x;
  else
    return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(x), 16));
}

template <bool TAIL>
inline void store(float* x, __m512 v, __mmask16 k) {
  if (TAIL)
    _mm512_mask_storeu_ps(x, k, v);
  else
    _mm512_storeu_ps(x, v);
}
template <bool TAIL>
inline void store(uint16_t* x, __m512 v, __mmask16 k) {
  const __m256i h = _mm512_cvtepi32_epi16(bf16_bits(v));
  if (TAIL)
    _mm256_mask_storeu_epi16(x, k, h);
  else
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x), h);
}

struct Acc {  // the fold's 16 fp64 lanes: lo = lanes 0-7, hi = lanes 8-15
  __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
  template <bool TAIL>
  void add(__m512 t, __mmask16 k) {  // lanes += the fp32 terms t (only the lanes in k)
    const __m512d a = _mm512_cvtps_pd(_mm512_castps512_ps256(t));
    const __m512d b = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(t), 1)));
    if (TAIL) {
      lo = _mm512_mask_add_pd(lo, static_cast<__mmask8>(k), lo, a);
      hi = _mm512_mask_add_pd(hi, static_cast<__mmask8>(k >> 8), hi, b);
    } else {
      lo = _mm512_add_pd(lo, a);
      hi = _mm512_add_pd(hi, b);
    }
  }
  double combine() const {
    Lanes l;
    std::memcpy(&l.lo, &lo, sizeof lo);
    std::memcpy(&l.hi, &hi, sizeof hi);
    return l.combine();
  }
};

struct Consts {  // the scalars of one tensor's step, broadcast once per block
  __m512 c, coef, sign, w1, w1c, beta2, omb2, bc2_sqrt, eps, decay, neg_step;
  Consts(const Item& t, const Hyper& h)
      : c(_mm512_set1_ps(t.c)), coef(_mm512_set1_ps(h.coef)), sign(_mm512_set1_ps(h.sign)),
        w1(_mm512_set1_ps(h.w1)), w1c(_mm512_set1_ps(h.w1c)), beta2(_mm512_set1_ps(h.beta2)),
        omb2(_mm512_set1_ps(h.one_minus_beta2)), bc2_sqrt(_mm512_set1_ps(t.bc2_sqrt)), eps(_mm512_set1_ps(h.eps)),
        decay(_mm512_set1_ps(h.decay)), neg_step(_mm512_set1_ps(t.neg_step)) {}
};

template <int64_t P, bool LOW, bool TAIL, typename TP, typename TM, typename TW, typename TV>
inline void step16(TP* pp, const TP* gg, TM* mm, TM* ss, const TW* ww, const TV* vv, __mmask16 k, const Consts& K,
                   Acc& acc) {
  const __m512 w = load<TAIL>(ww, k), d = load<TAIL>(vv, k), p0 = load<TAIL>(pp, k), m0 = load<TAIL>(mm, k);
  const __m512 dw = p0 - w;
  const __m512 r = P == kOrthogonal ? dw - K.c * d : (P == kParallel ? K.c * d : dw);
  const __m512 g = as_stored<TP>(load<TAIL>(gg, k) + K.coef * r) * K.sign;
  const __m512 m = LOW ? m0 + K.w1 * (g - m0) : g - (g - m0) * K.w1c;
  const __m512 s = load<TAIL>(ss, k) * K.beta2 + (K.omb2 * g) * g;
  const __m512 p = p0 * K.decay + (K.neg_step * m) / (_mm512_sqrt_ps(s) / K.bc2_sqrt + K.eps);
  store<TAIL>(mm, m, k);
  store<TAIL>(ss, s, k);
  store<TAIL>(pp, p, k);
  acc.add<TAIL>(d * (as_stored<TP>(p) - w), k);
}

template <int64_t P, bool LOW, typename TP, typename TM, typename TW, typename TV>
double step_range(const Item& t, const Hyper& h, int64_t lo, int64_t hi) {
  TP* p = static_cast<TP*>(t.p);
  const TP* g = static_cast<const TP*>(t.g);
  TM* m = static_cast<TM*>(t.m);
  TM* s = static_cast<TM*>(t.s);
  const TW* w0 = static_cast<const TW*>(t.w0);
  const TV* v = static_cast<const TV*>(t.v);
  const Consts K(t, h);
  Acc acc;
  int64_t i = lo;
  for (; i + 16 <= hi; i += 16) {
    prefetch(i + kAhead, p, g, m, s, w0, v);
    step16<P, LOW, false>(p + i, g + i, m + i, s + i, w0 + i, v + i, 0xFFFF, K, acc);
  }
  if (i < hi)
    step16<P, LOW, true>(p + i, g + i, m + i, s + i, w0 + i, v + i, static_cast<__mmask16>((1u << (hi - i)) - 1), K,
                         acc);
  return acc.combine();
}

template <int64_t P, typename TP, typename TM, typename TW, typename TV>
double step_block(const Item& t, const Hyper& h, int64_t lo, int64_t hi) {
  return h.low ? step_range<P, true, TP, TM, TW, TV>(t, h, lo, hi) : step_range<P, false, TP, TM, TW, TV>(t, h, lo, hi);
}

template <typename TP, typename TW, typename TV>
double dot_block(const Item& t, int64_t lo, int64_t hi) {
  const TP* p = static_cast<const TP*>(t.p);
  const TW* w0 = static_cast<const TW*>(t.w0);
  const TV* v = static_cast<const TV*>(t.v);
  Acc acc;
  int64_t i = lo;
  for (; i + 16 <= hi; i += 16) {
    prefetch(i + kAhead, p, w0, v);
    acc.add<false>(load<false>(v + i, 0xFFFF) * (load<false>(p + i, 0xFFFF) - load<false>(w0 + i, 0xFFFF)), 0xFFFF);
  }
  if (i < hi) {
    const auto k = static_cast<__mmask16>((1u << (hi - i)) - 1);
    acc.add<true>(load<true>(v + i, k) * (load<true>(p + i, k) - load<true>(w0 + i, k)), k);
  }
  return acc.combine();
}

}  // namespace x512
#endif

using StepFn = double (*)(const Item&, const Hyper&, int64_t, int64_t);
using DotFn = double (*)(const Item&, int64_t, int64_t);
using bf16 = uint16_t;

// The two sets of loops: the portable ones above, and the AVX-512 ones where the build has them.
struct Portable {
  template <int64_t P, typename TP, typename TM, typename TW, typename TV>
  static double step(const Item& t, const Hyper& h, int64_t lo, int64_t hi) {
    return step_block<P, TP, TM, TW, TV>(t, h, lo, hi);
  }
  template <typename TP, typename TW, typename TV>
  static double dot(const Item& t, int64_t lo, int64_t hi) { return dot_block<TP, TW, TV>(t, lo, hi); }
};
#ifdef ASFT_AVX512
struct Avx512 {
  template <int64_t P, typename TP, typename TM, typename TW, typename TV>
  static double step(const Item& t, const Hyper& h, int64_t lo, int64_t hi) {
    return x512::step_block<P, TP, TM, TW, TV>(t, h, lo, hi);
  }
  template <typename TP, typename TW, typename TV>
  static double dot(const Item& t, int64_t lo, int64_t hi) { return x512::dot_block<TP, TW, TV>(t, lo, hi); }
};
constexpr const char* kVector = "avx512";
#else
using Avx512 = Portable;
constexpr const char* kVector = "portable";
#endif
// Set by `_use_portable` (tests): run the portable loops even where the AVX-512 ones are built.
bool g_portable = false;

// Indexed by `Item::kind`: storage (0: fp32 p and moments, 1: bf16 p and moments, 2: bf16 p with
// fp32 moments), then W0's dtype, then v's.
template <class K, int64_t P, typename TP, typename TM>
constexpr StepFn step4[4] = {K::template step<P, TP, TM, float, float>, K::template step<P, TP, TM, float, bf16>,
                             K::template step<P, TP, TM, bf16, float>, K::template step<P, TP, TM, bf16, bf16>};
template <class K, int64_t P>
constexpr const StepFn* step_fns[3] = {step4<K, P, float, float>, step4<K, P, bf16, bf16>, step4<K, P, bf16, float>};
template <class K, typename TP>
constexpr DotFn dot4[4] = {K::template dot<TP, float, float>, K::template dot<TP, float, bf16>,
                           K::template dot<TP, bf16, float>, K::template dot<TP, bf16, bf16>};

template <class K>
const StepFn* const* step_table(int64_t penalty) {
  return penalty == kOrthogonal ? step_fns<K, kOrthogonal>
         : penalty == kParallel ? step_fns<K, kParallel> : step_fns<K, kFull>;
}

// ------------------------------------------------------------------------------------- checks
std::string dims(at::IntArrayRef a) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < a.size(); ++i) o << (i ? ", " : "") << a[i];
  o << (a.size() == 1 ? ",)" : ")");
  return o.str();
}

[[noreturn]] void fail(const std::string& fn, const std::string& msg) {
  throw std::invalid_argument(fn + ": " + msg);
}

void check_lengths(const char* fn, size_t n,
                   std::initializer_list<std::pair<const char*, size_t>> lists) {
  for (const auto& [name, size] : lists)
    if (size != n)
      fail(fn, std::string(name) + " has " + std::to_string(size) + " tensors, params has " +
                   std::to_string(n));
}

// Each check returns what is wrong with a tensor ("" when it is fine), so that the skip mode can
// route a tensor elsewhere instead of raising; names are only built for a message.
std::string label(const char* role, size_t i) { return std::string(role) + "[" + std::to_string(i) + "]"; }

std::string bad_dtype(const at::Tensor& x, const char* role, size_t i, bool bf16_ok) {
  if (!x.defined()) return label(role, i) + " is None";
  if (!x.device().is_cpu()) return label(role, i) + " is on " + x.device().str() + ", expected cpu";
  const auto dt = x.scalar_type();
  if (dt != at::kFloat && !(bf16_ok && dt == at::kBFloat16))
    return label(role, i) + " has dtype " + std::string(c10::toString(dt)) + ", expected Float" +
           (bf16_ok ? " or BFloat16" : "");
  return {};
}

// params[i] is a dense (non-overlapping, gap-free) fp32 or bf16 cpu tensor.
std::string bad_param(const at::Tensor& p, size_t i) {
  std::string e = bad_dtype(p, "params", i, true);
  if (e.empty() && !p.is_non_overlapping_and_dense())
    e = label("params", i) + " is not dense (shape " + dims(p.sizes()) + ", strides " + dims(p.strides()) + ")";
  return e;
}

// `x` (role[i]) is a cpu tensor of an allowed dtype with the shape of params[i] and its layout: the
// same stride along every dimension of size > 1, so both list their elements in one memory order.
std::string bad_like(const at::Tensor& x, const char* role, size_t i, const at::Tensor& p, bool bf16_ok) {
  std::string e = bad_dtype(x, role, i, bf16_ok);
  if (!e.empty()) return e;
  if (x.sizes() != p.sizes())
    return label(role, i) + " has shape " + dims(x.sizes()) + ", " + label("params", i) + " has " + dims(p.sizes());
  for (int64_t k = 0; k < p.dim(); ++k)
    if (p.size(k) > 1 && x.stride(k) != p.stride(k))
      return label(role, i) + " has strides " + dims(x.strides()) + ", " + label("params", i) + " has " +
             dims(p.strides());
  return {};
}

// x (role[i]) has the dtype of ref (ref_role[i]).
std::string bad_same_dtype(const at::Tensor& x, const char* role, const at::Tensor& ref, const char* ref_role,
                           size_t i) {
  if (x.scalar_type() == ref.scalar_type()) return {};
  return label(role, i) + " has dtype " + std::string(c10::toString(x.scalar_type())) + ", " + label(ref_role, i) +
         " has " + std::string(c10::toString(ref.scalar_type()));
}

// What is wrong with tensor i of a step ("" when the kernel can step it): grads in the params'
// dtype; moments fp32, or bf16 with bf16 params, both in one dtype; W0 and v fp32 or bf16.
std::string bad_step_tensor(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                            const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                            const std::vector<at::Tensor>& w0s, const std::vector<at::Tensor>& directions,
                            size_t i) {
  const at::Tensor& p = params[i];
  std::string e = bad_param(p, i);
  const bool bf16 = e.empty() && p.scalar_type() == at::kBFloat16;
  if (e.empty()) e = bad_like(grads[i], "grads", i, p, true);
  if (e.empty()) e = bad_same_dtype(grads[i], "grads", p, "params", i);
  if (e.empty()) e = bad_like(exp_avgs[i], "exp_avgs", i, p, bf16);
  if (e.empty()) e = bad_like(exp_avg_sqs[i], "exp_avg_sqs", i, p, bf16);
  if (e.empty()) e = bad_same_dtype(exp_avg_sqs[i], "exp_avg_sqs", exp_avgs[i], "exp_avgs", i);
  if (e.empty()) e = bad_like(w0s[i], "w0s", i, p, true);
  if (e.empty()) e = bad_like(directions[i], "directions", i, p, true);
  return e;
}

// The step count of steps[i] (a one-element fp32/fp64 cpu tensor) before this step.
double read_step(const std::string& fn, const at::Tensor& s, size_t i) {
  if (!s.defined() || !s.device().is_cpu() || s.numel() != 1)
    fail(fn, label("steps", i) + " must be a one-element cpu tensor");
  if (s.scalar_type() == at::kFloat) return *static_cast<const float*>(s.const_data_ptr());
  if (s.scalar_type() == at::kDouble) return *static_cast<const double*>(s.const_data_ptr());
  fail(fn, label("steps", i) + " has dtype " + std::string(c10::toString(s.scalar_type())) +
               ", expected Float or Double");
}

void write_step(const at::Tensor& s, double value) {
  if (s.scalar_type() == at::kFloat)
    *static_cast<float*>(s.data_ptr()) = static_cast<float>(value);
  else
    *static_cast<double*>(s.data_ptr()) = value;
  s.unsafeGetTensorImpl()->bump_version();
}

// Block layout of a list of tensors: elem_start[t] (memory-order element offset of tensor t in the
// concatenation) and block_start[t] (index of its first block), each with a final total.
struct Layout {
  std::vector<int64_t> elem_start, block_start;
  void build(const std::vector<Item>& items) {
    elem_start.assign(items.size() + 1, 0);
    block_start.assign(items.size() + 1, 0);
    for (size_t t = 0; t < items.size(); ++t) {
      elem_start[t + 1] = elem_start[t] + items[t].n;
      block_start[t + 1] = block_start[t] + (items[t].n + kBlock - 1) / kBlock;
    }
  }
};

// Runs fn(item, lo, hi) for every block (blocks split across threads by elements) into partial[],
// then sums each tensor's blocks in block order into out[t].
template <typename F>
void for_blocks(const std::vector<Item>& items, const Layout& lay, std::vector<double>& partial,
                double* out, const F& fn) {
  const int64_t total = lay.elem_start.back();
  partial.resize(static_cast<size_t>(lay.block_start.back()));
  const auto& es = lay.elem_start;
  at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
    size_t t = std::upper_bound(es.begin(), es.end(), begin) - es.begin() - 1;
    for (; t < items.size() && es[t] < end; ++t) {
      const int64_t n = items[t].n;
      int64_t k = begin > es[t] ? (begin - es[t] + kBlock - 1) / kBlock : 0;
      for (; k * kBlock < n && es[t] + k * kBlock < end; ++k)
        partial[lay.block_start[t] + k] = fn(items[t], k * kBlock, std::min(n, (k + 1) * kBlock));
    }
  });
  for (size_t t = 0; t < items.size(); ++t) {
    double acc = 0.0;
    for (int64_t b = lay.block_start[t]; b < lay.block_start[t + 1]; ++b) acc += partial[b];
    out[t] = acc;
  }
}

// The row of `step_fns` for checked tensors: 0 fp32 params and moments, 1 bf16 params and
// moments, 2 bf16 params with fp32 moments.
int storage_of(const at::Tensor& p, const at::Tensor& m) {
  if (p.scalar_type() == at::kFloat) return 0;
  return m.scalar_type() == at::kBFloat16 ? 1 : 2;
}

int kind_of(int storage, const at::Tensor& w0, const at::Tensor& v) {
  return 4 * storage + 2 * (w0.scalar_type() == at::kBFloat16) + (v.scalar_type() == at::kBFloat16);
}

// Reused between calls on one thread: no allocation per step once the largest model has been seen.
thread_local std::vector<Item> t_items;
thread_local Layout t_layout;
thread_local std::vector<double> t_partial;

// The step (see the file comment). skip: tensors the kernel cannot step are left untouched and
// listed in the second result (else they raise). Returns (dots of the new values, skipped indices).
std::tuple<at::Tensor, std::vector<int64_t>> asft_adamw(
    const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
    const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
    const std::vector<at::Tensor>& w0s, const std::vector<at::Tensor>& directions, const at::Tensor& cs,
    const std::vector<at::Tensor>& steps, double lr, double beta1, double beta2, double eps,
    double weight_decay, double coef, int64_t penalty, bool maximize, bool skip) {
  const char* fn = "asft_adamw_native_";
  const size_t n = params.size();
  check_lengths(fn, n, {{"grads", grads.size()}, {"exp_avgs", exp_avgs.size()},
                        {"exp_avg_sqs", exp_avg_sqs.size()}, {"w0s", w0s.size()},
                        {"directions", directions.size()}, {"steps", steps.size()}});
  if (penalty < kOrthogonal || penalty > kFull) fail(fn, "penalty code " + std::to_string(penalty) + " is not 0, 1 or 2");
  if (!cs.defined() || !cs.device().is_cpu() || cs.scalar_type() != at::kDouble || cs.dim() != 1 ||
      cs.size(0) != static_cast<int64_t>(n) || !cs.is_contiguous())
    fail(fn, "cs must be a contiguous float64 cpu tensor of shape (" + std::to_string(n) + ",)");
  const double* c = cs.const_data_ptr<double>();
  auto& items = t_items;
  items.assign(n, Item{});
  std::vector<int64_t> skipped;
  for (size_t i = 0; i < n; ++i) {  // check everything before writing anything
    const at::Tensor& p = params[i];
    const std::string e = bad_step_tensor(params, grads, exp_avgs, exp_avg_sqs, w0s, directions, i);
    if (!e.empty()) {
      if (!skip) fail(fn, e);
      skipped.push_back(static_cast<int64_t>(i));
      continue;  // n = 0: no blocks
    }
    const double step = read_step(fn, steps[i], i) + 1.0;
    Item& it = items[i];
    it.p = p.data_ptr();
    it.g = grads[i].const_data_ptr();
    it.m = exp_avgs[i].data_ptr();
    it.s = exp_avg_sqs[i].data_ptr();
    it.w0 = w0s[i].const_data_ptr();
    it.v = directions[i].const_data_ptr();
    it.n = p.numel();
    it.kind = kind_of(storage_of(p, exp_avgs[i]), w0s[i], directions[i]);
    it.c = static_cast<float>(c[i]);
    it.neg_step = static_cast<float>(-(lr / (1.0 - std::pow(beta1, step))));
    it.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, step)));
  }
  Hyper h;
  h.decay = static_cast<float>(1.0 - lr * weight_decay);
  h.w1 = static_cast<float>(1.0 - beta1);
  h.w1c = 1.0f - h.w1;
  h.low = std::abs(h.w1) < 0.5f;
  h.beta2 = static_cast<float>(beta2);
  h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  h.eps = static_cast<float>(eps);
  h.coef = static_cast<float>(coef);
  h.sign = maximize ? -1.0f : 1.0f;
  at::Tensor out = at::empty({static_cast<int64_t>(n)}, at::TensorOptions().dtype(at::kDouble));
  t_layout.build(items);
  const StepFn* const* table = g_portable ? step_table<Portable>(penalty) : step_table<Avx512>(penalty);
  {
    pybind11::gil_scoped_release no_gil;
    for_blocks(items, t_layout, t_partial, out.data_ptr<double>(),
               [&](const Item& t, int64_t lo, int64_t hi) { return table[t.kind >> 2][t.kind & 3](t, h, lo, hi); });
  }
  size_t k = 0;
  for (size_t i = 0; i < n; ++i) {  // written in place: record it as an in-place op would
    if (k < skipped.size() && skipped[k] == static_cast<int64_t>(i)) {
      ++k;
      continue;
    }
    write_step(steps[i], read_step(fn, steps[i], i) + 1.0);
    for (const at::Tensor* x : {&params[i], &exp_avgs[i], &exp_avg_sqs[i]}) x->unsafeGetTensorImpl()->bump_version();
  }
  return {out, skipped};
}

// <v, p - W0> per tensor with the step's fold. skip: as for `asft_adamw` (skipped entries are 0).
std::tuple<at::Tensor, std::vector<int64_t>> dots(const std::vector<at::Tensor>& params,
                                                  const std::vector<at::Tensor>& w0s,
                                                  const std::vector<at::Tensor>& directions, bool skip) {
  const char* fn = "dots_native";
  const size_t n = params.size();
  check_lengths(fn, n, {{"w0s", w0s.size()}, {"directions", directions.size()}});
  auto& items = t_items;
  items.assign(n, Item{});
  std::vector<int64_t> skipped;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    std::string e = bad_param(p, i);
    if (e.empty()) e = bad_like(w0s[i], "w0s", i, p, true);
    if (e.empty()) e = bad_like(directions[i], "directions", i, p, true);
    if (!e.empty()) {
      if (!skip) fail(fn, e);
      skipped.push_back(static_cast<int64_t>(i));
      continue;
    }
    Item& it = items[i];
    it.p = const_cast<void*>(p.const_data_ptr());  // read only
    it.w0 = w0s[i].const_data_ptr();
    it.v = directions[i].const_data_ptr();
    it.n = p.numel();
    it.kind = kind_of(p.scalar_type() == at::kBFloat16, w0s[i], directions[i]);
  }
  at::Tensor out = at::empty({static_cast<int64_t>(n)}, at::TensorOptions().dtype(at::kDouble));
  t_layout.build(items);
  {
    pybind11::gil_scoped_release no_gil;
    const DotFn* f32 = g_portable ? dot4<Portable, float> : dot4<Avx512, float>;
    const DotFn* b16 = g_portable ? dot4<Portable, bf16> : dot4<Avx512, bf16>;
    for_blocks(items, t_layout, t_partial, out.data_ptr<double>(),
               [&](const Item& t, int64_t lo, int64_t hi) { return (t.kind >> 2 ? b16 : f32)[t.kind & 3](t, lo, hi); });
  }
  return {out, skipped};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("asft_adamw", &asft_adamw);
  m.def("dots", &dots);
  m.attr("BLOCK") = kBlock;
  m.attr("VECTOR") = kVector;
  m.def("_use_portable", [](bool on) { g_portable = on; });
}
