/*
 * lithos_predictor.h - the online kernel-latency predictor of scheduler/predictor.py, in C.
 *
 * Same integer rules, bit for bit (tests/test_native.py runs the golden sequence of
 * tests/test_scheduler.py and random sequences through both):
 *   1. key (function, grid_blocks = gridDim.x*y*z, block_threads = blockDim.x*y*z);
 *   2. the last LITHOS_PREDICTOR_WINDOW = 8 samples (duration ns >= 1, tpcs >= 1) per key, in a ring;
 *   3. one sample (d on t TPCs) estimates T TPCs as d if T >= t, else ceil(d * t / T);
 *   4. prediction: 0 (unknown) with fewer than 3 samples, else the estimates sorted ascending,
 *      element n / 2;
 *   5. at most `capacity` keys; a new key in a full table replaces the key whose latest sample is
 *      the oldest (one update counter shared by all keys).
 *
 * Threads: one writer at a time (lithos_predictor_observe takes a spinlock held for a few hundred
 * ns, never across a driver call); any number of readers, lock-free (a sequence counter: a reader
 * retries if an observe ran while it read).
 * Supported: every build of this file (no CUDA here).
 */
#ifndef LITHOS_PREDICTOR_H
#define LITHOS_PREDICTOR_H

#include <stdint.h>

#define LITHOS_PREDICTOR_WINDOW 8u
#define LITHOS_PREDICTOR_MIN_SAMPLES 3u
#define LITHOS_PREDICTOR_DEFAULT_CAPACITY 1024u

typedef struct lithos_kernel_key {
    uint64_t function;      /* CUfunction handle */
    uint64_t grid_blocks;   /* gridDim.x * gridDim.y * gridDim.z */
    uint64_t block_threads; /* blockDim.x * blockDim.y * blockDim.z */
} lithos_kernel_key;

typedef struct lithos_predictor lithos_predictor;

#ifdef __cplusplus
extern "C" {
#endif
#pragma GCC visibility push(default)

/* A predictor holding at most `capacity` keys (>= 1), or NULL. */
lithos_predictor *lithos_predictor_create(uint32_t capacity);
void lithos_predictor_destroy(lithos_predictor *p);
/* Record one launch of the key that took duration_ns on tpcs TPCs. Returns 0, or -1 for a zero value. */
int lithos_predictor_observe(lithos_predictor *p, uint64_t function, uint64_t grid_blocks, uint64_t block_threads,
                             uint64_t duration_ns, uint32_t tpcs);
/* Predicted duration (ns) of the key on tpcs TPCs; 0 = unknown (fewer than 3 samples). */
uint64_t lithos_predictor_predict_ns(lithos_predictor *p, uint64_t function, uint64_t grid_blocks,
                                     uint64_t block_threads, uint32_t tpcs);
/* The same, and *longest_ns (if not NULL) the largest of the estimates (0 when unknown). */
uint64_t lithos_predictor_predict_longest_ns(lithos_predictor *p, uint64_t function, uint64_t grid_blocks,
                                             uint64_t block_threads, uint32_t tpcs, uint64_t *longest_ns);
/* The key's samples, oldest first, up to max (WINDOW suffices). Returns how many. */
uint32_t lithos_predictor_samples(lithos_predictor *p, uint64_t function, uint64_t grid_blocks, uint64_t block_threads,
                                  uint64_t *durations_ns, uint32_t *tpcs, uint32_t max);
/* Number of keys held. */
uint32_t lithos_predictor_size(lithos_predictor *p);

#pragma GCC visibility pop
#ifdef __cplusplus
}
#endif

#endif /* LITHOS_PREDICTOR_H */
