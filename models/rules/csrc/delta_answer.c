/* The delta rule's answer to a few queries without its state (models/rules/delta.py,
 * delta_rule_answer): the query carried backwards through the writes, one position at a time,
 * O(L D Q) per sequence. Compiled without -ffast-math and with -ffp-contract=off, every sum in a
 * fixed order. */
#include <string.h>

#define T float
#define NAME(x) x##_f32
#include "delta_answer_impl.h"
#undef T
#undef NAME

#define T double
#define NAME(x) x##_f64
#include "delta_answer_impl.h"
#undef T
#undef NAME
