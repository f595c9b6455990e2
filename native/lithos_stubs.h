/*
 * lithos_stubs.h - shared by lithos_stubs.S, the generated build/lithos_exports.S and lithos.c.
 *
 * A stub is 16 bytes of code: `endbr64; lea slot(%rip), %r11; jmp lithos_stub_common`. The common
 * part (lithos_stubs.S) jumps straight to slot->real when no join is owed
 * (lithos_pending_joins == 0), no launch is held (lithos_held_launches == 0) and the real pointer is known; otherwise it saves the argument
 * registers, calls lithos_stub_slow(slot) (pays owed joins, resolves a lazy pointer), restores them
 * and jumps to what that returned (CUDA_ERROR_NOT_FOUND when NULL). Stack arguments are never
 * touched. Slots are 32 bytes: real pointer, name, flush count, spare.
 */
#ifndef LITHOS_STUBS_H
#define LITHOS_STUBS_H

#define LITHOS_STUB_POOL 2048      /* stubs the cuGetProcAddress / dlsym hooks can hand out */
#define LITHOS_STUB_CODE_BYTES 16
#define LITHOS_STUB_SLOT_BYTES 32
#define LITHOS_CUDA_ERROR_NOT_FOUND 500

#ifndef __ASSEMBLER__
#include <stdint.h>

typedef struct {
    void *real;       /* atomic; NULL for an exported stub until its first call */
    const char *name; /* exported stubs: the symbol resolved lazily in libcuda; pool: the name asked for */
    uint64_t flushes; /* atomic; calls through this stub that paid owed joins */
    uint64_t reserved;
} lithos_stub_slot;

#define LITHOS_HIDDEN __attribute__((visibility("hidden")))
extern LITHOS_HIDDEN lithos_stub_slot lithos_stub_slots[LITHOS_STUB_POOL];
extern LITHOS_HIDDEN char lithos_stub_pool[];            /* stub i at lithos_stub_pool + 16 * i */
extern LITHOS_HIDDEN lithos_stub_slot lithos_export_slots[];
extern LITHOS_HIDDEN const int lithos_export_count;
extern LITHOS_HIDDEN int lithos_pending_joins;            /* owed joins (pairs); read by every stub */
extern LITHOS_HIDDEN int lithos_held_launches;            /* 1 while launches wait for the dispatcher; read by every stub */
LITHOS_HIDDEN void *lithos_stub_slow(lithos_stub_slot *slot);
#endif

#endif
