// Times each cudaLaunchKernel call of an empty kernel (host side), 1e5 launches by default.
// usage: launch_overhead N OUT.bin [stream|legacy|ab-stream|ab-legacy]   (writes N uint32 nanoseconds)
//   stream: a stream the program creates (cudaStreamNonBlocking); legacy: the default stream 0.
//   ab-*: under liblithos.so only: driver-level cuLaunchKernel in alternating blocks of 256, even
//   blocks through the shim's hook, odd blocks through the real driver function behind it
//   (lithos_client_real_hook), so one process measures the shim's own cost, A/B interleaved.
// Under liblithos.so it prints this thread's launches by path (direct, paired, unconfined, continued),
// its deferred-join counts and which driver calls paid owed joins, as one JSON line.
#include <cstdio>
#include <cstring>
#include <dlfcn.h>
#include <cstdlib>
#include <ctime>
#include <vector>
#include <cuda.h>
#include <cuda_runtime.h>

__global__ void empty_kernel() {}

static long long now_ns() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

typedef CUresult (*launch_fn)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream,
                              void **, void **);

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 100000;
    const char *mode = argc > 3 ? argv[3] : "stream";
    bool ab = strncmp(mode, "ab-", 3) == 0;
    bool legacy = strcmp(mode + (ab ? 3 : 0), "legacy") == 0;
    cudaStream_t stream = 0;
    if (!legacy && cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess) return 2;
    for (int i = 0; i < 1000; i++) empty_kernel<<<1, 32, 0, stream>>>();
    cudaStreamSynchronize(stream);
    launch_fn through_shim = nullptr, real = nullptr;
    CUfunction function = nullptr;
    if (ab) {
        typedef void *(*real_hook_fn)(const char *);
        real_hook_fn real_hook = (real_hook_fn)dlsym(RTLD_DEFAULT, "lithos_client_real_hook");
        through_shim = (launch_fn)dlsym(RTLD_DEFAULT, "cuLaunchKernel");  // the preloaded shim's hook
        real = real_hook ? (launch_fn)real_hook("cuLaunchKernel") : nullptr;
        cudaFunction_t runtime_function;
        if (!real || !through_shim || cudaGetFuncBySymbol(&runtime_function, (const void *)empty_kernel) != cudaSuccess) {
            fprintf(stderr, "ab modes need liblithos.so preloaded\n");
            return 3;
        }
        function = (CUfunction)runtime_function;
    }
    std::vector<unsigned> ns(n);
    for (int i = 0; i < n; i++) {
        launch_fn launch = (i / 256) % 2 == 0 ? through_shim : real;
        long long t0 = now_ns();
        if (ab)
            launch(function, 1, 1, 1, 32, 1, 1, 0, (CUstream)stream, nullptr, nullptr);
        else
            empty_kernel<<<1, 32, 0, stream>>>();
        ns[i] = (unsigned)(now_ns() - t0);
        if (i % 256 == 255) cudaStreamSynchronize(stream);  // keep the launch queue from filling
    }
    cudaError_t err = cudaStreamSynchronize(stream);
    if (err == cudaSuccess) err = cudaGetLastError();
    if (err != cudaSuccess) { fprintf(stderr, "CUDA error %s\n", cudaGetErrorString(err)); return 1; }
    typedef int (*counts_fn)(unsigned long long *, int);
    typedef const char *(*stub_fn)(int, void **, unsigned long long *);
    counts_fn counts = (counts_fn)dlsym(RTLD_DEFAULT, "lithos_client_launch_counts");
    counts_fn join_counts = (counts_fn)dlsym(RTLD_DEFAULT, "lithos_client_join_counts");
    stub_fn stub = (stub_fn)dlsym(RTLD_DEFAULT, "lithos_client_stub");
    if (counts) {
        unsigned long long c[4] = {0, 0, 0, 0}, j[3] = {0, 0, 0};
        counts(c, 4);  // direct, paired, unconfined, continued (paired launches of a deferred run: no events)
        if (join_counts) join_counts(j, 3);  // deferred runs started, joins paid, legacy joins for other threads
        printf("{\"direct\": %llu, \"paired\": %llu, \"unconfined\": %llu, \"continued\": %llu, \"runs\": %llu, "
               "\"joins_paid\": %llu, \"flushes_by_stub\": {", c[0], c[1], c[2], c[3], j[0], j[1]);
        // which driver calls paid owed joins (through the shim's stubs), e.g. cuStreamSynchronize
        const char *name;
        unsigned long long flushes;
        int printed = 0;
        for (int i = 0; stub && (name = stub(i, NULL, &flushes)) != NULL; i++)
            if (flushes) printf("%s\"%s\": %llu", printed++ ? ", " : "", name, flushes);
        printf("}}\n");
    }
    FILE *f = fopen(argv[2], "wb");
    fwrite(ns.data(), sizeof(unsigned), n, f);
    fclose(f);
    return 0;
}
