/* launch_path_cpu.c - the shim's own host work per launch, on the CPU, against native/fake_libcuda.c.
 *
 * usage: launch_path_cpu KERNELS LAUNCHES THRASH_BYTES legacy|stream|graph|memset [CODE_BYTES]   (under liblithos.so, with
 * native/build/fake (make -C native fake-driver) on LD_LIBRARY_PATH and FAKE_CUDA_QUIET=1)
 * Launches KERNELS distinct fake kernels in turn (a model's mix: a real program's launches do not
 * hit one function's cache entry in a loop), in alternating blocks of 256 with the shim's work on
 * and bypassed (lithos_client_set_bypass). With THRASH_BYTES > 0 it reads that much memory and
 * with CODE_BYTES > 0 it also runs through that much code (a chain of jumps, one per cache line)
 * before each launch, as a framework does between launches, so the shim's data and code come cold
 * from the caches. graph: each "launch" replays the fake driver's graph 0x6000 (4 kernels and a memset,
 * instantiated through the shim's hook) on a created stream; with the slot's LITHOS_LEND_UNROLL_GRAPHS
 * set, the shim sends its nodes one by one. memset: each "launch" is a cuMemsetD32Async on a created stream
 * (memsets and device-to-device copies take the launch path to the client's green stream). Prints one JSON line: the median and p99 nanoseconds per
 * launch of each arm.
 */
#include <cuda.h>
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

typedef CUresult (*launch_fn)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream,
                              void **, void **);
typedef CUresult (*stream_create_fn)(CUstream *, unsigned);
typedef void (*bypass_fn)(int);
typedef CUresult (*instantiate_fn)(CUgraphExec *, CUgraph, unsigned long long);
typedef CUresult (*graph_launch_fn)(CUgraphExec, CUstream);
typedef CUresult (*memset_fn)(CUdeviceptr, unsigned, size_t, CUstream);

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static volatile uint64_t sink;

/* Reads every cache line of junk: the framework's work between two launches. */
static void thrash(const uint8_t *junk, size_t bytes) {
    uint64_t sum = 0;
    for (size_t i = 0; i < bytes; i += 64) sum += junk[i];
    sink += sum;
}

/* CODE_BYTES of code: a jump to the next cache line in every line, then a return. */
typedef void (*code_fn)(void);
static code_fn make_code(size_t bytes) {
    uint8_t *code = mmap(NULL, bytes + 64, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (code == MAP_FAILED) return NULL;
    for (size_t at = 0; at < bytes; at += 64) {
        int32_t rel = 64 - 5; /* jmp rel32 is 5 bytes */
        code[at] = 0xe9;
        memcpy(code + at + 1, &rel, 4);
    }
    code[bytes] = 0xc3; /* ret */
    return (code_fn)(uintptr_t)code;
}

static int compare_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc != 5 && argc != 6) {
        fprintf(stderr, "usage: %s KERNELS LAUNCHES THRASH_BYTES legacy|stream|graph|memset [CODE_BYTES]\n", argv[0]);
        return 2;
    }
    size_t code_bytes = argc == 6 ? (size_t)atol(argv[5]) & ~(size_t)63 : 0;
    code_fn code = code_bytes ? make_code(code_bytes) : NULL;
    if (code_bytes && !code) return 5;
    unsigned kernels = (unsigned)atoi(argv[1]);
    long launches = atol(argv[2]);
    size_t thrash_bytes = (size_t)atol(argv[3]);
    int legacy = strcmp(argv[4], "legacy") == 0, graph = strcmp(argv[4], "graph") == 0, memset_op = strcmp(argv[4], "memset") == 0;
    memset_fn memset_d32 = (memset_fn)dlsym(RTLD_DEFAULT, "cuMemsetD32Async");
    if (memset_op && !memset_d32) return 7;
    launch_fn launch = (launch_fn)dlsym(RTLD_DEFAULT, "cuLaunchKernel");
    bypass_fn set_bypass = (bypass_fn)dlsym(RTLD_DEFAULT, "lithos_client_set_bypass");
    stream_create_fn stream_create = (stream_create_fn)dlsym(RTLD_DEFAULT, "cuStreamCreate");
    if (!launch || !set_bypass || !stream_create || kernels == 0 || launches <= 0) {
        fprintf(stderr, "needs liblithos.so preloaded and KERNELS, LAUNCHES > 0\n");
        return 3;
    }
    CUstream stream = NULL;
    if (!legacy && stream_create(&stream, CU_STREAM_NON_BLOCKING) != CUDA_SUCCESS) return 4;
    instantiate_fn instantiate = (instantiate_fn)dlsym(RTLD_DEFAULT, "cuGraphInstantiateWithFlags");
    graph_launch_fn graph_launch = (graph_launch_fn)dlsym(RTLD_DEFAULT, "cuGraphLaunch");
    CUgraphExec exec = NULL;
    if (graph && (!instantiate || !graph_launch || instantiate(&exec, (CUgraph)(uintptr_t)0x6000, 0) != CUDA_SUCCESS)) return 6;
    uint8_t *junk = thrash_bytes ? calloc(1, thrash_bytes) : NULL;
    uint32_t *shim = calloc((size_t)launches, sizeof(uint32_t)), *bypass = calloc((size_t)launches, sizeof(uint32_t));
    long n_shim = 0, n_bypass = 0;
    for (long i = 0; i < launches + 2048; i++) { /* the first 2048: every kernel seen, caches filled */
        int bypassed = (i / 256) % 2;
        if (i % 256 == 0) set_bypass(bypassed);
        if (junk) thrash(junk, thrash_bytes);
        if (code) code();
        CUfunction f = (CUfunction)(uintptr_t)(0x100000 + (i % kernels) * 0x40);
        unsigned grid = 1 + (unsigned)(i % 7) * 64;
        uint64_t t0 = now_ns();
        CUresult r = graph       ? graph_launch(exec, stream)
                     : memset_op ? memset_d32((CUdeviceptr)0xd0, 7, grid, stream)
                                 : launch(f, grid, 1, 1, 128, 1, 1, 0, stream, NULL, NULL);
        uint32_t ns = (uint32_t)(now_ns() - t0);
        if (r != CUDA_SUCCESS) {
            fprintf(stderr, "launch %ld failed: %d\n", i, (int)r);
            return 1;
        }
        if (i < 2048) continue;
        if (bypassed) bypass[n_bypass++] = ns;
        else shim[n_shim++] = ns;
    }
    set_bypass(0);
    qsort(shim, (size_t)n_shim, sizeof(uint32_t), compare_u32);
    qsort(bypass, (size_t)n_bypass, sizeof(uint32_t), compare_u32);
    printf("{\"shim_median_ns\": %u, \"bypass_median_ns\": %u, \"shim_p99_ns\": %u, \"bypass_p99_ns\": %u, \"launches\": %ld}\n",
           shim[n_shim / 2], bypass[n_bypass / 2], shim[n_shim * 99 / 100], bypass[n_bypass * 99 / 100], n_shim + n_bypass);
    return 0;
}
