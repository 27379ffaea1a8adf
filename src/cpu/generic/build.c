/* Bucket construction (reference.build): rank every group of 16, then order each rank's rows. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fp16.h"
#include "pyeffort.h"

/* w[16] fp16 -> rank_to_pos[16]: by |w| descending, ties by lower position (insertion sort). */
static void rank_group(const uint16_t w[PE_GROUP], uint8_t rank_to_pos[PE_GROUP]) {
    uint16_t key[PE_GROUP];
    for (int p = 0; p < PE_GROUP; p++) {
        uint16_t k = w[p] & 0x7FFF, q = (uint16_t)p;
        int at = p;
        while (at > 0 && key[at - 1] < k) { /* strictly smaller moves down: stable */
            key[at] = key[at - 1];
            rank_to_pos[at] = rank_to_pos[at - 1];
            at--;
        }
        key[at] = k;
        rank_to_pos[at] = (uint8_t)q;
    }
}

typedef struct {
    float stat;
    int32_t input;
} stat_entry;

/* qsort order: stat descending, then input ascending (deterministic). */
static int by_stat_desc(const void *a, const void *b) {
    const stat_entry *x = a, *y = b;
    if (x->stat != y->stat) return x->stat < y->stat ? 1 : -1;
    return (x->input > y->input) - (x->input < y->input);
}

/* W (n_in, n_out) fp16 -> values (16 n_in, G), positions (16 n_in, ceil(G/2)), stats, order. */
pe_status pe_build_f16(const uint16_t *w, int64_t n_in, int64_t n_out, uint16_t *values,
                       uint8_t *positions, float *stats, int32_t *order) {
    int64_t G = (n_out + PE_GROUP - 1) / PE_GROUP, pstride = (G + 1) / 2, tail = n_out % PE_GROUP;
    int64_t plane = n_in * G;
    uint16_t *v_by_input = malloc(sizeof(uint16_t) * (size_t)(PE_RANKS * plane));
    uint8_t *p_by_input = malloc((size_t)(PE_RANKS * plane));
    stat_entry *entries = malloc(sizeof(stat_entry) * (size_t)n_in);
    double *sumsq = calloc((size_t)(PE_RANKS * n_in), sizeof(double));
    if (!v_by_input || !p_by_input || !entries || !sumsq) {
        free(v_by_input); free(p_by_input); free(entries); free(sumsq);
        return PE_ERR_ALLOC;
    }
    /* 1. rank every (input, group); planes indexed [k][i][g] */
    for (int64_t i = 0; i < n_in; i++) {
        for (int64_t g = 0; g < G; g++) {
            uint16_t grp[PE_GROUP] = {0};
            uint8_t r2p[PE_GROUP];
            int64_t width = (g + 1) * PE_GROUP <= n_out ? PE_GROUP : n_out - g * PE_GROUP;
            memcpy(grp, w + i * n_out + g * PE_GROUP, sizeof(uint16_t) * (size_t)width);
            rank_group(grp, r2p);
            for (int k = 0; k < PE_RANKS; k++) {
                int64_t at = k * plane + i * G + g;
                v_by_input[at] = grp[r2p[k]];
                p_by_input[at] = r2p[k];
            }
        }
    }
    /* 2. statistic of each row (k, i): root mean square over its real entries */
    for (int k = 0; k < PE_RANKS; k++) {
        double m = (double)(G - (tail && k >= tail ? 1 : 0));
        if (m < 1.0) m = 1.0; /* a rank made only of padding: its sum is 0, so is its stat */
        for (int64_t i = 0; i < n_in; i++) {
            const uint16_t *row = v_by_input + k * plane + i * G;
            double s = 0.0;
            for (int64_t g = 0; g < G; g++) {
                double f = pe_f16_to_f32(row[g]);
                s += f * f;
            }
            sumsq[k * n_in + i] = sqrt(s / m);
        }
    }
    /* 3. order each rank's rows by statistic and write them out */
    for (int k = 0; k < PE_RANKS; k++) {
        for (int64_t i = 0; i < n_in; i++) {
            entries[i].stat = (float)sumsq[k * n_in + i];
            entries[i].input = (int32_t)i;
        }
        qsort(entries, (size_t)n_in, sizeof(stat_entry), by_stat_desc);
        for (int64_t j = 0; j < n_in; j++) {
            int64_t r = k * n_in + j, i = entries[j].input;
            const uint8_t *src = p_by_input + k * plane + i * G;
            uint8_t *dst = positions + r * pstride;
            stats[r] = entries[j].stat;
            order[r] = (int32_t)i;
            memcpy(values + r * G, v_by_input + k * plane + i * G, sizeof(uint16_t) * (size_t)G);
            memset(dst, 0, (size_t)pstride);
            for (int64_t g = 0; g < G; g++) dst[g >> 1] |= (uint8_t)(src[g] << ((g & 1) * 4));
        }
    }
    free(v_by_input); free(p_by_input); free(entries); free(sumsq);
    return PE_OK;
}
