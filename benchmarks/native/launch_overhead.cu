// Times each cudaLaunchKernel call of an empty kernel (host side), 1e5 launches by default.
// usage: launch_overhead N OUT.bin [stream|legacy]   (writes N uint32 nanoseconds)
//   stream: a stream the program creates (cudaStreamNonBlocking); legacy: the default stream 0.
// Under liblithos.so it prints this thread's launches by path (direct, paired, unconfined, continued),
// its deferred-join counts and which driver calls paid owed joins, as one JSON line.
#include <cstdio>
#include <cstring>
#include <dlfcn.h>
#include <cstdlib>
#include <ctime>
#include <vector>
#include <cuda_runtime.h>

__global__ void empty_kernel() {}

static long long now_ns() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 100000;
    bool legacy = argc > 3 && strcmp(argv[3], "legacy") == 0;
    cudaStream_t stream = 0;
    if (!legacy && cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess) return 2;
    for (int i = 0; i < 1000; i++) empty_kernel<<<1, 32, 0, stream>>>();
    cudaStreamSynchronize(stream);
    std::vector<unsigned> ns(n);
    for (int i = 0; i < n; i++) {
        long long t0 = now_ns();
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
