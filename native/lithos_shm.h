/*
 * lithos_shm.h - the shared-memory layout between the lithos agent and liblithos.so clients.
 *
 * This header is the single definition of the layout. The C shim includes it; the Python side
 * (lithos_ray/native.py) does not copy it: it asks the compiled library for every struct size and
 * field offset through lithos_layout_entry() (generated below from the same X-macro lists that
 * define the structs), and it writes allowances through lithos_table_set_allowance() so that the
 * seqlock protocol lives in one place.
 *
 * Supported: CUDA 13.0 headers, driver 580.159.04, H100 80GB HBM3 (66 TPCs), x86-64 Linux.
 *
 * Two kinds of region, both plain files under /dev/shm:
 *
 *   1. The allowance table, one per GPU: /dev/shm/lithos-<gpu uuid>.
 *      Created and written only by the agent (mode 0644). Clients open it O_RDONLY and map it
 *      PROT_READ, so a client can never write its own allowance (nor anyone else's).
 *      [lithos_table_header][lithos_slot 0][lithos_slot 1] ... [lithos_slot max_slots-1]
 *
 *   2. The launch ring, one per client slot: <table path>.ring<slot>, e.g.
 *      /dev/shm/lithos-GPU-1234.ring3. Created by the client shim (the writer), read by the agent.
 *      [lithos_ring_header][lithos_launch_record 0] ... [lithos_launch_record capacity-1]
 *
 * Notes on allowances (the one convention to get right)
 * -----------------------------------------------------
 * A TPC id is the index of a group returned by
 *     cuDevSmResourceSplitByCount(groups, 66, sm_resource, CU_DEV_SM_RESOURCE_SPLIT_IGNORE_SM_COSCHEDULING, 2)
 * i.e. 0..65 on an H100 SXM; under MPS every process gets the same groups in the same order.
 * tpc_mask[w] bit b set  <=>  TPC id 64*w + b is ALLOWED (a set bit enables, unlike libsmctrl,
 * where a set bit disables).
 *
 *   TPCs {0..11}         -> tpc_mask[0] = 0x0000000000000fff, tpc_mask[1] = 0x0
 *   TPCs {12..23}        -> tpc_mask[0] = 0x0000000000fff000, tpc_mask[1] = 0x0
 *   TPCs {60..65}        -> tpc_mask[0] = 0xf000000000000000, tpc_mask[1] = 0x3
 *
 * Worked example: the agent gives slot 3 TPCs 12..23.
 *   slot = (lithos_slot *)(table + header.header_bytes + 3 * header.slot_bytes)
 *   agent:  generation 6 -> 7 (odd: being written); tpc_mask = {0xfff000, 0}; tpcs = 12;
 *           flags = LITHOS_SLOT_ACTIVE; generation 7 -> 8 (even: stable).
 *   client: every launch loads slot->generation once (one atomic load, no syscall). Equal to the
 *           generation its cached route was built for -> launch on the cached green stream.
 *           Different -> read the masks under the seqlock (retry while odd or changed), look up or
 *           build the green context for that TPC set, launch there. So a change takes effect on
 *           the next launch of every client thread.
 * A slot whose flags lack LITHOS_SLOT_ACTIVE (never set, or cleared) means "no allowance": the
 * client's launches pass through to the whole GPU and are recorded with view LITHOS_VIEW_UNCONFINED.
 *
 * Kernels with thread-block clusters larger than 2 cannot run in TPC-granular green contexts on
 * H100 (they fail and poison the context), so they go to a second view built from co-scheduled
 * 8-SM groups (cuDevSmResourceSplitByCount flags 0, minCount 8). cosched_group_of_tpc[t] names
 * the co-scheduled group holding TPC t (LITHOS_NO_GROUP if none or not yet probed); it is filled
 * once per GPU by the agent (python -m lithos_ray.native probe-layout). A cluster kernel runs on
 * the co-scheduled groups whose four TPCs all lie in the allowance; with no such group it passes
 * through unconfined and is recorded with view LITHOS_VIEW_UNCONFINED.
 *
 * Launch records: writers (any thread of the client) take an index with one atomic fetch-add on
 * head, fill record[index % capacity], and store seq = index + 1 last (release). A reader copies a
 * record and accepts it only if seq equals index + 1 before and after the copy
 * (lithos_ring_copy() does this). gpu_ns is filled later for sampled launches (every
 * sample_every-th launch) once the GPU has finished them; 0 means not sampled or not yet known.
 */
#ifndef LITHOS_SHM_H
#define LITHOS_SHM_H

#include <stddef.h>
#include <stdint.h>

#define LITHOS_LAYOUT_VERSION 1u
#define LITHOS_TABLE_MAGIC "LITHOST"  /* 7 chars + NUL = 8 bytes */
#define LITHOS_RING_MAGIC "LITHOSR"
#define LITHOS_MAX_TPCS 128u          /* capacity of the masks; an H100 SXM uses 66 */
#define LITHOS_MASK_WORDS 2u
#define LITHOS_NO_GROUP 255u
#define LITHOS_DEFAULT_SLOTS 64u
#define LITHOS_DEFAULT_RING_RECORDS 4096u
#define LITHOS_KERNEL_NAME_BYTES 64u

/* lithos_slot.flags */
#define LITHOS_SLOT_ACTIVE 1u

/* lithos_launch_record.view: which view the launch ran in */
#define LITHOS_VIEW_TPC 0u        /* TPC-granular green context (flag 1 groups) */
#define LITHOS_VIEW_COSCHED 1u    /* co-scheduled 8-SM green context, for clusters > 2 */
#define LITHOS_VIEW_UNCONFINED 2u /* passed through to the whole GPU (no allowance, no fitting view, or routing failed) */
#define LITHOS_VIEW_GRAPH 3u      /* cuGraphLaunch: kernel nodes keep the context they were captured in */

/* lithos_launch_record.api: which entry point the application called */
#define LITHOS_API_LAUNCH_KERNEL 0u
#define LITHOS_API_LAUNCH_KERNEL_EX 1u
#define LITHOS_API_LAUNCH_COOPERATIVE 2u
#define LITHOS_API_GRAPH_LAUNCH 3u

/* X(struct, field, C type, array length (1 = scalar), numpy type) - one list per struct. */
#define LITHOS_TABLE_HEADER_FIELDS(X)                                           \
    X(lithos_table_header, magic, char, 8, "S1")                               \
    X(lithos_table_header, layout_version, uint32_t, 1, "<u4")                 \
    X(lithos_table_header, header_bytes, uint32_t, 1, "<u4")                   \
    X(lithos_table_header, slot_bytes, uint32_t, 1, "<u4")                     \
    X(lithos_table_header, max_slots, uint32_t, 1, "<u4")                      \
    X(lithos_table_header, tpcs_on_gpu, uint32_t, 1, "<u4")                    \
    X(lithos_table_header, cosched_probed, uint32_t, 1, "<u4")                 \
    X(lithos_table_header, gpu_uuid, char, 64, "S1")                           \
    X(lithos_table_header, cosched_group_of_tpc, uint8_t, LITHOS_MAX_TPCS, "u1")

#define LITHOS_SLOT_FIELDS(X)                                                   \
    X(lithos_slot, generation, uint64_t, 1, "<u8")                             \
    X(lithos_slot, tpc_mask, uint64_t, LITHOS_MASK_WORDS, "<u8")               \
    X(lithos_slot, tpcs, uint32_t, 1, "<u4")                                   \
    X(lithos_slot, flags, uint32_t, 1, "<u4")                                  \
    X(lithos_slot, reserved, uint64_t, 4, "<u8")

#define LITHOS_RING_HEADER_FIELDS(X)                                            \
    X(lithos_ring_header, magic, char, 8, "S1")                                \
    X(lithos_ring_header, layout_version, uint32_t, 1, "<u4")                  \
    X(lithos_ring_header, header_bytes, uint32_t, 1, "<u4")                    \
    X(lithos_ring_header, record_bytes, uint32_t, 1, "<u4")                    \
    X(lithos_ring_header, capacity, uint32_t, 1, "<u4")                        \
    X(lithos_ring_header, sample_every, uint32_t, 1, "<u4")                    \
    X(lithos_ring_header, writer_pid, uint32_t, 1, "<u4")                      \
    X(lithos_ring_header, head, uint64_t, 1, "<u8")

#define LITHOS_LAUNCH_RECORD_FIELDS(X)                                          \
    X(lithos_launch_record, seq, uint64_t, 1, "<u8")                           \
    X(lithos_launch_record, function, uint64_t, 1, "<u8")                      \
    X(lithos_launch_record, host_ns, uint64_t, 1, "<u8")                       \
    X(lithos_launch_record, gpu_ns, uint64_t, 1, "<u8")                        \
    X(lithos_launch_record, allowance_generation, uint64_t, 1, "<u8")          \
    X(lithos_launch_record, grid, uint32_t, 3, "<u4")                          \
    X(lithos_launch_record, block, uint32_t, 3, "<u4")                         \
    X(lithos_launch_record, cluster, uint32_t, 3, "<u4")                       \
    X(lithos_launch_record, shared_bytes, uint32_t, 1, "<u4")                  \
    X(lithos_launch_record, tpcs, uint16_t, 1, "<u2")                          \
    X(lithos_launch_record, view, uint8_t, 1, "u1")                            \
    X(lithos_launch_record, api, uint8_t, 1, "u1")                             \
    X(lithos_launch_record, kernel_name, char, LITHOS_KERNEL_NAME_BYTES, "S1")

#define LITHOS_DECLARE_FIELD(s, f, type, n, np) type f[n];

/* Header of the allowance table (written once by the agent at creation, then by probe-layout). */
typedef struct lithos_table_header {
    LITHOS_TABLE_HEADER_FIELDS(LITHOS_DECLARE_FIELD)
} __attribute__((aligned(64))) lithos_table_header;

/* One client's allowance: a seqlock-protected TPC set. */
typedef struct lithos_slot {
    LITHOS_SLOT_FIELDS(LITHOS_DECLARE_FIELD)
} __attribute__((aligned(64))) lithos_slot;

/* Header of one client's launch ring. */
typedef struct lithos_ring_header {
    LITHOS_RING_HEADER_FIELDS(LITHOS_DECLARE_FIELD)
} __attribute__((aligned(64))) lithos_ring_header;

/* Identity of one launch (and, when sampled, its GPU duration). */
typedef struct lithos_launch_record {
    LITHOS_LAUNCH_RECORD_FIELDS(LITHOS_DECLARE_FIELD)
} __attribute__((aligned(64))) lithos_launch_record;

#ifdef __cplusplus
extern "C" {
#endif
#pragma GCC visibility push(default)

/*
 * Layout description for other languages: entry i gives (struct, field, offset, bytes, count,
 * numpy type). Entries with field "" give the struct's total size in bytes.
 * Returns 0 on success, -1 past the last entry.
 * Supported: every build of this file.
 */
int lithos_layout_entry(int index, const char **struct_name, const char **field_name, uint32_t *offset,
                        uint32_t *bytes, uint32_t *count, const char **numpy_type);
uint32_t lithos_layout_version(void);

/*
 * Agent side: initialise a zero-filled, writable mapping of table_bytes as an empty table.
 * Returns 0, or -1 if table_bytes is too small for max_slots.
 */
int lithos_table_init(void *table, size_t table_bytes, const char *gpu_uuid, uint32_t max_slots, uint32_t tpcs_on_gpu);
/* Bytes a table with max_slots slots needs. */
size_t lithos_table_bytes(uint32_t max_slots);
/* Agent side: publish an allowance (seqlock write). Returns 0, or -1 for a bad slot. */
int lithos_table_set_allowance(void *table, uint32_t slot, const uint64_t tpc_mask[LITHOS_MASK_WORDS]);
/* Agent side: clear an allowance (the client passes through unconfined). */
int lithos_table_clear(void *table, uint32_t slot);
/* Agent side: store the co-scheduled group of each TPC (LITHOS_NO_GROUP for none). */
int lithos_table_set_cosched_map(void *table, const uint8_t *group_of_tpc, uint32_t tpcs);
/*
 * Either side: consistent read of a slot (seqlock read). Returns the (even) generation, fills
 * tpc_mask and flags.
 */
uint64_t lithos_table_read_allowance(const void *table, uint32_t slot, uint64_t tpc_mask[LITHOS_MASK_WORDS],
                                     uint32_t *flags);

/* Bytes a ring of `records` records needs. */
size_t lithos_ring_bytes(uint32_t records);
/*
 * Reader side: copy up to max_records complete records with indices >= *next_index into out.
 * Records overwritten before they were read are skipped; *next_index is advanced past what was
 * copied or skipped. Returns the number copied.
 */
uint32_t lithos_ring_copy(const void *ring, uint64_t *next_index, lithos_launch_record *out, uint32_t max_records);

/*
 * Client side, for tests and tools: the allowance this process's shim sees (after lazy init),
 * as in lithos_table_read_allowance. Returns -1 when the shim is passing through.
 */
int64_t lithos_client_allowance(uint64_t tpc_mask[LITHOS_MASK_WORDS]);

#pragma GCC visibility pop
#ifdef __cplusplus
}
#endif

#endif /* LITHOS_SHM_H */
