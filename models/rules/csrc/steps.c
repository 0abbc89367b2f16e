/* Sequential steps in C (loaded by models/rules/native.py), each in one file included once per
 * precision:
 *   fwm_steps_impl.h     the per-position steps of one chunk of the FWM write (forward and
 *                        backward), one sequence at a time
 *   matmul_impl.h        a small matrix product with a fixed summation order, and a transpose
 *   fwm_chunked_impl.h   the whole chunkwise FWM write, one sequence at a time: the steps
 *                        between the chunk's products (models/rules/fwm.py, FWMChunked)
 *   fwm_sequential_impl.h  the whole FWM write one position at a time, forward and backward
 *                        (models/rules/fwm.py, FWMSequential), for states small enough to stay
 *                        in cache
 *   delta_answer_impl.h  the delta rule's answer to a few queries without its state: the query
 *                        carried backwards through the writes (models/rules/delta.py,
 *                        DeltaAnswer), O(L D Q) per sequence
 *   dpfp_kernel_impl.h   DPFP-nu's kernel phi(q) . phi(k) and its backward without the
 *                        features (models/feature_maps.py, DPFPKernel), O(D nu) per pair; also
 *                        for keys given as the projection's row lookups (DPFPProjectedKernel)
 *   sum_normalise_impl.h x / (sum x + eps) over rows and its backward, one pass each
 *                        (models/normalisation.py, SumNormalise)
 *   dpfp_features_impl.h DPFP-nu's features and their backward, one pass each way
 *                        (models/feature_maps.py, DPFPFeatures), and the same sum-normalised
 *                        (DPFPNormalised)
 *   gather_add_impl.h    the retrieval model's input projection as two row lookups and a sum
 *                        (models/projection.py, ProjectLookup), forward and backward; its row
 *                        helpers serve the kernels that read keys in that form
 *   favor_kernel_impl.h  FAVOR+'s kernel terms exp(+-s - c) from the projections s, one pass
 *                        per (query, key) pair (models/feature_maps.py, FAVORKernel); float32
 *                        with expf_impl.h's exp, float64 with libm's
 *   pointwise_impl.h     elu(x) + 1 and tanh and their backwards, one pass each
 *                        (models/feature_maps.py, Pointwise); the same maps of keys given as
 *                        row lookups, and the scores' backward to the tables (PointwiseKernel)
 * Row-major, contiguous buffers. Compiled without -ffast-math and with -ffp-contract=off, every
 * sum in a fixed order (dot_impl.h), so every machine rounds the same way.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Loops whose every float is independent of the vector width also get AVX2 clones (and AVX-512,
 * WIDE_VECTOR_CLONES, where measured faster: the exp loops of FAVOR+ and the pointwise maps,
 * the pointwise backwards and the lookups' backward (15% and 30-40% fewer cycles in Linear
 * and DPFP-1 delta steps), the sequential FWM write (15-22% at B = 128, L = 40, D_k = 64,
 * D_v = 20); perf samples over the same steps. Not the DPFP kernel's forward: 40% more),
 * chosen at load time (gcc's function multiversioning); elsewhere, or with -DFWR_NO_CLONES,
 * the baseline. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) \
    && !defined(FWR_NO_CLONES)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#define WIDE_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#define WIDE_VECTOR_CLONES
#endif

/* Every exported function runs with subnormal floats flushed to zero, inputs and results (x86:
 * MXCSR's FTZ and DAZ; AArch64: FPCR.FZ), and puts the caller's mode back on return. The FWM
 * write's clip factors shrink old parts of the state geometrically, so in training its state
 * and gradients are partly subnormal (7% of a tanh FWM state at S = 160), and this CPU takes a
 * slow path for every operation on one: per training step, tanh FWM at S = 160 went from 160
 * to 118 ms, DPFP-1 FWM at S = 200 from 110 to 80, DPFP-2 delta at S = 200 from 18 to 16. A
 * subnormal is below 1.2e-38 (float32; 2.2e-308 in float64), and added to any float32 above
 * 2e-31 leaves it unchanged. Set per call, so the floats do not depend on the calling thread's
 * mode. */
#if defined(__GNUC__) && (defined(__x86_64__) || (defined(__i386__) && defined(__SSE2__)))
#include <xmmintrin.h>
typedef unsigned fwr_fpmode;
static inline fwr_fpmode fwr_flush_enter(void) {
    const fwr_fpmode mode = _mm_getcsr();
    _mm_setcsr(mode | 0x8040u);                                 /* FTZ (bit 15), DAZ (bit 6) */
    return mode;
}
static inline void fwr_flush_leave(const fwr_fpmode *mode) { _mm_setcsr(*mode); }
#elif defined(__GNUC__) && defined(__aarch64__)
typedef unsigned long fwr_fpmode;
static inline fwr_fpmode fwr_flush_enter(void) {
    fwr_fpmode mode;
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(mode));
    __asm__ __volatile__("msr fpcr, %0" : : "r"(mode | (1ul << 24)));            /* FZ */
    return mode;
}
static inline void fwr_flush_leave(const fwr_fpmode *mode) {
    __asm__ __volatile__("msr fpcr, %0" : : "r"(*mode));
}
#else
/* elsewhere subnormals are kept: floats may differ from x86's below the smallest normal */
#define FLUSH_DENORMALS (void)0
#endif
#ifndef FLUSH_DENORMALS
#define FLUSH_DENORMALS \
    const fwr_fpmode fwr_mode __attribute__((cleanup(fwr_flush_leave), unused)) = fwr_flush_enter()
#endif

#include "expf_impl.h"

/* FWR_PRECISION=32 or 64 builds one precision alone: native.py compiles the two halves as two
 * processes at once and links them (on two cores, the float32 half's time: 10.5 s against
 * 17.7 s for the whole file on a Zen 1). */
#if !defined(FWR_PRECISION) || FWR_PRECISION == 32
#define T float
#define NAME(x) x##_f32
/* matmul_impl.h's transpose moves float32 tiles with lane shuffles where the compiler has them */
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define FWR_SHUFFLE_TRANSPOSE
#endif
#endif
#include "dot_impl.h"
#include "fwm_steps_impl.h"
#include "matmul_impl.h"
#include "fwm_chunked_impl.h"
#include "fwm_sequential_impl.h"
#include "delta_answer_impl.h"
#include "gather_add_impl.h"
#include "dpfp_kernel_impl.h"
#include "sum_normalise_impl.h"
#include "dpfp_features_impl.h"
#define EXP(x) fixed_expf(x)
#define EXP_NONPOSITIVE(x) fixed_expf_nonpositive(x)
#include "favor_kernel_impl.h"
#include "pointwise_impl.h"
#undef EXP_NONPOSITIVE
#undef EXP
#undef FWR_SHUFFLE_TRANSPOSE
#undef T
#undef NAME
#endif

#if !defined(FWR_PRECISION) || FWR_PRECISION == 64
#define T double
#define NAME(x) x##_f64
#include "dot_impl.h"
#include "fwm_steps_impl.h"
#include "matmul_impl.h"
#include "fwm_chunked_impl.h"
#include "fwm_sequential_impl.h"
#include "delta_answer_impl.h"
#include "gather_add_impl.h"
#include "dpfp_kernel_impl.h"
#include "sum_normalise_impl.h"
#include "dpfp_features_impl.h"
#define EXP(x) exp(x)
#define EXP_NONPOSITIVE(x) exp(x)
#include "favor_kernel_impl.h"
#include "pointwise_impl.h"
#undef EXP_NONPOSITIVE
#undef EXP
#undef T
#undef NAME
#endif
