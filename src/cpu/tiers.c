/* The tiered copy of a matrix (kernels.h, "The tiered layout"), built once from the canonical
 * rows through the input-major index: the kernels that read it route 4 ranks of a group with
 * one expand instead of one masked add per weight. Same values, same bytes per rank. */
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

/* 1 if every input's loaded statistics never rise with rank: a cutoff then dispatches a
 * prefix of ranks per input (true for every matrix pe_build_f16 makes; a file could lie). */
static int stats_fall(const pe_packed *p) {
    for (int64_t i = 0; i < p->n_in; i++) {
        const float *s = p->stats + i * PE_RANKS;
        for (int k = 1; k < p->n_loaded[i]; k++)
            if (!(s[k] <= s[k - 1])) return 0;
    }
    return 1;
}

/* Position of rank k in group g of canonical row r. */
static int position(const pe_buckets *b, int64_t r, int64_t g) {
    uint8_t q = b->positions[r * ((b->n_groups + 1) / 2) + g / 2];
    return (g & 1) ? q >> 4 : q & 15;
}

/* The tier rows of input i (n loaded ranks, ceil(n / 4) rows of row bytes) -> dst. */
static void fill_input(const pe_buckets *b, const pe_packed *p, int64_t i, int n, int64_t row,
                       uint8_t *dst) {
    int64_t C = p->n_chunks, G = b->n_groups;
    int n_tiers = (n + PE_TIER - 1) / PE_TIER;
    for (int64_t g = 0; g < 4 * C; g++) {
        uint16_t vals[PE_GROUP] = {0}, mask[PE_RANKS / PE_TIER] = {0}, used = 0;
        uint16_t prefix[PE_RANKS / PE_TIER][3] = {{0}};
        for (int k = 0; k < n && g < G; k++) {
            int64_t r = p->row[p->slot0[i] + k];
            int q = position(b, r, g), t = k / PE_TIER;
            used |= (uint16_t)(1u << q);
            mask[t] |= (uint16_t)(1u << q);
            vals[q] = b->values[r * G + g];
            for (int kk = k % PE_TIER + 1; kk <= 3; kk++) prefix[t][kk - 1] |= (uint16_t)(1u << q);
        }
        for (int t = 0; t < n_tiers; t++) {
            uint8_t *tier = dst + t * row, *rec = tier + (g / 4) * PE_TIER_REC;
            /* a partly loaded tier (or a padding group) still routes 4 slots: zeros at free
             * positions, never where another tier of this input has a value */
            uint16_t m = mask[t];
            for (int q = 0; q < PE_GROUP && __builtin_popcount(m) < PE_TIER; q++)
                if (!((used | m) >> q & 1)) m |= (uint16_t)(1u << q);
            used |= m;
            memcpy(rec + 2 * (g % 4), &m, 2);
            uint16_t v[PE_TIER];
            for (int q = 0, s = 0; q < PE_GROUP; q++)
                if (m >> q & 1) v[s++] = vals[q]; /* 0 at a padding slot */
            memcpy(rec + 8 + 2 * PE_TIER * (g % 4), v, sizeof v);
            for (int kk = 0; kk < 3; kk++)
                memcpy(tier + C * PE_TIER_REC + 8 * (kk * C + g / 4) + 2 * (g % 4),
                       &prefix[t][kk], 2);
        }
    }
}

pe_status pe_build_tiers(const pe_buckets *b, pe_packed *p) {
    p->n_chunks = (b->n_groups + 3) / 4;
    if (!stats_fall(p)) return PE_OK;
    int64_t row = p->n_chunks * PE_TIER_CHUNK, total = 0;
    p->tier_off = malloc(sizeof(int64_t) * (size_t)p->n_in + 8);
    if (!p->tier_off) return PE_ERR_ALLOC;
    for (int64_t i = 0; i < p->n_in; i++) {
        p->tier_off[i] = total;
        total += (p->n_loaded[i] + PE_TIER - 1) / PE_TIER * row;
    }
    p->tiers = aligned_alloc(64, (size_t)((total + 63) / 64 * 64 + 64));
    if (!p->tiers) {
        free(p->tier_off);
        p->tier_off = NULL;
        return PE_ERR_ALLOC;
    }
    for (int64_t i = 0; i < p->n_in; i++)
        fill_input(b, p, i, p->n_loaded[i], row, p->tiers + p->tier_off[i]);
    return PE_OK;
}
