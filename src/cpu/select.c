/* Cutoff selection: which bucket rows one token dispatches (reference.cutoff). Scalar, exact. */
#include <math.h>
#include <string.h>

#include "kernels.h"

/* Real multiplications in a row of each rank: m[k] = G, minus 1 past the last group's size. */
static void row_mults(const pe_buckets *b, int64_t m[PE_RANKS]) {
    int64_t tail = b->n_out % PE_GROUP;
    for (int k = 0; k < PE_RANKS; k++) m[k] = b->n_groups - (tail && k >= tail ? 1 : 0);
}

/* One radix digit: the highest bin where the weight at or above it first reaches budget.
 * hist (n_bins) weights of the candidates by digit; *above: weight strictly above, updated. */
static int pick_bin(const int64_t *hist, int n_bins, double budget, int64_t *above) {
    int64_t acc = *above;
    int bin = n_bins - 1;
    for (; bin > 0; bin--) {
        if ((double)(acc + hist[bin]) >= budget) break;
        acc += hist[bin];
    }
    *above = acc;
    return bin;
}

/* keys (n_rows) of positive floats' bits -> the largest c with weight(key >= c) >= budget. */
static uint32_t radix_cutoff(const pe_buckets *b, const uint32_t *key, uint32_t *cand,
                             const int64_t m[PE_RANKS], double budget) {
    static const int shift[3] = {21, 10, 0}, bits[3] = {11, 11, 10};
    int64_t hist[2048], above = 0;
    int64_t n_cand = 0, n_in = b->n_in;
    uint32_t prefix = 0;
    /* pass 1 over all rows; the rows in the chosen bin become the candidates */
    memset(hist, 0, sizeof hist);
    for (int64_t r = 0; r < b->n_rows; r++) hist[key[r] >> 21] += m[r / n_in];
    uint32_t bin = (uint32_t)pick_bin(hist, 2048, budget, &above);
    prefix = bin << 21;
    for (int64_t r = 0; r < b->n_rows; r++)
        if ((key[r] >> 21) == bin) cand[n_cand++] = (uint32_t)r;
    /* passes 2 and 3 over the candidates only */
    for (int p = 1; p < 3; p++) {
        int n_bins = 1 << bits[p];
        memset(hist, 0, sizeof(int64_t) * (size_t)n_bins);
        for (int64_t t = 0; t < n_cand; t++) {
            uint32_t r = cand[t];
            hist[(key[r] >> shift[p]) & (uint32_t)(n_bins - 1)] += m[r / n_in];
        }
        bin = (uint32_t)pick_bin(hist, n_bins, budget, &above);
        prefix |= bin << shift[p];
        int64_t kept = 0;
        for (int64_t t = 0; t < n_cand; t++) {
            uint32_t r = cand[t];
            if (((key[r] >> shift[p]) & (uint32_t)(n_bins - 1)) == bin) cand[kept++] = r;
        }
        n_cand = kept;
    }
    return prefix;
}

pe_status pe_select(const pe_buckets *b, const float *x, double effort, pe_task *tasks,
                    int64_t *n_tasks, int64_t *mults, uint32_t *scratch) {
    int64_t m[PE_RANKS], total = 0, n_in = b->n_in;
    for (int64_t i = 0; i < n_in; i++)
        if (!isfinite(x[i])) return PE_ERR_NONFINITE;
    *n_tasks = 0;
    *mults = 0;
    if (!(effort > 0.0)) return PE_OK;
    row_mults(b, m);
    uint32_t *key = scratch, *cand = scratch + b->n_rows;
    for (int64_t r = 0; r < b->n_rows; r++) {
        float s = fabsf(x[b->order[r]]) * b->stats[r];
        memcpy(&key[r], &s, 4);
        total += m[r / n_in];
    }
    double budget = effort * (double)(b->n_in * b->n_out);
    uint32_t c = (double)total < budget ? 0u : radix_cutoff(b, key, cand, m, budget);
    int64_t n = 0, done = 0;
    for (int64_t r = 0; r < b->n_rows; r++) {
        if (key[r] < c) continue;
        tasks[n].row = r;
        tasks[n].x = x[b->order[r]];
        n++;
        done += m[r / n_in];
    }
    *n_tasks = n;
    *mults = done;
    return PE_OK;
}
