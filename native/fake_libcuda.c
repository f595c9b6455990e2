/*
 * fake_libcuda.c - a recording stand-in for libcuda.so.1, for CPU-only tests of liblithos.so.
 *
 * It runs no kernels and owns no GPU. It implements only the driver entry points the shim calls,
 * hands out distinct fake handles, and appends one line per call to a log that a test reads with
 * fake_log(). It keeps the one rule of the real driver that the shim's design depends on: with
 * FAKE_STRICT_EVENTS=1, cuEventRecord refuses an event and a stream of different contexts
 * (CUDA_ERROR_INVALID_HANDLE), as cuda.h documents.
 * Built by tests/test_native.py as <tmp>/libcuda.so.1 and found through LD_LIBRARY_PATH.
 */
#include <cuda.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default")))
#define MAX_HANDLES 4096

static char log_text[1 << 16];
static size_t log_used;
static uintptr_t next_handle = 0x1000;
static CUcontext current_ctx = (CUcontext)0x10, ctx_stack[16]; /* 0x10: the primary context */
static int ctx_depth;
/* handle -> context, for streams and events */
static uintptr_t owner_handle[MAX_HANDLES];
static CUcontext owner_ctx[MAX_HANDLES];
static int owners;

static void logf_(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(log_text + log_used, sizeof(log_text) - log_used, fmt, ap);
    va_end(ap);
    if (n > 0 && log_used + (size_t)n + 1 < sizeof(log_text)) {
        log_used += (size_t)n;
        log_text[log_used++] = '\n';
        log_text[log_used] = '\0';
    }
}

static uintptr_t new_handle(CUcontext ctx) {
    next_handle += 0x10;
    if (owners < MAX_HANDLES) {
        owner_handle[owners] = next_handle;
        owner_ctx[owners++] = ctx;
    }
    return next_handle;
}

static CUcontext ctx_of(uintptr_t handle) {
    if (handle == 0 || handle == (uintptr_t)CU_STREAM_LEGACY || handle == (uintptr_t)CU_STREAM_PER_THREAD) return current_ctx;
    for (int i = 0; i < owners; i++)
        if (owner_handle[i] == handle) return owner_ctx[i];
    return NULL;
}

EXPORT const char *fake_log(void) { return log_text; }
EXPORT void fake_log_clear(void) { log_used = 0, log_text[0] = '\0'; }

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
    *desc = (CUdevResourceDesc)new_handle(NULL);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuGreenCtxCreate(CUgreenCtx *green, CUdevResourceDesc desc, CUdevice dev, unsigned flags) {
    *green = (CUgreenCtx)new_handle(NULL);
    logf_("cuGreenCtxCreate %#lx", (unsigned long)(uintptr_t)*green);
    return CUDA_SUCCESS;
}
/* The converted context of green context G is G + 1. */
EXPORT CUresult cuCtxFromGreenCtx(CUcontext *ctx, CUgreenCtx green) {
    *ctx = (CUcontext)((uintptr_t)green + 1);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuGreenCtxStreamCreate(CUstream *stream, CUgreenCtx green, unsigned flags, int priority) {
    if (flags != CU_STREAM_NON_BLOCKING) return CUDA_ERROR_INVALID_VALUE;
    *stream = (CUstream)new_handle((CUcontext)((uintptr_t)green + 1));
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
    *stream = (CUstream)new_handle(current_ctx);
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
EXPORT CUresult cuStreamGetPriority(CUstream stream, int *priority) { *priority = 0; return CUDA_SUCCESS; }
EXPORT CUresult cuStreamIsCapturing(CUstream stream, CUstreamCaptureStatus *status) {
    *status = CU_STREAM_CAPTURE_STATUS_NONE;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuThreadExchangeStreamCaptureMode(CUstreamCaptureMode *mode) { return CUDA_SUCCESS; }
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
EXPORT CUresult cuEventElapsedTime_v2(float *ms, CUevent start, CUevent end) { *ms = 0.001f; return CUDA_SUCCESS; }
EXPORT CUresult cuStreamWaitEvent(CUstream stream, CUevent event, unsigned flags) {
    logf_("cuStreamWaitEvent %#lx", (unsigned long)(uintptr_t)stream);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuFuncGetAttribute(int *value, CUfunction_attribute attr, CUfunction f) { *value = 0; return CUDA_SUCCESS; }
EXPORT CUresult cuFuncGetName(const char **name, CUfunction f) { *name = "fake_kernel"; return CUDA_SUCCESS; }
EXPORT CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                               unsigned shared, CUstream stream, void **params, void **extra) {
    /* grid x 912 stands for a kernel green contexts refuse (CUDA_ERROR_INVALID_CLUSTER_SIZE = 912) */
    int refused = gx == 912 && ctx_of((uintptr_t)stream) != (CUcontext)0x10;
    logf_("cuLaunchKernel %#lx%s", (unsigned long)(uintptr_t)stream, refused ? " refused" : "");
    return refused ? CUDA_ERROR_INVALID_CLUSTER_SIZE : CUDA_SUCCESS;
}
