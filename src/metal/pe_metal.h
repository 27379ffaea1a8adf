/* The contract between the Metal kernels (*.metal), their host (pe_metal.mm) and the shim's
 * driver (tests/metal_shim): the parameters of one call and the kernels' fixed sizes. Valid
 * Metal Shading Language, C and C++. */
#pragma once
#ifdef __METAL_VERSION__
typedef uint pe_u32;
#else
#include <stdint.h>
typedef uint32_t pe_u32;
#endif

#define PE_GROUP 16          /* outputs per group (reference.GROUP) */
#define PE_TILE_GROUPS 64    /* groups per column tile of the effort kernels: 1024 outputs */
#define PE_MM_SIMDGROUPS 4   /* simdgroups per threadgroup of the effort and dense kernels */
#define PE_MM_THREADS (32 * PE_MM_SIMDGROUPS)
#define PE_DENSE_COLS 128    /* columns per tile of the dense kernel: 4 per lane */
#define PE_SELECT_MAX_THREADS 1024
#define PE_REDUCE_THREADS 256
#define PE_INFO_WORDS 4      /* per token: cutoff bits, rows dispatched, multiplications, 0 */

/* One call. Every count is below 2^32 (the host checks n_in * n_out and n_tok * n_rows). */
typedef struct pe_metal_params {
    pe_u32 n_in, n_out;  /* W (n_in, n_out) */
    pe_u32 n_rows;       /* loaded bucket rows (a prefix of the 16 n_in) */
    pe_u32 n_groups;     /* G = ceil(n_out / 16) */
    pe_u32 pos_bytes;    /* bytes of a row's positions: ceil(G / 2) */
    pe_u32 n_chunks;     /* q8 scales per row of scales: ceil(G / 4) */
    pe_u32 short_from;   /* rows from here on carry G - 1 multiplications (ranks >= n_out % 16) */
    pe_u32 need;         /* multiplications to reach: ceil(effort n_in n_out); 0: effort 0 */
    pe_u32 n_splits;     /* splits of the rows (effort) or inputs (dense): partial outputs */
    pe_u32 n_tiles;      /* column tiles */
    pe_u32 n_tok;        /* tokens (rows of x) */
} pe_metal_params;
