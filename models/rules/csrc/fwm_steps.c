/* The sequential part of one chunk of the FWM write (models/rules/fwm.py, FWMWrite): the
 * per-position steps of the forward and of the backward, one sequence at a time. Everything of
 * chunk size (G = K K^T, R0 = K S_0, the chunk's output and the gradients' matrix products) stays
 * in PyTorch; these loops are what costs a dispatch per tiny op there.
 *
 * Shapes (row-major, contiguous): B sequences, C positions, D value width.
 * Compiled without -ffast-math and with -ffp-contract=off, and every sum in a fixed order, so
 * every machine rounds the same way.
 */
#include <math.h>
#include <string.h>

#define T float
#define NAME(x) x##_f32
#include "fwm_steps_impl.h"
#undef T
#undef NAME

#define T double
#define NAME(x) x##_f64
#include "fwm_steps_impl.h"
#undef T
#undef NAME
