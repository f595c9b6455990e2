/*
 * fake_libcuda.c - a recording stand-in for libcuda.so.1, for CPU-only tests of liblithos.so.
 *
 * It runs no kernels and owns no GPU. It implements only the driver entry points the shim calls,
 * hands out distinct fake handles, and appends one line per call to a log that a test reads with
 * fake_log(). It keeps the one rule of the real driver that the shim's design depends on: with
 * FAKE_STRICT_EVENTS=1, cuEventRecord refuses an event and a stream of different contexts
 * (CUDA_ERROR_INVALID_HANDLE), as cuda.h documents.
 * For the lending tests: cuGreenCtxCreate logs how many TPC groups the green context holds,
 * streams keep the priority they were created with, and cuEventElapsedTime reports FAKE_KERNEL_US
 * microseconds (default 1) as every kernel's duration, and cuStreamQuery says drained unless
 * FAKE_STREAM_BUSY=1 (or while the file FAKE_STREAM_BUSY_FILE exists). For the held-launch tests,
 * cuFuncGetParamInfo, cuCtxSetCurrent, cuMemcpyDtoDAsync_v2, cuPointerGetAttribute, cuFuncSetAttribute
 * and cuKernelGet/SetAttribute (below). For the deferred-join tests: cuGetProcAddress(_v2) hands out the few entry
 * points of its table below; cuMemcpyDtoH_v2, cuMemsetD8_v2, cuCtxSynchronize, cuStreamSynchronize
 * and cuFakeManyArgs (not a driver function: 9 integer and 9 double arguments, so some on the
 * stack, which it checks) log their calls; FAKE_CAPTURING=1 makes every stream of the primary
 * context report an active graph capture. For the graph-unrolling tests: cuGraphInstantiateWithFlags,
 * cuGraphGetNodes/Edges, cuGraphNodeGetType, cuGraphKernelNodeGetParams/Attribute, cuGraphMemsetNodeGetParams
 * of two fixed graphs (below), cuLaunchKernelEx (green contexts refuse clusters of 16 CTAs or more) and
 * cuMemsetD32Async (and its _ptsz, for the memory-op routing test). Thread-safe (the shim builds green contexts
 * on a thread of its own); the current context is per thread, as in the real driver.
 * Built by `make -C native fake-driver` as build/fake/libcuda.so.1 and found through LD_LIBRARY_PATH
 * (with FAKE_CUDA_QUIET=1 it logs nothing: benchmarks/native/launch_path_cpu.py).
 */
#include <cuda.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))
#define MAX_HANDLES 4096

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER; /* guards everything below except the context stack */
static char log_text[1 << 16], log_copy[1 << 16];
static size_t log_used;
static uintptr_t next_handle = 0x1000;
static __thread CUcontext current_ctx = (CUcontext)0x10, ctx_stack[16]; /* 0x10: the primary context */
static __thread int ctx_depth;
/* handle -> context and value (a stream's priority, a resource descriptor's group count) */
static uintptr_t owner_handle[MAX_HANDLES];
static CUcontext owner_ctx[MAX_HANDLES];
static int owner_value[MAX_HANDLES];
static int owner_group_sms[MAX_HANDLES]; /* a resource descriptor's or green context's SMs per group */
static int owners;

static void logf_(const char *fmt, ...) {
    static int quiet = -1; /* FAKE_CUDA_QUIET=1: no log, so that only the shim's own work is timed */
    if (quiet < 0) quiet = getenv("FAKE_CUDA_QUIET") && strcmp(getenv("FAKE_CUDA_QUIET"), "1") == 0;
    if (quiet) return;
    pthread_mutex_lock(&lock);
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(log_text + log_used, sizeof(log_text) - log_used, fmt, ap);
    va_end(ap);
    if (n > 0 && log_used + (size_t)n + 1 < sizeof(log_text)) {
        log_used += (size_t)n;
        log_text[log_used++] = '\n';
        log_text[log_used] = '\0';
    }
    pthread_mutex_unlock(&lock);
}

static uintptr_t new_handle_with(CUcontext ctx, int value) {
    pthread_mutex_lock(&lock);
    uintptr_t handle = next_handle += 0x10;
    if (owners < MAX_HANDLES) {
        owner_handle[owners] = handle;
        owner_value[owners] = value;
        owner_ctx[owners++] = ctx;
    }
    pthread_mutex_unlock(&lock);
    return handle;
}

static uintptr_t new_handle(CUcontext ctx) { return new_handle_with(ctx, 0); }

/* Index of a handle in the owner table, or -1. */
static int owner_of(uintptr_t handle) {
    pthread_mutex_lock(&lock);
    int found = -1;
    for (int i = 0; i < owners && found < 0; i++)
        if (owner_handle[i] == handle) found = i;
    pthread_mutex_unlock(&lock);
    return found;
}

static void set_group_sms(uintptr_t handle, int sms) {
    int i = owner_of(handle);
    pthread_mutex_lock(&lock);
    if (i >= 0) owner_group_sms[i] = sms;
    pthread_mutex_unlock(&lock);
}
static int group_sms(uintptr_t handle) {
    int i = owner_of(handle);
    pthread_mutex_lock(&lock);
    int sms = i < 0 ? 0 : owner_group_sms[i];
    pthread_mutex_unlock(&lock);
    return sms;
}

static CUcontext ctx_of(uintptr_t handle) {
    if (handle == 0 || handle == (uintptr_t)CU_STREAM_LEGACY || handle == (uintptr_t)CU_STREAM_PER_THREAD) return current_ctx;
    int i = owner_of(handle);
    return i < 0 ? NULL : owner_ctx[i];
}
/* Streams of green contexts (the primary context is 0x10). */
static int is_green(CUstream stream) { return ctx_of((uintptr_t)stream) != (CUcontext)0x10; }

/* A stable copy of the log (the shim's builder thread may append meanwhile). */
EXPORT const char *fake_log(void) {
    pthread_mutex_lock(&lock);
    memcpy(log_copy, log_text, log_used + 1);
    pthread_mutex_unlock(&lock);
    return log_copy;
}
EXPORT void fake_log_clear(void) {
    pthread_mutex_lock(&lock);
    log_used = 0, log_text[0] = '\0';
    pthread_mutex_unlock(&lock);
}

EXPORT CUresult cuInit(unsigned flags) { return CUDA_SUCCESS; }
EXPORT CUresult cuCtxGetCurrent(CUcontext *ctx) { *ctx = current_ctx; return CUDA_SUCCESS; }
EXPORT CUresult cuCtxGetDevice(CUdevice *dev) { *dev = 0; return CUDA_SUCCESS; }
EXPORT CUresult cuCtxPushCurrent_v2(CUcontext ctx) {
    if (ctx_depth == 16) return CUDA_ERROR_INVALID_VALUE;
    ctx_stack[ctx_depth++] = current_ctx;
    current_ctx = ctx;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxPopCurrent_v2(CUcontext *ctx) {
    if (ctx_depth == 0) return CUDA_ERROR_INVALID_CONTEXT;
    if (ctx) *ctx = current_ctx;
    current_ctx = ctx_stack[--ctx_depth];
    return CUDA_SUCCESS;
}
/* The test's table names this uuid: GPU-00010203-0405-0607-0809-0a0b0c0d0e0f */
EXPORT CUresult cuDeviceGetUuid_v2(CUuuid *uuid, CUdevice dev) {
    for (int i = 0; i < 16; i++) uuid->bytes[i] = (char)i;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDeviceGetDevResource(CUdevice dev, CUdevResource *resource, CUdevResourceType type) {
    memset(resource, 0, sizeof(*resource));
    resource->type = type;
    resource->sm.smCount = 132;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDevSmResourceSplitByCount(CUdevResource *result, unsigned *groups, const CUdevResource *input,
                                            CUdevResource *remaining, unsigned flags, unsigned min_count) {
    unsigned n = flags ? 66 : 15;
    if (*groups > n) *groups = n;
    for (unsigned i = 0; i < *groups; i++) {
        memset(&result[i], 0, sizeof(result[i]));
        result[i].type = CU_DEV_RESOURCE_TYPE_SM;
        result[i].sm.smCount = min_count;
    }
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDevResourceGenerateDesc(CUdevResourceDesc *desc, CUdevResource *resources, unsigned count) {
    *desc = (CUdevResourceDesc)new_handle_with(NULL, (int)count);
    set_group_sms((uintptr_t)*desc, count ? (int)resources[0].sm.smCount : 0);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuGreenCtxCreate(CUgreenCtx *green, CUdevResourceDesc desc, CUdevice dev, unsigned flags) {
    int i = owner_of((uintptr_t)desc);
    *green = (CUgreenCtx)new_handle(NULL);
    set_group_sms((uintptr_t)*green, group_sms((uintptr_t)desc));
    logf_("cuGreenCtxCreate %#lx groups=%d", (unsigned long)(uintptr_t)*green, i < 0 ? -1 : owner_value[i]);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuGreenCtxDestroy(CUgreenCtx green) {
    logf_("cuGreenCtxDestroy %#lx", (unsigned long)(uintptr_t)green);
    return CUDA_SUCCESS;
}
/* The converted context of green context G is G + 1. */
EXPORT CUresult cuCtxFromGreenCtx(CUcontext *ctx, CUgreenCtx green) {
    *ctx = (CUcontext)((uintptr_t)green + 1);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuGreenCtxStreamCreate(CUstream *stream, CUgreenCtx green, unsigned flags, int priority) {
    if (flags != CU_STREAM_NON_BLOCKING) return CUDA_ERROR_INVALID_VALUE;
    *stream = (CUstream)new_handle_with((CUcontext)((uintptr_t)green + 1), priority);
    logf_("cuGreenCtxStreamCreate %#lx green=%#lx priority=%d", (unsigned long)(uintptr_t)*stream,
          (unsigned long)(uintptr_t)green, priority);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuStreamCreate(CUstream *stream, unsigned flags) {
    *stream = (CUstream)new_handle(current_ctx);
    logf_("cuStreamCreate %#lx flags=%u", (unsigned long)(uintptr_t)*stream, flags);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuStreamCreateWithPriority(CUstream *stream, unsigned flags, int priority) {
    *stream = (CUstream)new_handle_with(current_ctx, priority);
    logf_("cuStreamCreateWithPriority %#lx flags=%u priority=%d", (unsigned long)(uintptr_t)*stream, flags, priority);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuStreamDestroy_v2(CUstream stream) {
    logf_("cuStreamDestroy %#lx", (unsigned long)(uintptr_t)stream);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuStreamGetCtx(CUstream stream, CUcontext *ctx) {
    *ctx = ctx_of((uintptr_t)stream);
    return *ctx ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}
EXPORT CUresult cuStreamGetPriority(CUstream stream, int *priority) {
    int i = owner_of((uintptr_t)stream);
    *priority = i < 0 ? 0 : owner_value[i];
    return CUDA_SUCCESS;
}
/* Priorities from 0 (least) to -5 (greatest). */
EXPORT CUresult cuCtxGetStreamPriorityRange(int *least, int *greatest) {
    *least = 0;
    *greatest = -5;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuStreamIsCapturing(CUstream stream, CUstreamCaptureStatus *status) {
    int capturing = getenv("FAKE_CAPTURING") && strcmp(getenv("FAKE_CAPTURING"), "1") == 0;
    *status = capturing && !is_green(stream) ? CU_STREAM_CAPTURE_STATUS_ACTIVE : CU_STREAM_CAPTURE_STATUS_NONE;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuThreadExchangeStreamCaptureMode(CUstreamCaptureMode *mode) { return CUDA_SUCCESS; }
/* Kernels run nowhere, so streams are drained, unless FAKE_STREAM_BUSY=1 (a borrower queued deep). */
EXPORT CUresult cuStreamQuery(CUstream stream) {
    const char *busy_file = getenv("FAKE_STREAM_BUSY_FILE");
    int busy = (getenv("FAKE_STREAM_BUSY") && strcmp(getenv("FAKE_STREAM_BUSY"), "1") == 0) ||
               (busy_file && access(busy_file, F_OK) == 0);
    logf_("cuStreamQuery %#lx %s", (unsigned long)(uintptr_t)stream, busy ? "busy" : "drained");
    return busy ? CUDA_ERROR_NOT_READY : CUDA_SUCCESS;
}
EXPORT CUresult cuEventCreate(CUevent *event, unsigned flags) {
    *event = (CUevent)new_handle(current_ctx);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuEventDestroy_v2(CUevent event) { return CUDA_SUCCESS; }
EXPORT CUresult cuEventRecord(CUevent event, CUstream stream) {
    int strict = getenv("FAKE_STRICT_EVENTS") && strcmp(getenv("FAKE_STRICT_EVENTS"), "1") == 0;
    int same = ctx_of((uintptr_t)event) == ctx_of((uintptr_t)stream);
    logf_("cuEventRecord %#lx %s%s", (unsigned long)(uintptr_t)stream, same ? "same-context" : "cross-context",
          strict && !same ? " refused" : "");
    return strict && !same ? CUDA_ERROR_INVALID_HANDLE : CUDA_SUCCESS;
}
EXPORT CUresult cuEventQuery(CUevent event) { return CUDA_SUCCESS; }
EXPORT CUresult cuEventElapsedTime_v2(float *ms, CUevent start, CUevent end) {
    const char *kernel_us = getenv("FAKE_KERNEL_US");
    *ms = (float)((kernel_us ? atof(kernel_us) : 1.0) / 1000.0);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuStreamWaitEvent(CUstream stream, CUevent event, unsigned flags) {
    logf_("cuStreamWaitEvent %#lx", (unsigned long)(uintptr_t)stream);
    return CUDA_SUCCESS;
}
/* Function handle 0xc1 stands for a kernel compiled with a required 2x2x1 cluster (> 2: co-scheduled view);
 * 0xc2 for the CUkernel handle of that kernel, as the runtime launches library kernels: cuFunc*
 * queries refuse it, and cuKernelGetFunction gives 0xc1. */
EXPORT CUresult cuKernelGetFunction(CUfunction *f, CUkernel kernel) {
    if ((uintptr_t)kernel != 0xc2) return CUDA_ERROR_INVALID_HANDLE;
    *f = (CUfunction)0xc1;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuFuncGetAttribute(int *value, CUfunction_attribute attr, CUfunction f) {
    if ((uintptr_t)f == 0xc2) return CUDA_ERROR_INVALID_HANDLE;
    int clustered = (uintptr_t)f == 0xc1 && (attr == CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_WIDTH ||
                                             attr == CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_HEIGHT);
    *value = clustered ? 2 : 0;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuFuncGetName(const char **name, CUfunction f) {
    if ((uintptr_t)f == 0xc2) return CUDA_ERROR_INVALID_HANDLE;
    *name = (uintptr_t)f == 0xc1 ? "fake_cluster_kernel" : "fake_kernel";
    return CUDA_SUCCESS;
}
/* Function handle 0x88 stands for a kernel with parameters (uint64_t a, uint32_t b): offsets 0 and 8;
 * every other kernel has none. Its launches log both values (held launches copy them). */
EXPORT CUresult cuFuncGetParamInfo(CUfunction f, size_t index, size_t *offset, size_t *size) {
    if ((uintptr_t)f != 0x88 || index > 1) return CUDA_ERROR_INVALID_VALUE;
    *offset = index * 8, *size = index ? 4 : 8;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxSetCurrent(CUcontext ctx) { current_ctx = ctx; return CUDA_SUCCESS; }
EXPORT CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                               unsigned shared, CUstream stream, void **params, void **extra) {
    /* grid x 912 stands for a kernel green contexts refuse (CUDA_ERROR_INVALID_CLUSTER_SIZE = 912), 913
     * for one only green contexts of TPC groups refuse (smaller than the 8-SM co-scheduled groups) */
    CUcontext ctx = ctx_of((uintptr_t)stream);
    int green = is_green(stream);
    int refused = (gx == 912 && green) || (gx == 913 && green && group_sms((uintptr_t)ctx - 1) < 8);
    if ((uintptr_t)f == 0x88 && params)
        logf_("cuLaunchKernel %#lx args=%llu,%u", (unsigned long)(uintptr_t)stream, (unsigned long long)*(uint64_t *)params[0],
              *(uint32_t *)params[1]);
    else
        logf_("cuLaunchKernel %#lx%s", (unsigned long)(uintptr_t)stream, refused ? " refused" : "");
    return refused ? CUDA_ERROR_INVALID_CLUSTER_SIZE : CUDA_SUCCESS;
}

EXPORT CUresult cuGraphLaunch(CUgraphExec graph, CUstream stream) {
    logf_("cuGraphLaunch %#lx", (unsigned long)(uintptr_t)stream);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f, void **params, void **extra) {
    unsigned cluster[3] = {1, 1, 1};
    for (unsigned i = 0; i < config->numAttrs; i++)
        if (config->attrs[i].id == CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION)
            cluster[0] = config->attrs[i].value.clusterDim.x, cluster[1] = config->attrs[i].value.clusterDim.y,
            cluster[2] = config->attrs[i].value.clusterDim.z;
    /* clusters of 16 CTAs or more: refused by every green context (8-SM co-scheduled groups at most) */
    int refused = is_green(config->hStream) && cluster[0] * cluster[1] * cluster[2] >= 16;
    logf_("cuLaunchKernelEx %#lx cluster=%u,%u,%u%s", (unsigned long)(uintptr_t)config->hStream, cluster[0], cluster[1],
          cluster[2], refused ? " refused" : "");
    return refused ? CUDA_ERROR_INVALID_CLUSTER_SIZE : CUDA_SUCCESS;
}

/* Graphs, for the unrolling tests. Graph 0x6000 lists its nodes out of order:
 *   0x6010 kernel 0x88 (args 7, 9), grid 64 -> 0x6020 memset (32-bit value 3 x 16 at 0x5000) -> 0x6030 empty
 *   -> 0x6040 kernel 0xc2 (CUkernel handle, no parameters); 0x6010 -> 0x6050 kernel 0x77 with a 2x1x1
 *   cluster node attribute.
 * Graph 0x6100 holds one host node. An executable graph is its graph's handle + 1. */
static const uintptr_t graph_nodes[] = {0x6040, 0x6050, 0x6030, 0x6020, 0x6010};
static const uintptr_t graph_from[] = {0x6010, 0x6020, 0x6030, 0x6010}, graph_to[] = {0x6020, 0x6030, 0x6040, 0x6050};
static uint64_t node_arg_a = 7;
static uint32_t node_arg_b = 9;
static void *node_args[] = {&node_arg_a, &node_arg_b};
EXPORT CUresult cuGraphInstantiateWithFlags(CUgraphExec *exec, CUgraph graph, unsigned long long flags) {
    *exec = (CUgraphExec)((uintptr_t)graph + 1);
    logf_("cuGraphInstantiateWithFlags %#lx", (unsigned long)(uintptr_t)graph);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuGraphExecDestroy(CUgraphExec exec) {
    logf_("cuGraphExecDestroy %#lx", (unsigned long)(uintptr_t)exec);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuGraphExecKernelNodeSetParams_v2(CUgraphExec exec, CUgraphNode node, const CUDA_KERNEL_NODE_PARAMS *p) {
    logf_("cuGraphExecKernelNodeSetParams %#lx", (unsigned long)(uintptr_t)exec);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuGraphGetNodes(CUgraph graph, CUgraphNode *nodes, size_t *count) {
    size_t n = (uintptr_t)graph == 0x6000 ? 5 : 1;
    if (nodes)
        for (size_t i = 0; i < n && i < *count; i++) nodes[i] = (CUgraphNode)((uintptr_t)graph == 0x6000 ? graph_nodes[i] : 0x6110);
    *count = n;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuGraphGetEdges_v2(CUgraph graph, CUgraphNode *from, CUgraphNode *to, CUgraphEdgeData *data, size_t *count) {
    size_t n = (uintptr_t)graph == 0x6000 ? 4 : 0;
    if (from)
        for (size_t i = 0; i < n && i < *count; i++) {
            from[i] = (CUgraphNode)graph_from[i], to[i] = (CUgraphNode)graph_to[i];
            if (data) memset(&data[i], 0, sizeof(data[i]));
        }
    *count = n;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuGraphNodeGetType(CUgraphNode node, CUgraphNodeType *type) {
    uintptr_t n = (uintptr_t)node;
    *type = n == 0x6020 ? CU_GRAPH_NODE_TYPE_MEMSET : n == 0x6030 ? CU_GRAPH_NODE_TYPE_EMPTY
            : n == 0x6110 ? CU_GRAPH_NODE_TYPE_HOST : CU_GRAPH_NODE_TYPE_KERNEL;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuGraphKernelNodeGetParams_v2(CUgraphNode node, CUDA_KERNEL_NODE_PARAMS *p) {
    uintptr_t n = (uintptr_t)node;
    memset(p, 0, sizeof(*p));
    p->gridDimX = n == 0x6010 ? 64 : 4, p->gridDimY = p->gridDimZ = 1;
    p->blockDimX = 32, p->blockDimY = p->blockDimZ = 1;
    if (n == 0x6010) p->func = (CUfunction)0x88, p->kernelParams = node_args;
    else if (n == 0x6040) p->kern = (CUkernel)0xc2;
    else p->func = (CUfunction)0x77, p->kernelParams = node_args; /* 0x77 takes no parameters: nothing to copy */
    return CUDA_SUCCESS;
}
EXPORT CUresult cuGraphKernelNodeGetAttribute(CUgraphNode node, CUkernelNodeAttrID attr, CUkernelNodeAttrValue *value) {
    memset(value, 0, sizeof(*value));
    if (attr == CU_KERNEL_NODE_ATTRIBUTE_CLUSTER_DIMENSION && (uintptr_t)node == 0x6050)
        value->clusterDim.x = 2, value->clusterDim.y = value->clusterDim.z = 1;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuGraphMemsetNodeGetParams(CUgraphNode node, CUDA_MEMSET_NODE_PARAMS *p) {
    memset(p, 0, sizeof(*p));
    p->dst = 0x5000, p->value = 3, p->elementSize = 4, p->width = 16, p->height = 1;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned value, size_t count, CUstream stream) {
    logf_("cuMemsetD32Async %#lx %u %zu", (unsigned long)(uintptr_t)stream, value, count);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuMemsetD32Async_ptsz(CUdeviceptr dst, unsigned value, size_t count, CUstream stream) {
    logf_("cuMemsetD32Async_ptsz %#lx %u %zu", (unsigned long)(uintptr_t)stream, value, count);
    return CUDA_SUCCESS;
}

/* Entry points that enqueue or wait (the shim's stubs must pay owed joins before them). */
EXPORT CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t bytes) {
    memset(dst, 0, bytes);
    logf_("cuMemcpyDtoH %#lx %zu", (unsigned long)src, bytes);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char value, size_t count) {
    logf_("cuMemsetD8 %#lx %u %zu", (unsigned long)dst, value, count);
    return CUDA_SUCCESS;
}
/* A memset of 912 bytes stands for one that green contexts refuse. */
EXPORT CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char value, size_t count, CUstream stream) {
    int refused = count == 912 && is_green(stream);
    logf_("cuMemsetD8Async %#lx %u %zu%s", (unsigned long)(uintptr_t)stream, value, count, refused ? " refused" : "");
    return refused ? CUDA_ERROR_INVALID_VALUE : CUDA_SUCCESS;
}
EXPORT CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream stream) {
    logf_("cuMemcpyDtoDAsync %#lx %zu", (unsigned long)(uintptr_t)stream, bytes);
    return CUDA_SUCCESS;
}
/* Device memory: every address but 0x4057 (host memory, for the held-copy tests). */
EXPORT CUresult cuPointerGetAttribute(void *data, CUpointer_attribute attr, CUdeviceptr ptr) {
    if (attr != CU_POINTER_ATTRIBUTE_MEMORY_TYPE) return CUDA_ERROR_NOT_SUPPORTED;
    *(unsigned *)data = ptr == 0x4057 ? CU_MEMORYTYPE_HOST : CU_MEMORYTYPE_DEVICE;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuFuncSetAttribute(CUfunction f, CUfunction_attribute attr, int value) {
    logf_("cuFuncSetAttribute %d %d", (int)attr, value);
    return CUDA_SUCCESS;
}
/* Kernel attributes: one stored value per attribute, shared by every kernel; sets are logged. */
static int kernel_attributes[64];
EXPORT CUresult cuKernelGetAttribute(int *value, CUfunction_attribute attr, CUkernel kernel, CUdevice dev) {
    if ((unsigned)attr >= 64) return CUDA_ERROR_INVALID_VALUE;
    *value = __atomic_load_n(&kernel_attributes[attr], __ATOMIC_RELAXED);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuKernelSetAttribute(CUfunction_attribute attr, int value, CUkernel kernel, CUdevice dev) {
    if ((unsigned)attr >= 64) return CUDA_ERROR_INVALID_VALUE;
    __atomic_store_n(&kernel_attributes[attr], value, __ATOMIC_RELAXED);
    logf_("cuKernelSetAttribute %d %d", (int)attr, value);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxSynchronize(void) {
    logf_("cuCtxSynchronize");
    return CUDA_SUCCESS;
}
EXPORT CUresult cuStreamSynchronize(CUstream stream) {
    logf_("cuStreamSynchronize %#lx", (unsigned long)(uintptr_t)stream);
    return CUDA_SUCCESS;
}
/* Not a driver function: arguments i1..i9 must be k * 0x1000000001 and d1..d9 k + 0.25 (k = 1..9). */
EXPORT CUresult cuFakeManyArgs(uint64_t i1, double d1, uint64_t i2, double d2, uint64_t i3, double d3, uint64_t i4, double d4,
                               uint64_t i5, double d5, uint64_t i6, double d6, uint64_t i7, double d7, uint64_t i8, double d8,
                               uint64_t i9, double d9) {
    const uint64_t ints[9] = {i1, i2, i3, i4, i5, i6, i7, i8, i9};
    const double doubles[9] = {d1, d2, d3, d4, d5, d6, d7, d8, d9};
    int ok = 1;
    for (int k = 0; k < 9; k++) ok &= ints[k] == (uint64_t)(k + 1) * 0x1000000001ull && doubles[k] == k + 1.25;
    logf_("cuFakeManyArgs %s", ok ? "ok" : "bad");
    return ok ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

/* cuGetProcAddress hands out the library's own functions, as libcuda does: hidden aliases, because
 * the address of an exported function would go through the GOT and so name whatever interposes it
 * (liblithos.so exports stubs under these names). */
#define LOCAL(name) extern __typeof__(name) local_##name __attribute__((alias(#name), visibility("hidden")));
LOCAL(cuMemcpyDtoH_v2) LOCAL(cuMemsetD8_v2) LOCAL(cuCtxSynchronize) LOCAL(cuStreamSynchronize) LOCAL(cuCtxGetCurrent)
LOCAL(cuLaunchKernel) LOCAL(cuEventRecord) LOCAL(cuStreamWaitEvent) LOCAL(cuFakeManyArgs)
static const struct {
    const char *name;
    void *fn;
} proc_table[] = {
    {"cuMemcpyDtoH", (void *)local_cuMemcpyDtoH_v2},     {"cuMemsetD8", (void *)local_cuMemsetD8_v2},
    {"cuCtxSynchronize", (void *)local_cuCtxSynchronize}, {"cuStreamSynchronize", (void *)local_cuStreamSynchronize},
    {"cuCtxGetCurrent", (void *)local_cuCtxGetCurrent},   {"cuLaunchKernel", (void *)local_cuLaunchKernel},
    {"cuEventRecord", (void *)local_cuEventRecord},       {"cuStreamWaitEvent", (void *)local_cuStreamWaitEvent},
    {"cuFakeManyArgs", (void *)local_cuFakeManyArgs},
};
EXPORT CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, cuuint64_t flags,
                                    CUdriverProcAddressQueryResult *status) {
    for (size_t i = 0; i < sizeof(proc_table) / sizeof(proc_table[0]); i++)
        if (strcmp(proc_table[i].name, symbol) == 0) {
            *pfn = proc_table[i].fn;
            if (status) *status = CU_GET_PROC_ADDRESS_SUCCESS;
            return CUDA_SUCCESS;
        }
    *pfn = NULL;
    if (status) *status = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
    return CUDA_ERROR_NOT_FOUND;
}
EXPORT CUresult cuLaunchKernel_ptsz(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                    unsigned bz, unsigned shared, CUstream stream, void **params, void **extra) {
    logf_("cuLaunchKernel_ptsz %#lx", (unsigned long)(uintptr_t)stream);
    return CUDA_SUCCESS;
}
