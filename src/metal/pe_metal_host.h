/* Host-side arithmetic shared by the Objective-C host (pe_metal.mm) and the shim's driver
 * (tests/metal_shim/driver.cpp), so the simulator launches exactly what the host launches. */
#pragma once
#include <math.h>
#include <stdint.h>

#include "pe_metal.h"

/* The parameters of an effort call; effort in [0, 1] (checked by the caller). */
static inline pe_metal_params pe_metal_effort_params(pe_u32 n_in, pe_u32 n_out, pe_u32 n_rows,
                                                     pe_u32 n_tok, double effort,
                                                     pe_u32 n_splits) {
    pe_metal_params p;
    const pe_u32 g = (n_out + PE_GROUP - 1) / PE_GROUP, tail = n_out % PE_GROUP;
    const uint64_t short_from = tail ? (uint64_t)tail * n_in : n_rows;
    p.n_in = n_in, p.n_out = n_out, p.n_rows = n_rows, p.n_tok = n_tok;
    p.n_groups = g, p.pos_bytes = (g + 1) / 2, p.n_chunks = (g + 3) / 4;
    p.short_from = (pe_u32)(short_from < n_rows ? short_from : n_rows);
    /* the reference's cum >= effort * n_in * n_out, on integer sums: cum >= ceil of it */
    p.need = effort > 0.0 ? (pe_u32)ceil(effort * (double)n_in * (double)n_out) : 0;
    p.n_splits = n_splits;
    p.n_tiles = (g + PE_TILE_GROUPS - 1) / PE_TILE_GROUPS;
    return p;
}

/* The parameters of a dense call: n_splits splits of the inputs. */
static inline pe_metal_params pe_metal_dense_params(pe_u32 n_in, pe_u32 n_out, pe_u32 n_tok,
                                                    pe_u32 n_splits) {
    pe_metal_params p = pe_metal_effort_params(n_in, n_out, 0, n_tok, 1.0, n_splits);
    p.n_tiles = (n_out + PE_DENSE_COLS - 1) / PE_DENSE_COLS;
    return p;
}

/* Threadgroups of the reduce kernel (PE_REDUCE_THREADS threads each). */
static inline pe_u32 pe_metal_reduce_groups(const pe_metal_params *p) {
    return (pe_u32)(((uint64_t)p->n_tok * p->n_out + PE_REDUCE_THREADS - 1) / PE_REDUCE_THREADS);
}
