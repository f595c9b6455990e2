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
 * Three kinds of region, all plain files under /dev/shm:
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
 *   3. The activity pages, one file per GPU: <table path>.activity, created by the agent with the
 *      table (mode 0644; clients run as the agent's user, as Ray workers do). One page of
 *      LITHOS_ACTIVITY_STRIDE (4096) bytes per slot; page s holds slot s's lithos_activity.
 *      [lithos_activity 0 + padding][lithos_activity 1 + padding] ... (max_slots pages)
 *      A client maps the whole file PROT_READ (to read its lenders' words) and, in a second
 *      mapping, only its own page PROT_READ|PROT_WRITE. The MMU therefore lets its shim write its
 *      own activity word and nothing else: not another client's word (read-only mapping), not any
 *      allowance or lend list (the table is mapped read-only from an O_RDONLY descriptor).
 *      Why not the ring header: a borrower must see every lender's word from its first launch, but
 *      a ring exists only once its client has started; the agent creates this file up front, so a
 *      borrower maps it once at start and never opens a file on the launch path.
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
 * Notes on lending (the launch-path rule of scheduler/lending.py, applied by the shim)
 * -------------------------------------------------------------------------------------
 * Written by the agent: per slot lender_mask (bit s set <=> this slot may add slot s's TPCs to a
 * launch while s is idle) and lending_flags (LITHOS_LEND_LOW_PRIORITY: launches that use borrowed
 * TPCs go to a green stream of the least stream priority; LITHOS_LEND_UNROLL_GRAPHS: graph replays
 * are sent kernel by kernel through this rule, native/README.md); table-wide lend_atom_ns,
 * lend_idle_window_ns, lend_unknown_kernel_busy_ns. Each is one aligned word stored atomically;
 * they are not under the allowance seqlock (a lend-list change does not move the allowance
 * generation). Written by each client's shim: its lithos_activity (CLOCK_MONOTONIC ns, read through
 * the vDSO: no syscall; last_launch_ns 0 = never launched).
 *
 * At each launch of kernel k by client B at now_ns (one clock read):
 *     own = B's TPCs in the launch's view; predicted_own = predict(k, own)   (0 = unknown)
 *     lenders = 0
 *     ahead = B's predicted work queued before k on the same stream (per thread; see below)
 *     if lender_mask != 0 and predicted_own != 0 and ahead + predicted_own <= lend_atom_ns
 *        and (grid_blocks(k) > 2 * |own|    (a grid within the own SMs already runs in one wave)
 *             or B's owed deferred run on this stream is in a union):   (stay there; no pacing for it)
 *         for each slot L in lender_mask (L != B, L < max_slots):
 *             idle(L) = !(last_launch_ns != 0 and (int64)(now_ns - last_launch_ns) < lend_idle_window_ns)
 *                       and now_ns >= busy_until_ns
 *             if idle(L): lenders |= 1 << L
 *     TPCs = own | the allowances of `lenders`   (green context cached per TPC set)
 *     B.busy_until_ns  = max(B.busy_until_ns, now_ns) + predict(k, |TPCs|), or for an unknown k
 *                        max(B.busy_until_ns, now_ns + lend_unknown_kernel_busy_ns) (lithos_busy_after)
 *     B.last_launch_ns = now_ns
 *
 * Worked example: slot 0 owns TPCs 0..7, slot 1 owns 8..15, the agent sets
 * lender_mask[slot 0] = 0x2 (may borrow from slot 1), defaults atom 250 us, idle window 500 us.
 *   t = 1000000 ns: slot 1 has never launched (activity page 1 = {0, 0}): idle. Slot 0 launches a
 *     kernel predicted at 90000 ns on 8 TPCs (<= 250000): it runs on TPCs 0..15 (record: tpcs 16,
 *     lender_slots_used 0x2). Slot 0's shim stores page 0 = {last 1000000, busy_until 1000000 +
 *     predict(k, 16)} = {1000000, 1090000}: samples on 8 TPCs never credit a speed-up on 16.
 *   t = 1200000 ns: slot 1 launches; its shim stores page 1 = {1200000, 1200000 + its prediction}.
 *     Its own launches always use TPCs 8..15 at once.
 *   t = 1200400 ns: slot 0 launches again: now - 1200000 < 500000, so slot 1 is not idle: TPCs 0..7.
 *   Slot 1 becomes idle for slot 0 once 500 us have passed since its last launch AND its
 *   predicted busy time is over.
 *
 * The queue term ("ahead"): a launch call returns long before a kernel queued behind others runs,
 * so the rule bounds when a borrowed kernel ENDS, not when it is launched. Each thread keeps, per
 * stream, the predicted end of what it queued (unknown kernels count lend_unknown_kernel_busy_ns);
 * when that says no, the shim asks the stream (cuStreamQuery: drained resets it). A borrower
 * with LITHOS_LEND_LOW_PRIORITY sleeps while it has idle lenders until the estimate fits, one atom
 * at a time (lenders and stream asked again after each), at most 40 atoms per launch
 * (LITHOS_LEND_PACE=0 turns this off). Not in shared memory: private to each shim.
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

#define LITHOS_LAYOUT_VERSION 2u
#define LITHOS_TABLE_MAGIC "LITHOST"  /* 7 chars + NUL = 8 bytes */
#define LITHOS_RING_MAGIC "LITHOSR"
#define LITHOS_MAX_TPCS 128u          /* capacity of the masks; an H100 SXM uses 66 */
#define LITHOS_MASK_WORDS 2u
#define LITHOS_NO_GROUP 255u
#define LITHOS_DEFAULT_SLOTS 64u
#define LITHOS_DEFAULT_RING_RECORDS 4096u
#define LITHOS_KERNEL_NAME_BYTES 64u
#define LITHOS_ACTIVITY_STRIDE 4096u   /* bytes per slot in the activity file: one x86-64 page */
#define LITHOS_LEND_SLOTS 64u          /* lender_mask has one bit per slot 0..63 */
/* Lending defaults; equal to LendingPolicy's in scheduler/lending.py (a test checks it). */
#define LITHOS_DEFAULT_ATOM_NS 250000ull
#define LITHOS_DEFAULT_IDLE_WINDOW_NS 500000ull
#define LITHOS_DEFAULT_UNKNOWN_KERNEL_BUSY_NS 10000000ull

/* lithos_slot.flags */
#define LITHOS_SLOT_ACTIVE 1u
/* lithos_slot.lending_flags */
#define LITHOS_LEND_LOW_PRIORITY 1u
#define LITHOS_LEND_UNROLL_GRAPHS 2u /* graph replays are sent kernel by kernel, so each may borrow */

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
    X(lithos_table_header, cosched_group_of_tpc, uint8_t, LITHOS_MAX_TPCS, "u1") \
    X(lithos_table_header, activity_stride, uint32_t, 1, "<u4")                \
    X(lithos_table_header, lend_atom_ns, uint64_t, 1, "<u8")                   \
    X(lithos_table_header, lend_idle_window_ns, uint64_t, 1, "<u8")            \
    X(lithos_table_header, lend_unknown_kernel_busy_ns, uint64_t, 1, "<u8")

#define LITHOS_SLOT_FIELDS(X)                                                   \
    X(lithos_slot, generation, uint64_t, 1, "<u8")                             \
    X(lithos_slot, tpc_mask, uint64_t, LITHOS_MASK_WORDS, "<u8")               \
    X(lithos_slot, tpcs, uint32_t, 1, "<u4")                                   \
    X(lithos_slot, flags, uint32_t, 1, "<u4")                                  \
    X(lithos_slot, lender_mask, uint64_t, 1, "<u8")                            \
    X(lithos_slot, lending_flags, uint32_t, 1, "<u4")                          \
    X(lithos_slot, reserved, uint32_t, 5, "<u4")

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
    X(lithos_launch_record, kernel_name, char, LITHOS_KERNEL_NAME_BYTES, "S1")  \
    X(lithos_launch_record, predicted_ns, uint64_t, 1, "<u8")                  \
    X(lithos_launch_record, predicted_own_ns, uint64_t, 1, "<u8")              \
    X(lithos_launch_record, lender_slots_used, uint64_t, 1, "<u8")             \
    X(lithos_launch_record, own_tpcs, uint16_t, 1, "<u2")                      \
    X(lithos_launch_record, low_priority, uint8_t, 1, "u1")

/* One client's activity word (page `slot` of the activity file), written only by that client's shim. */
#define LITHOS_ACTIVITY_FIELDS(X)                                               \
    X(lithos_activity, last_launch_ns, uint64_t, 1, "<u8")                     \
    X(lithos_activity, busy_until_ns, uint64_t, 1, "<u8")                      \
    X(lithos_activity, writer_pid, uint32_t, 1, "<u4")

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

/* Identity of one launch (and, when sampled, its GPU duration). predicted_ns: the predictor's
 * duration on `tpcs` (0 = unknown); predicted_own_ns: on own_tpcs (the borrowing decision);
 * lender_slots_used: slots whose TPCs this launch added (0 = did not borrow). */
typedef struct lithos_launch_record {
    LITHOS_LAUNCH_RECORD_FIELDS(LITHOS_DECLARE_FIELD)
} __attribute__((aligned(64))) lithos_launch_record;

/* What one client publishes about itself at every launch (last_launch_ns 0 = never launched). */
typedef struct lithos_activity {
    LITHOS_ACTIVITY_FIELDS(LITHOS_DECLARE_FIELD)
} __attribute__((aligned(64))) lithos_activity;

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
/* Agent side: the slots `slot` may borrow from (bit s = slot s) and LITHOS_LEND_* flags. -1: bad slot. */
int lithos_table_set_lending(void *table, uint32_t slot, uint64_t lender_mask, uint32_t lending_flags);
/* Agent side: the table-wide lending knobs (ns, each >= 1). Returns 0, or -1 for a zero value. */
int lithos_table_set_lending_knobs(void *table, uint64_t atom_ns, uint64_t idle_window_ns,
                                   uint64_t unknown_kernel_busy_ns);
/* Bytes of the activity file of a table with max_slots slots. */
size_t lithos_activity_bytes(uint32_t max_slots);

/*
 * The launch-path rule on one activity word (scheduler/lending.py lender_is_idle / after_launch).
 * lithos_lender_is_idle: 1 when the lender's last launch is at least idle_window_ns old (or it
 * never launched) and now_ns >= busy_until_ns. lithos_activity_after_launch: the launching
 * client's update, busy_until_ns = lithos_busy_after(...): known kernels queue behind each other
 * (max(busy, now) + predicted_ns), an unknown one (predicted_ns 0) keeps the client busy until at
 * least now + unknown_kernel_busy_ns (credits do not add up); safe from many threads.
 */
int lithos_lender_is_idle(uint64_t last_launch_ns, uint64_t busy_until_ns, uint64_t now_ns, uint64_t idle_window_ns);
uint64_t lithos_busy_after(uint64_t busy_until_ns, uint64_t now_ns, uint64_t predicted_ns, uint64_t unknown_kernel_busy_ns);
void lithos_activity_after_launch(lithos_activity *word, uint64_t now_ns, uint64_t predicted_ns,
                                  uint64_t unknown_kernel_busy_ns);
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
