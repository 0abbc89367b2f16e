/* Sequential steps in C (loaded by models/rules/native.py), each in one file included once per
 * precision:
 *   fwm_steps_impl.h     the per-position steps of one chunk of the FWM write (forward and
 *                        backward; models/rules/fwm.py, FWMWrite), one sequence at a time;
 *                        the chunk's matrix products stay in PyTorch
 *   delta_answer_impl.h  the delta rule's answer to a few queries without its state: the query
 *                        carried backwards through the writes (models/rules/delta.py,
 *                        DeltaAnswer), O(L D Q) per sequence
 *   dpfp_kernel_impl.h   DPFP-nu's kernel phi(q) . phi(k) and its backward without the
 *                        features (models/feature_maps.py, DPFPKernel), O(D nu) per pair
 *   gather_add_impl.h    the retrieval model's input projection as two row lookups and a sum
 *                        (models/retrieval.py, ProjectLookup), forward and backward
 * Row-major, contiguous buffers. Compiled without -ffast-math and with -ffp-contract=off, every
 * sum in a fixed order (dot_impl.h), so every machine rounds the same way.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define T float
#define NAME(x) x##_f32
#include "dot_impl.h"
#include "fwm_steps_impl.h"
#include "delta_answer_impl.h"
#include "dpfp_kernel_impl.h"
#include "gather_add_impl.h"
#undef T
#undef NAME

#define T double
#define NAME(x) x##_f64
#include "dot_impl.h"
#include "fwm_steps_impl.h"
#include "delta_answer_impl.h"
#include "dpfp_kernel_impl.h"
#include "gather_add_impl.h"
#undef T
#undef NAME
