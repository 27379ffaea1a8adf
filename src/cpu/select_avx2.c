/* The cutoff search (select.c) compiled with AVX2 for the x86 kernel sets: 8- and 16-lane
 * compares in its hot loops, the same cutoffs, rows and items as the portable build. */
#define PE_SELECT_NAME(f) f##_avx2
#include "select.c"
