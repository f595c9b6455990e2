/* lithos_predictor.c - the kernel-latency predictor of lithos_predictor.h (no CUDA here). */
#include "lithos_predictor.h"

#include <stdlib.h>
#include <string.h>

#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)

typedef struct {
    lithos_kernel_key key;
    uint64_t durations_ns[LITHOS_PREDICTOR_WINDOW];
    uint32_t tpcs[LITHOS_PREDICTOR_WINDOW];
    uint32_t count, next;
    uint64_t updated; /* the update counter at this key's latest sample */
} predictor_entry;

struct lithos_predictor {
    uint64_t version; /* odd while an observe changes the table (readers retry) */
    uint32_t lock;    /* writers' spinlock */
    uint32_t capacity, size, bucket_mask;
    uint64_t updates;
    uint32_t *index; /* open addressing: entry number + 1, 0 = empty; at least 2 * capacity buckets */
    predictor_entry *entries;
};

static uint32_t bucket_of(const lithos_predictor *p, const lithos_kernel_key *k) {
    uint64_t h = k->function * 0x9e3779b97f4a7c15ull ^ k->grid_blocks * 0xc2b2ae3d27d4eb4full ^ k->block_threads;
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ull;
    return (uint32_t)(h ^ (h >> 32)) & p->bucket_mask;
}

/* Entry number of the key, or -1. Safe on a table being changed (every index value is in range). */
static int64_t find_entry(const lithos_predictor *p, const lithos_kernel_key *k) {
    uint32_t b = bucket_of(p, k);
    for (uint32_t probe = 0; probe <= p->bucket_mask; probe++, b = (b + 1) & p->bucket_mask) {
        uint32_t slot = LOAD(p->index[b]);
        if (slot == 0) return -1;
        const predictor_entry *e = &p->entries[slot - 1];
        if (LOAD(e->key.function) == k->function && LOAD(e->key.grid_blocks) == k->grid_blocks &&
            LOAD(e->key.block_threads) == k->block_threads)
            return slot - 1;
    }
    return -1;
}

static void index_insert(lithos_predictor *p, uint32_t entry) {
    uint32_t b = bucket_of(p, &p->entries[entry].key);
    while (p->index[b]) b = (b + 1) & p->bucket_mask;
    p->index[b] = entry + 1;
}

lithos_predictor *lithos_predictor_create(uint32_t capacity) {
    if (capacity == 0 || capacity > (1u << 24)) return NULL;
    lithos_predictor *p = calloc(1, sizeof(*p));
    uint32_t buckets = 1;
    while (buckets < 2 * capacity) buckets <<= 1;
    if (!p) return NULL;
    p->capacity = capacity;
    p->bucket_mask = buckets - 1;
    p->index = calloc(buckets, sizeof(*p->index));
    p->entries = calloc(capacity, sizeof(*p->entries));
    if (!p->index || !p->entries) {
        lithos_predictor_destroy(p);
        return NULL;
    }
    return p;
}

void lithos_predictor_destroy(lithos_predictor *p) {
    if (!p) return;
    free(p->index);
    free(p->entries);
    free(p);
}

int lithos_predictor_observe(lithos_predictor *p, uint64_t function, uint64_t grid_blocks, uint64_t block_threads,
                             uint64_t duration_ns, uint32_t tpcs) {
    if (duration_ns == 0 || tpcs == 0) return -1;
    lithos_kernel_key k = {function, grid_blocks, block_threads};
    while (__atomic_exchange_n(&p->lock, 1u, __ATOMIC_ACQUIRE)) __builtin_ia32_pause();
    uint64_t version = p->version;
    __atomic_store_n(&p->version, version + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    int64_t found = find_entry(p, &k);
    predictor_entry *e;
    if (found >= 0) {
        e = &p->entries[found];
    } else if (p->size < p->capacity) {
        e = &p->entries[p->size];
        memset(e, 0, sizeof(*e));
        e->key = k;
        index_insert(p, p->size++);
    } else { /* full: the key with the oldest latest sample makes room (rule 5) */
        uint32_t oldest = 0;
        for (uint32_t i = 1; i < p->size; i++)
            if (p->entries[i].updated < p->entries[oldest].updated) oldest = i;
        e = &p->entries[oldest];
        memset(e, 0, sizeof(*e));
        e->key = k;
        memset(p->index, 0, (p->bucket_mask + 1) * sizeof(*p->index));
        for (uint32_t i = 0; i < p->size; i++) index_insert(p, i);
    }
    e->durations_ns[e->next] = duration_ns;
    e->tpcs[e->next] = tpcs;
    e->next = (e->next + 1) % LITHOS_PREDICTOR_WINDOW;
    if (e->count < LITHOS_PREDICTOR_WINDOW) e->count++;
    e->updated = ++p->updates;
    __atomic_store_n(&p->version, version + 2, __ATOMIC_RELEASE);
    __atomic_store_n(&p->lock, 0u, __ATOMIC_RELEASE);
    return 0;
}

/* A consistent copy of the key's samples, oldest first (lock-free read). Returns how many. */
static uint32_t copy_samples(lithos_predictor *p, const lithos_kernel_key *k, uint64_t *durations_ns, uint32_t *tpcs) {
    for (;;) {
        uint64_t version = __atomic_load_n(&p->version, __ATOMIC_ACQUIRE);
        if (version & 1u) {
            __builtin_ia32_pause();
            continue;
        }
        uint32_t count = 0;
        int64_t found = find_entry(p, k);
        if (found >= 0) {
            const predictor_entry *e = &p->entries[found];
            count = LOAD(e->count);
            uint32_t next = LOAD(e->next);
            if (count > LITHOS_PREDICTOR_WINDOW || next >= LITHOS_PREDICTOR_WINDOW) count = 0; /* torn: retried below */
            uint32_t start = (next + LITHOS_PREDICTOR_WINDOW - count) % LITHOS_PREDICTOR_WINDOW;
            for (uint32_t i = 0; i < count; i++) {
                durations_ns[i] = LOAD(e->durations_ns[(start + i) % LITHOS_PREDICTOR_WINDOW]);
                tpcs[i] = LOAD(e->tpcs[(start + i) % LITHOS_PREDICTOR_WINDOW]);
            }
        }
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&p->version, __ATOMIC_RELAXED) == version) return count;
    }
}

static uint64_t estimate_ns(uint64_t duration_ns, uint32_t sample_tpcs, uint32_t tpcs) {
    if (tpcs >= sample_tpcs) return duration_ns;
    return (uint64_t)(((unsigned __int128)duration_ns * sample_tpcs + tpcs - 1) / tpcs);
}

uint64_t lithos_predictor_predict_ns(lithos_predictor *p, uint64_t function, uint64_t grid_blocks,
                                     uint64_t block_threads, uint32_t tpcs) {
    return lithos_predictor_predict_longest_ns(p, function, grid_blocks, block_threads, tpcs, NULL);
}

uint64_t lithos_predictor_predict_longest_ns(lithos_predictor *p, uint64_t function, uint64_t grid_blocks,
                                             uint64_t block_threads, uint32_t tpcs, uint64_t *longest_ns) {
    if (longest_ns) *longest_ns = 0;
    if (tpcs == 0) return 0;
    lithos_kernel_key k = {function, grid_blocks, block_threads};
    uint64_t durations_ns[LITHOS_PREDICTOR_WINDOW], estimates[LITHOS_PREDICTOR_WINDOW];
    uint32_t sample_tpcs[LITHOS_PREDICTOR_WINDOW];
    uint32_t n = copy_samples(p, &k, durations_ns, sample_tpcs);
    if (n < LITHOS_PREDICTOR_MIN_SAMPLES) return 0;
    for (uint32_t i = 0; i < n; i++) { /* insertion sort of at most 8 */
        uint64_t v = estimate_ns(durations_ns[i], sample_tpcs[i], tpcs);
        uint32_t j = i;
        for (; j > 0 && estimates[j - 1] > v; j--) estimates[j] = estimates[j - 1];
        estimates[j] = v;
    }
    if (longest_ns) *longest_ns = estimates[n - 1];
    return estimates[n / 2];
}

uint32_t lithos_predictor_samples(lithos_predictor *p, uint64_t function, uint64_t grid_blocks, uint64_t block_threads,
                                  uint64_t *durations_ns, uint32_t *tpcs, uint32_t max) {
    lithos_kernel_key k = {function, grid_blocks, block_threads};
    uint64_t d[LITHOS_PREDICTOR_WINDOW];
    uint32_t t[LITHOS_PREDICTOR_WINDOW];
    uint32_t n = copy_samples(p, &k, d, t);
    if (n > max) n = max;
    memcpy(durations_ns, d, n * sizeof(*d));
    memcpy(tpcs, t, n * sizeof(*t));
    return n;
}

uint32_t lithos_predictor_size(lithos_predictor *p) { return __atomic_load_n(&p->size, __ATOMIC_RELAXED); }
