/*
 * lithos_stubs.S - the generic driver-call stubs of liblithos.so (x86-64 System V, static code:
 * no code is generated at run time and no memory is writable and executable).
 *
 * lithos_stub_common is entered by a stub with %r11 = its slot (lithos_stubs.h) and every argument
 * of the driver call still in place: rdi rsi rdx rcx r8 r9, xmm0-7, rax (vector count of variadic
 * calls) and the caller's stack. Fast path: no join owed and the real pointer known -> tail jump.
 * Slow path: save the registers in a 16-byte-aligned frame, call lithos_stub_slow(slot) (C, pays
 * the owed joins and resolves the pointer), restore, drop the frame and tail jump, so the real
 * function sees exactly the caller's registers and stack (arguments past the sixth included).
 */
#include "lithos_stubs.h"

    .text
    .p2align 4
    .globl lithos_stub_common
    .hidden lithos_stub_common
    .type lithos_stub_common, @function
lithos_stub_common:
    movl lithos_pending_joins(%rip), %r10d
    orl lithos_held_launches(%rip), %r10d
    testl %r10d, %r10d
    jnz 1f
    movq (%r11), %r10
    testq %r10, %r10
    jz 1f
    jmp *%r10
1:
    pushq %rbp
    movq %rsp, %rbp
    andq $-16, %rsp
    subq $192, %rsp
    movq %rdi, 0(%rsp)
    movq %rsi, 8(%rsp)
    movq %rdx, 16(%rsp)
    movq %rcx, 24(%rsp)
    movq %r8, 32(%rsp)
    movq %r9, 40(%rsp)
    movq %rax, 48(%rsp)
    movaps %xmm0, 64(%rsp)
    movaps %xmm1, 80(%rsp)
    movaps %xmm2, 96(%rsp)
    movaps %xmm3, 112(%rsp)
    movaps %xmm4, 128(%rsp)
    movaps %xmm5, 144(%rsp)
    movaps %xmm6, 160(%rsp)
    movaps %xmm7, 176(%rsp)
    movq %r11, %rdi
    call lithos_stub_slow
    movq %rax, %r11
    movq 0(%rsp), %rdi
    movq 8(%rsp), %rsi
    movq 16(%rsp), %rdx
    movq 24(%rsp), %rcx
    movq 32(%rsp), %r8
    movq 40(%rsp), %r9
    movq 48(%rsp), %rax
    movaps 64(%rsp), %xmm0
    movaps 80(%rsp), %xmm1
    movaps 96(%rsp), %xmm2
    movaps 112(%rsp), %xmm3
    movaps 128(%rsp), %xmm4
    movaps 144(%rsp), %xmm5
    movaps 160(%rsp), %xmm6
    movaps 176(%rsp), %xmm7
    movq %rbp, %rsp
    popq %rbp
    testq %r11, %r11
    jz 2f
    jmp *%r11
2:
    movl $LITHOS_CUDA_ERROR_NOT_FOUND, %eax
    ret
    .size lithos_stub_common, .-lithos_stub_common

/* The pool: LITHOS_STUB_POOL stubs of 16 bytes each; stub i uses lithos_stub_slots[i]. */
    .p2align 4
    .globl lithos_stub_pool
    .hidden lithos_stub_pool
    .type lithos_stub_pool, @function
lithos_stub_pool:
    .set stub_index, 0
    .rept LITHOS_STUB_POOL
    .p2align 4
    endbr64
    leaq lithos_stub_slots + LITHOS_STUB_SLOT_BYTES * stub_index(%rip), %r11
    jmp lithos_stub_common
    .set stub_index, stub_index + 1
    .endr
    .size lithos_stub_pool, .-lithos_stub_pool

    .bss
    .p2align 5
    .globl lithos_stub_slots
    .hidden lithos_stub_slots
    .type lithos_stub_slots, @object
lithos_stub_slots:
    .zero LITHOS_STUB_SLOT_BYTES * LITHOS_STUB_POOL
    .size lithos_stub_slots, .-lithos_stub_slots

    .section .note.GNU-stack, "", @progbits
