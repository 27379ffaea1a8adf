/* Shuffle controls that place a q8 tier record's values without an expand instruction (AVX2
 * vpermps, NEON tbl): per byte of a group's 16-bit position mask (8 positions), each
 * position's slot among the group's 4 values (position order), or PE_SLOT_EMPTY where the
 * tier has no value there. Every group of a tier record has exactly 4 positions (layout/
 * tiers.c), so the slots of positions 8..15 start after the 4 - popcount(hi) of positions 0..7:
 * a table per byte, no running count. PE_SLOT_EMPTY is 4 modulo 8 (vpermps reads lane 4, kept
 * zero) and 16 or more (tbl reads 0). */
#ifndef PE_TIERSHUFFLE_H
#define PE_TIERSHUFFLE_H
#include <pthread.h>
#include <stdint.h>

#define PE_SLOT_EMPTY 0x84

static uint8_t slot_lo[256][8], slot_hi[256][8]; /* positions 0..7, 8..15 of a mask byte */

static void make_slots(void) {
    for (int m = 0; m < 256; m++) {
        int n = 0;
        for (int b = 0; b < 8; b++) n += m >> b & 1;
        for (int b = 0, s = 0; b < 8; b++) {
            int on = m >> b & 1;
            slot_lo[m][b] = on ? (uint8_t)s : PE_SLOT_EMPTY;
            slot_hi[m][b] = on ? (uint8_t)(4 - n + s) : PE_SLOT_EMPTY;
            s += on;
        }
    }
}

/* The tables, made at the first call. */
static void tier_slots_ready(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, make_slots);
}
#endif
