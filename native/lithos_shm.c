/* lithos_shm.c - the shared-memory protocol of lithos_shm.h (no CUDA here). */
#include "lithos_shm.h"

#include <string.h>

typedef struct {
    const char *struct_name, *field_name, *numpy_type;
    uint32_t offset, bytes, count;
} layout_entry;

#define LITHOS_FIELD_ENTRY(s, f, type, n, np) \
    {#s, #f, np, (uint32_t)offsetof(s, f), (uint32_t)sizeof(((s *)0)->f), (uint32_t)(n)},
#define LITHOS_SIZE_ENTRY(s) {#s, "", "", 0, (uint32_t)sizeof(s), 1},

static const layout_entry layout_entries[] = {
    LITHOS_TABLE_HEADER_FIELDS(LITHOS_FIELD_ENTRY) LITHOS_SIZE_ENTRY(lithos_table_header)
    LITHOS_SLOT_FIELDS(LITHOS_FIELD_ENTRY) LITHOS_SIZE_ENTRY(lithos_slot)
    LITHOS_RING_HEADER_FIELDS(LITHOS_FIELD_ENTRY) LITHOS_SIZE_ENTRY(lithos_ring_header)
    LITHOS_LAUNCH_RECORD_FIELDS(LITHOS_FIELD_ENTRY) LITHOS_SIZE_ENTRY(lithos_launch_record)
    LITHOS_ACTIVITY_FIELDS(LITHOS_FIELD_ENTRY) LITHOS_SIZE_ENTRY(lithos_activity)
};

int lithos_layout_entry(int index, const char **struct_name, const char **field_name, uint32_t *offset,
                        uint32_t *bytes, uint32_t *count, const char **numpy_type) {
    if (index < 0 || (size_t)index >= sizeof(layout_entries) / sizeof(layout_entries[0])) return -1;
    const layout_entry *e = &layout_entries[index];
    *struct_name = e->struct_name;
    *field_name = e->field_name;
    *offset = e->offset;
    *bytes = e->bytes;
    *count = e->count;
    *numpy_type = e->numpy_type;
    return 0;
}

uint32_t lithos_layout_version(void) { return LITHOS_LAYOUT_VERSION; }

size_t lithos_table_bytes(uint32_t max_slots) {
    return sizeof(lithos_table_header) + (size_t)max_slots * sizeof(lithos_slot);
}

static lithos_slot *slot_at(const void *table, uint32_t slot) {
    const lithos_table_header *h = table;
    if (slot >= h->max_slots[0]) return NULL;
    return (lithos_slot *)((char *)table + h->header_bytes[0] + (size_t)slot * h->slot_bytes[0]);
}

int lithos_table_init(void *table, size_t table_bytes, const char *gpu_uuid, uint32_t max_slots, uint32_t tpcs_on_gpu) {
    if (table_bytes < lithos_table_bytes(max_slots) || tpcs_on_gpu == 0 || tpcs_on_gpu > LITHOS_MAX_TPCS) return -1;
    lithos_table_header *h = table;
    memset(table, 0, lithos_table_bytes(max_slots));
    h->layout_version[0] = LITHOS_LAYOUT_VERSION;
    h->header_bytes[0] = sizeof(lithos_table_header);
    h->slot_bytes[0] = sizeof(lithos_slot);
    h->max_slots[0] = max_slots;
    h->tpcs_on_gpu[0] = tpcs_on_gpu;
    strncpy(h->gpu_uuid, gpu_uuid, sizeof(h->gpu_uuid) - 1);
    memset(h->cosched_group_of_tpc, LITHOS_NO_GROUP, sizeof(h->cosched_group_of_tpc));
    h->activity_stride[0] = LITHOS_ACTIVITY_STRIDE;
    h->lend_atom_ns[0] = LITHOS_DEFAULT_ATOM_NS;
    h->lend_idle_window_ns[0] = LITHOS_DEFAULT_IDLE_WINDOW_NS;
    h->lend_unknown_kernel_busy_ns[0] = LITHOS_DEFAULT_UNKNOWN_KERNEL_BUSY_NS;
    /* The magic goes last: a reader that sees it sees a complete header. */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    memcpy(h->magic, LITHOS_TABLE_MAGIC, sizeof(h->magic));
    return 0;
}

/* Seqlock write: odd generation while the words change. One writer (the agent) per table. */
static int slot_write(void *table, uint32_t slot, const uint64_t tpc_mask[LITHOS_MASK_WORDS], uint32_t flags) {
    lithos_slot *s = slot_at(table, slot);
    if (!s) return -1;
    uint64_t gen = __atomic_load_n(&s->generation[0], __ATOMIC_RELAXED);
    __atomic_store_n(&s->generation[0], gen + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    uint32_t tpcs = 0;
    for (uint32_t w = 0; w < LITHOS_MASK_WORDS; w++) {
        __atomic_store_n(&s->tpc_mask[w], tpc_mask[w], __ATOMIC_RELAXED);
        tpcs += (uint32_t)__builtin_popcountll(tpc_mask[w]);
    }
    __atomic_store_n(&s->tpcs[0], tpcs, __ATOMIC_RELAXED);
    __atomic_store_n(&s->flags[0], flags, __ATOMIC_RELAXED);
    __atomic_store_n(&s->generation[0], gen + 2, __ATOMIC_RELEASE);
    return 0;
}

int lithos_table_set_allowance(void *table, uint32_t slot, const uint64_t tpc_mask[LITHOS_MASK_WORDS]) {
    return slot_write(table, slot, tpc_mask, LITHOS_SLOT_ACTIVE);
}

int lithos_table_clear(void *table, uint32_t slot) {
    const uint64_t none[LITHOS_MASK_WORDS] = {0};
    return slot_write(table, slot, none, 0);
}

int lithos_table_set_lending(void *table, uint32_t slot, uint64_t lender_mask, uint32_t lending_flags) {
    lithos_slot *s = slot_at(table, slot);
    if (!s) return -1;
    if (slot < LITHOS_LEND_SLOTS) lender_mask &= ~(1ull << slot); /* never one's own lender */
    __atomic_store_n(&s->lending_flags[0], lending_flags, __ATOMIC_RELAXED);
    __atomic_store_n(&s->lender_mask[0], lender_mask, __ATOMIC_RELEASE);
    return 0;
}

int lithos_table_set_lending_knobs(void *table, uint64_t atom_ns, uint64_t idle_window_ns, uint64_t unknown_kernel_busy_ns) {
    lithos_table_header *h = table;
    if (atom_ns == 0 || idle_window_ns == 0 || unknown_kernel_busy_ns == 0) return -1;
    __atomic_store_n(&h->lend_atom_ns[0], atom_ns, __ATOMIC_RELAXED);
    __atomic_store_n(&h->lend_idle_window_ns[0], idle_window_ns, __ATOMIC_RELAXED);
    __atomic_store_n(&h->lend_unknown_kernel_busy_ns[0], unknown_kernel_busy_ns, __ATOMIC_RELEASE);
    return 0;
}

size_t lithos_activity_bytes(uint32_t max_slots) { return (size_t)max_slots * LITHOS_ACTIVITY_STRIDE; }

int lithos_lender_is_idle(uint64_t last_launch_ns, uint64_t busy_until_ns, uint64_t now_ns, uint64_t idle_window_ns) {
    /* Signed: a lender may have launched after this launch read the clock (now < last: recent). */
    int recent = last_launch_ns != 0 && (int64_t)(now_ns - last_launch_ns) < (int64_t)idle_window_ns;
    return !recent && now_ns >= busy_until_ns;
}

uint64_t lithos_busy_after(uint64_t busy_until_ns, uint64_t now_ns, uint64_t predicted_ns, uint64_t unknown_kernel_busy_ns) {
    uint64_t end;
    if (!predicted_ns) {
        if (__builtin_add_overflow(now_ns, unknown_kernel_busy_ns, &end)) end = UINT64_MAX;
        return busy_until_ns > end ? busy_until_ns : end;
    }
    if (__builtin_add_overflow(busy_until_ns > now_ns ? busy_until_ns : now_ns, predicted_ns, &end)) end = UINT64_MAX;
    return end;
}

void lithos_activity_after_launch(lithos_activity *word, uint64_t now_ns, uint64_t predicted_ns,
                                  uint64_t unknown_kernel_busy_ns) {
    uint64_t busy = __atomic_load_n(&word->busy_until_ns[0], __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(&word->busy_until_ns[0], &busy, lithos_busy_after(busy, now_ns, predicted_ns, unknown_kernel_busy_ns),
                                        1, __ATOMIC_RELEASE, __ATOMIC_RELAXED)) {
    }
    uint64_t last = __atomic_load_n(&word->last_launch_ns[0], __ATOMIC_RELAXED);
    while (last < now_ns &&
           !__atomic_compare_exchange_n(&word->last_launch_ns[0], &last, now_ns, 1, __ATOMIC_RELEASE, __ATOMIC_RELAXED)) {
    }
}

int lithos_table_set_cosched_map(void *table, const uint8_t *group_of_tpc, uint32_t tpcs) {
    lithos_table_header *h = table;
    if (tpcs > LITHOS_MAX_TPCS) return -1;
    memset(h->cosched_group_of_tpc, LITHOS_NO_GROUP, sizeof(h->cosched_group_of_tpc));
    memcpy(h->cosched_group_of_tpc, group_of_tpc, tpcs);
    __atomic_store_n(&h->cosched_probed[0], 1u, __ATOMIC_RELEASE);
    return 0;
}

uint64_t lithos_table_read_allowance(const void *table, uint32_t slot, uint64_t tpc_mask[LITHOS_MASK_WORDS],
                                     uint32_t *flags) {
    lithos_slot *s = slot_at(table, slot);
    if (!s) return 0;
    for (;;) {
        uint64_t before = __atomic_load_n(&s->generation[0], __ATOMIC_ACQUIRE);
        if (before & 1u) {
            __builtin_ia32_pause();
            continue;
        }
        for (uint32_t w = 0; w < LITHOS_MASK_WORDS; w++) tpc_mask[w] = __atomic_load_n(&s->tpc_mask[w], __ATOMIC_RELAXED);
        *flags = __atomic_load_n(&s->flags[0], __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&s->generation[0], __ATOMIC_RELAXED) == before) return before;
    }
}

size_t lithos_ring_bytes(uint32_t records) {
    return sizeof(lithos_ring_header) + (size_t)records * sizeof(lithos_launch_record);
}

uint32_t lithos_ring_copy(const void *ring, uint64_t *next_index, lithos_launch_record *out, uint32_t max_records) {
    const lithos_ring_header *h = ring;
    const lithos_launch_record *records = (const lithos_launch_record *)((const char *)ring + h->header_bytes[0]);
    uint64_t capacity = h->capacity[0];
    uint64_t head = __atomic_load_n(&h->head[0], __ATOMIC_ACQUIRE);
    uint64_t index = *next_index;
    if (head > capacity && index < head - capacity) index = head - capacity; /* overwritten: skip */
    uint32_t copied = 0;
    for (; index < head && copied < max_records; index++) {
        const lithos_launch_record *r = &records[index % capacity];
        uint64_t seq = __atomic_load_n(&r->seq[0], __ATOMIC_ACQUIRE);
        if (seq != index + 1) {
            if (seq < index + 1) break; /* still being written: stop here, retry later */
            continue;                   /* already overwritten by a later lap */
        }
        memcpy(&out[copied], r, sizeof(*r));
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&r->seq[0], __ATOMIC_RELAXED) != seq) continue;
        /* gpu_ns may be stored after publication; re-read it atomically. */
        out[copied].gpu_ns[0] = __atomic_load_n(&r->gpu_ns[0], __ATOMIC_RELAXED);
        copied++;
    }
    *next_index = index;
    return copied;
}
