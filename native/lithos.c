/*
 * lithos.c - liblithos.so, the LD_PRELOAD shim that confines an unmodified CUDA program's kernel
 * launches to the TPC set (its "allowance") the lithos agent publishes in shared memory.
 *
 * How it catches launches: the CUDA runtime and most libraries get driver entry points through
 * dlsym(libcuda, "cuGetProcAddress_v2") and then cuGetProcAddress(name). This file overrides dlsym
 * and both cuGetProcAddress versions and hands out its own hooks for the names in LITHOS_HOOKS.
 *
 * Per launch (no syscall, no lock held across the launch):
 *   1. load this slot's allowance generation (one atomic load); if it changed, read the TPC mask
 *      under the seqlock and find (or build, once per distinct TPC set) the green contexts;
 *   2. pick the view: kernels with clusters > 2 -> co-scheduled 8-SM view, else TPC view;
 *   3. find the entry for (application stream, view, route) (thread cache, then a locked list);
 *   4. direct: a non-blocking stream the program created through the cuStreamCreate* hooks under
 *      this allowance is itself a green stream of the TPC view: launch on it, no events.
 *      paired (every other stream, cluster kernels, created streams after a change): app stream
 *      -> event -> green stream waits; launch on the green stream; green stream -> event -> app
 *      stream waits. Everything later on the app stream (event records, syncs, copies, graph
 *      capture joins) therefore sees the moved kernel. With deferred joins (default) only the first
 *      launch of a run on one pair orders the green stream after the app stream; the join back is
 *      owed until anything else happens ("Deferred joins" below);
 *   5. write the launch identity into this slot's ring; one launch in sample_every (at random; one
 *      in 4 of kernels not predicted yet) also gets timing events, and its GPU duration is filled in
 *      once it has finished (and fed to the latency predictor, lithos_predictor.c).
 * An allowance of every TPC skips 2-4 and the timing: the launch goes on the program's own stream
 * (nobody can lend to or borrow from such a client; launch_whole_gpu).
 * Lending (the rule of scheduler/lending.py; lithos_shm.h "Notes on lending"), between 2 and 3:
 *   read the clock once (CLOCK_MONOTONIC through the vDSO); if this slot's lender_mask is not
 *   empty and the predictor says the kernel ends within lend_atom_ns on the own TPCs, add the
 *   allowances of the lenders whose activity words say idle; the union's green contexts are
 *   looked up by TPC set (thread cache, then the locked list). A union not built yet is queued to
 *   a builder thread and this launch uses the own TPCs (green contexts are never created on the
 *   launch path for lending). Then this client's own activity word is updated (atomics only),
 *   before the launch is handed to the driver.
 *
 * Deferred joins (LITHOS_DEFER_JOIN, default on; off = the 4 event calls on every paired launch):
 *   a RUN is a sequence of paired launches by one thread on one stream_pair (same app stream,
 *   route, view, priority). Its first launch records app_done on the app stream and makes the green
 *   stream wait (unless the app stream is capturing a graph: then the launch is paired eagerly);
 *   later launches of the run go straight to the green stream, which keeps their order by itself.
 *   A launch of the same thread on the same app stream through another pair, with that run the
 *   only one owed, hands the run over: its green stream waits for the old green stream, and the
 *   owed join moves to the new pair (nothing was enqueued on the app stream meanwhile).
 *   The join back (green_done on the green stream, the app stream waits) is OWED (the pair is in
 *   pending_pairs, lithos_pending_joins > 0) and paid by flush_joins() before:
 *    - any launch that does not continue the run (another pair, another thread, direct, unconfined
 *      and graph launches), and cuStreamDestroy;
 *    - every other driver call except the names of lithos_nojoin.h (calls that neither enqueue nor
 *      wait). The runtime and libraries get driver entry points through cuGetProcAddress or dlsym:
 *      for every other name those hooks hand out a stub of lithos_stubs.S (a pool of 2048; deduped
 *      by real pointer; when it runs out the process goes back to eager joins). Programs linked
 *      with -lcuda reach the stubs liblithos.so exports under the driver's own names
 *      (build/lithos_exports.S, generated from cuda.h by gen_stubs.py). A stub costs one load and
 *      an indirect jump while nothing is owed.
 *   Locking: join_lock (a mutex, uncontended = atomics only) guards pending_pairs and each pair's
 *   pending/owner fields, and is held across a deferred launch (decide, events, launch, mark
 *   owed), so a flush from another thread sees a run either before or after a launch, never in
 *   between. Flushes name the app stream's context (pushed when the flushing thread's current one
 *   differs). A per-thread default stream cannot be named from another thread: a foreign flush
 *   makes that context's legacy stream wait instead (what the legacy stream, device syncs and
 *   blocking streams need) and leaves the join owed to the owner, who pays it at its next call;
 *   a thread exiting with one owed drops it (pthread key destructor).
 *   Limit: a driver call from thread B that is not ordered on the host with thread A's launches
 *   may check "nothing owed" just before A starts a run and then enqueue after A's first kernel:
 *   the two then have no order on the GPU (without the shim they would run in one of the two
 *   orders). Calls ordered on the host (the same thread, or a mutex/condition between them) are exact.
 *
 * Supported: CUDA 13.0 headers, driver 580.159.04, H100 80GB HBM3 under MPS; x86-64 glibc >= 2.34.
 */
#define _GNU_SOURCE
#include <cuda.h>
#undef cuGetProcAddress

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "lithos_predictor.h"
#include "lithos_nojoin.h"
#include "lithos_shm.h"
#include "lithos_stubs.h"

#define EXPORT __attribute__((visibility("default")))

/* LITHOS_PROFILE (make -C native profile: build/liblithos_profile.so, benchmarks only): TSC cycles
 * spent in each section of the launch path, summed over all threads; lithos_client_profile reads
 * them. In the normal build the marks compile to nothing. */
enum { PROF_CLOCK, PROF_ROUTE, PROF_LOOKUP, PROF_PUBLISH, PROF_REAL, PROF_RECORD, PROF_BYPASS_REAL, PROF_SECTIONS };
#ifdef LITHOS_PROFILE
#include <x86intrin.h>
static uint64_t prof_cycles[PROF_SECTIONS], prof_counts[PROF_SECTIONS];
static __thread uint64_t prof_last;
#define PROF_BEGIN() (prof_last = __rdtsc())
#define PROF_MARK(section)                                                                                             \
    do {                                                                                                               \
        uint64_t prof_now = __rdtsc();                                                                                 \
        __atomic_fetch_add(&prof_cycles[section], prof_now - prof_last, __ATOMIC_RELAXED);                             \
        __atomic_fetch_add(&prof_counts[section], 1, __ATOMIC_RELAXED);                                                \
        prof_last = prof_now;                                                                                          \
    } while (0)
#else
#define PROF_BEGIN() ((void)0)
#define PROF_MARK(section) ((void)0)
#endif

/* ---------------------------------------------------------------- hook list (the one list) */

/* X(exported name, name the runtime asks cuGetProcAddress for, 1 for a per-thread-stream (_ptsz) form) */
#define LITHOS_HOOKS(X)                                                \
    X(cuGetProcAddress, "cuGetProcAddress", 0)                         \
    X(cuGetProcAddress_v2, "cuGetProcAddress", 0)                      \
    X(cuInit, "cuInit", 0)                                             \
    X(cuLaunchKernel, "cuLaunchKernel", 0)                             \
    X(cuLaunchKernel_ptsz, "cuLaunchKernel", 1)                        \
    X(cuLaunchKernelEx, "cuLaunchKernelEx", 0)                         \
    X(cuLaunchKernelEx_ptsz, "cuLaunchKernelEx", 1)                    \
    X(cuLaunchCooperativeKernel, "cuLaunchCooperativeKernel", 0)       \
    X(cuLaunchCooperativeKernel_ptsz, "cuLaunchCooperativeKernel", 1)  \
    X(cuGraphLaunch, "cuGraphLaunch", 0)                               \
    X(cuGraphLaunch_ptsz, "cuGraphLaunch", 1)                          \
    X(cuStreamCreate, "cuStreamCreate", 0)                             \
    X(cuStreamCreateWithPriority, "cuStreamCreateWithPriority", 0)     \
    X(cuStreamDestroy_v2, "cuStreamDestroy", 0)                        \
    X(cuMemsetD8Async, "cuMemsetD8Async", 0)                           \
    X(cuMemsetD8Async_ptsz, "cuMemsetD8Async", 1)                      \
    X(cuMemsetD16Async, "cuMemsetD16Async", 0)                         \
    X(cuMemsetD16Async_ptsz, "cuMemsetD16Async", 1)                    \
    X(cuMemsetD32Async, "cuMemsetD32Async", 0)                         \
    X(cuMemsetD32Async_ptsz, "cuMemsetD32Async", 1)                    \
    X(cuMemcpyDtoDAsync_v2, "cuMemcpyDtoDAsync", 0)                    \
    X(cuMemcpyDtoDAsync_v2_ptsz, "cuMemcpyDtoDAsync", 1)               \
    X(cuKernelSetAttribute, "cuKernelSetAttribute", 0)                 \
    X(cuFuncSetAttribute, "cuFuncSetAttribute", 0)                     \
    X(cuGraphInstantiateWithFlags, "cuGraphInstantiateWithFlags", 0)   \
    X(cuGraphInstantiateWithParams, "cuGraphInstantiateWithParams", 0) \
    X(cuGraphInstantiateWithParams_ptsz, "cuGraphInstantiateWithParams", 1) \
    X(cuGraphExecDestroy, "cuGraphExecDestroy", 0)                     \
    X(cuGraphExecUpdate_v2, "cuGraphExecUpdate", 0)                    \
    X(cuGraphExecKernelNodeSetParams_v2, "cuGraphExecKernelNodeSetParams", 0) \
    X(cuGraphExecMemsetNodeSetParams, "cuGraphExecMemsetNodeSetParams", 0) \
    X(cuGraphExecNodeSetParams, "cuGraphExecNodeSetParams", 0)         \
    X(cuGraphNodeSetEnabled, "cuGraphNodeSetEnabled", 0)

/* Signatures of the hooks (the _ptsz forms share their base form's signature). */
typedef CUresult (*fn_cuGetProcAddress)(const char *, void **, int, cuuint64_t);
typedef CUresult (*fn_cuGetProcAddress_v2)(const char *, void **, int, cuuint64_t, CUdriverProcAddressQueryResult *);
typedef CUresult (*fn_cuInit)(unsigned int);
typedef CUresult (*fn_cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                                      CUstream, void **, void **);
typedef fn_cuLaunchKernel fn_cuLaunchKernel_ptsz;
typedef CUresult (*fn_cuLaunchKernelEx)(const CUlaunchConfig *, CUfunction, void **, void **);
typedef fn_cuLaunchKernelEx fn_cuLaunchKernelEx_ptsz;
typedef CUresult (*fn_cuLaunchCooperativeKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                                                 unsigned, CUstream, void **);
typedef fn_cuLaunchCooperativeKernel fn_cuLaunchCooperativeKernel_ptsz;
typedef CUresult (*fn_cuGraphLaunch)(CUgraphExec, CUstream);
typedef fn_cuGraphLaunch fn_cuGraphLaunch_ptsz;
typedef CUresult (*fn_cuStreamCreate)(CUstream *, unsigned int);
typedef CUresult (*fn_cuStreamCreateWithPriority)(CUstream *, unsigned int, int);
typedef CUresult (*fn_cuStreamDestroy_v2)(CUstream);
typedef CUresult (*fn_cuMemsetD8Async)(CUdeviceptr, unsigned char, size_t, CUstream);
typedef CUresult (*fn_cuMemsetD16Async)(CUdeviceptr, unsigned short, size_t, CUstream);
typedef CUresult (*fn_cuMemsetD32Async)(CUdeviceptr, unsigned int, size_t, CUstream);
typedef fn_cuMemsetD8Async fn_cuMemsetD8Async_ptsz;
typedef fn_cuMemsetD16Async fn_cuMemsetD16Async_ptsz;
typedef fn_cuMemsetD32Async fn_cuMemsetD32Async_ptsz;
typedef CUresult (*fn_cuMemcpyDtoDAsync_v2)(CUdeviceptr, CUdeviceptr, size_t, CUstream);
typedef fn_cuMemcpyDtoDAsync_v2 fn_cuMemcpyDtoDAsync_v2_ptsz;
typedef CUresult (*fn_cuKernelSetAttribute)(CUfunction_attribute, int, CUkernel, CUdevice);
typedef CUresult (*fn_cuFuncSetAttribute)(CUfunction, CUfunction_attribute, int);
typedef __typeof__(&cuGraphInstantiateWithFlags) fn_cuGraphInstantiateWithFlags;
typedef CUresult (*fn_cuGraphInstantiateWithParams)(CUgraphExec *, CUgraph, CUDA_GRAPH_INSTANTIATE_PARAMS *);
typedef fn_cuGraphInstantiateWithParams fn_cuGraphInstantiateWithParams_ptsz;
typedef __typeof__(&cuGraphExecDestroy) fn_cuGraphExecDestroy;
typedef __typeof__(&cuGraphExecUpdate_v2) fn_cuGraphExecUpdate_v2;
typedef __typeof__(&cuGraphExecKernelNodeSetParams_v2) fn_cuGraphExecKernelNodeSetParams_v2;
typedef __typeof__(&cuGraphExecMemsetNodeSetParams) fn_cuGraphExecMemsetNodeSetParams;
typedef __typeof__(&cuGraphExecNodeSetParams) fn_cuGraphExecNodeSetParams;
typedef __typeof__(&cuGraphNodeSetEnabled) fn_cuGraphNodeSetEnabled;

#define DECLARE_HOOK(name, query, per_thread) EXPORT __typeof__(*(fn_##name)0) name; static fn_##name real_##name;
LITHOS_HOOKS(DECLARE_HOOK)
#undef DECLARE_HOOK

typedef struct {
    const char *name, *query_name;
    void *hook;
    void **real;
    int per_thread_stream; /* a _ptsz form */
} hook_entry;

#define HOOK_ENTRY(name, query, per_thread) {#name, query, (void *)name, (void **)&real_##name, per_thread},
static hook_entry hooks[] = {LITHOS_HOOKS(HOOK_ENTRY)};
#undef HOOK_ENTRY
#define HOOK_COUNT (sizeof(hooks) / sizeof(hooks[0]))

/* Driver functions the shim itself calls (never hooked). */
#define LITHOS_DRIVER_CALLS(X)                                              \
    X(cuCtxGetCurrent, "cuCtxGetCurrent")                                   \
    X(cuCtxGetDevice, "cuCtxGetDevice")                                     \
    X(cuCtxPushCurrent, "cuCtxPushCurrent_v2")                              \
    X(cuCtxPopCurrent, "cuCtxPopCurrent_v2")                                \
    X(cuCtxFromGreenCtx, "cuCtxFromGreenCtx")                               \
    X(cuDeviceGetUuid, "cuDeviceGetUuid_v2")                                \
    X(cuDeviceGetDevResource, "cuDeviceGetDevResource")                     \
    X(cuDevSmResourceSplitByCount, "cuDevSmResourceSplitByCount")           \
    X(cuDevResourceGenerateDesc, "cuDevResourceGenerateDesc")               \
    X(cuGreenCtxCreate, "cuGreenCtxCreate")                                 \
    X(cuGreenCtxDestroy, "cuGreenCtxDestroy")                               \
    X(cuGreenCtxStreamCreate, "cuGreenCtxStreamCreate")                     \
    X(cuEventCreate, "cuEventCreate")                                       \
    X(cuEventDestroy, "cuEventDestroy_v2")                                  \
    X(cuEventRecord, "cuEventRecord")                                       \
    X(cuEventQuery, "cuEventQuery")                                         \
    X(cuEventElapsedTime, "cuEventElapsedTime_v2")                          \
    X(cuStreamWaitEvent, "cuStreamWaitEvent")                               \
    X(cuStreamGetPriority, "cuStreamGetPriority")                           \
    X(cuCtxGetStreamPriorityRange, "cuCtxGetStreamPriorityRange")           \
    X(cuStreamGetCtx, "cuStreamGetCtx")                                     \
    X(cuStreamIsCapturing, "cuStreamIsCapturing")                           \
    X(cuStreamQuery, "cuStreamQuery")                                       \
    X(cuThreadExchangeStreamCaptureMode, "cuThreadExchangeStreamCaptureMode") \
    X(cuFuncGetAttribute, "cuFuncGetAttribute")                             \
    X(cuFuncGetName, "cuFuncGetName")                                       \
    X(cuFuncGetParamInfo, "cuFuncGetParamInfo")                             \
    X(cuKernelGetFunction, "cuKernelGetFunction")                           \
    X(cuKernelGetAttribute, "cuKernelGetAttribute")                         \
    X(cuPointerGetAttribute, "cuPointerGetAttribute")                       \
    X(cuCtxSetCurrent, "cuCtxSetCurrent")                                   \
    X(cuGraphGetNodes, "cuGraphGetNodes")                                   \
    X(cuGraphGetEdges, "cuGraphGetEdges_v2")                                \
    X(cuGraphNodeGetType, "cuGraphNodeGetType")                             \
    X(cuGraphKernelNodeGetParams, "cuGraphKernelNodeGetParams_v2")          \
    X(cuGraphKernelNodeGetAttribute, "cuGraphKernelNodeGetAttribute")       \
    X(cuGraphMemsetNodeGetParams, "cuGraphMemsetNodeGetParams")

#define DECLARE_DRIVER(name, symbol) static __typeof__(&name) drv_##name;
LITHOS_DRIVER_CALLS(DECLARE_DRIVER)
#undef DECLARE_DRIVER

/* ---------------------------------------------------------------- state */

enum { MODE_PASS_THROUGH = 0, MODE_CONFINED = 1 };

typedef struct {
    CUgreenCtx green;
    CUcontext ctx; /* cuCtxFromGreenCtx(green), for creating events in it */
    uint16_t tpcs;
} view_ctx;

/* Green contexts for one distinct TPC set (an allowance, or an allowance plus borrowed TPCs);
 * never freed (a handful per process). */
typedef struct allowance_route {
    uint64_t tpc_mask[LITHOS_MASK_WORDS];
    view_ctx views[2]; /* LITHOS_VIEW_TPC, LITHOS_VIEW_COSCHED; green == NULL: no such view */
    int whole_gpu;     /* every TPC of the GPU: no green context, launches go on the app stream itself */
    int one_view;      /* both views are one green context of whole co-scheduled groups: every kernel
                        * goes to the TPC view's streams (no switch between views, no extra pair) */
    int failed;        /* a borrowed set whose TPC view could not be built: never used, never rebuilt */
    struct allowance_route *next;
} allowance_route;

#define TIMING_PAIRS 4
/* Event pairs that time sampled launches on one stream (a pair's events are in that stream's context). */
typedef struct {
    CUevent ev[TIMING_PAIRS][2];
    uint64_t ticket[TIMING_PAIRS]; /* ring index + 1 of the sampled launch; 0 = free */
    unsigned next;
} timing_set;
/*
 * Where launches on one application stream go in one view of one route. Two kinds:
 *  - owned: the application created this stream through the shim while this route was in force,
 *    so the stream IS a green stream of the route's TPC view (green_stream == app_stream) and
 *    launches on it need no events;
 *  - paired: a green stream of the shim's own, ordered with the application's stream by an event
 *    each way on every launch (default/legacy, per-thread and foreign streams, cluster kernels,
 *    and owned streams after the allowance changed).
 * Never freed (threads cache pointers); a destroyed application stream marks its entries dead.
 */
typedef struct stream_pair {
    CUcontext app_ctx; /* current context when built; part of the key only for NULL/legacy/per-thread */
    CUstream app_stream;
    pid_t thread; /* only for the per-thread default stream */
    allowance_route *route;
    int view;
    int low_priority; /* a green stream of the least priority (borrowed TPCs of a low-priority slot) */
    int owned;
    int dead; /* atomic; set when the application destroys app_stream */
    CUstream green_stream;
    CUevent app_done;   /* paired only; in app_stream's context: recorded on the app stream */
    CUevent green_done; /* paired only; in the green context: recorded on the green stream */
    timing_set timing; /* none (NULL events) on unconfined pairs */
    /* Deferred joins, guarded by join_lock: the green stream holds launches the app stream has not
     * joined (the pair is in pending_pairs); the thread whose run it is (its &tls); a per-thread
     * default stream's join made to the legacy stream by another thread (the owner still owes it). */
    int pending;
    const void *pending_owner;
    int legacy_joined;
    struct stream_pair *next;
} stream_pair;

/* One notice each (notice_once). */
enum { WARN_PASS = 0, WARN_UNHOOKED, WARN_DEVICE, WARN_ROUTE, WARN_RETRY, WARN_COSCHED, WARN_RING, WARN_CONFINED, WARN_GREEN_STREAMS,
       WARN_ACTIVITY, WARN_BUILDER, WARN_STUBS, WARN_DISPATCH, WARN_DISPATCH_CONFIG, WARN_DISPATCH_VALUE,
       WARN_RETRY_COSCHED, WARN_GRAPH, WARN_GRAPH_REPLAY, WARN_GRAPH_VERSION, WARN_MEMORY_OP, WARN_COUNT };

static struct {
    pthread_once_t once;
    int mode;
    int initialized; /* atomic; 1 once init_once has finished */
    void *libcuda;
    void *(*real_dlsym)(void *, const char *);
    const lithos_table_header *table;
    uint32_t slot;
    lithos_ring_header *ring;
    lithos_launch_record *records;
    const char *activity;          /* every slot's activity page, mapped read-only */
    lithos_activity *own_activity; /* this slot's page, mapped writable (NULL: cannot publish) */
    lithos_predictor *predictor;
    uint32_t sample_every;
    int verbose;
    /* managed device (the GPU whose uuid the table names) */
    pthread_mutex_t lock; /* guards everything below; never held across a launch */
    int device_state;     /* 0 unknown, 1 managed, -1 failed */
    CUdevice device;
    CUdevResource tpc_groups[LITHOS_MAX_TPCS];
    unsigned tpc_group_count;
    CUdevResource cosched_groups[32];
    unsigned cosched_group_count;
    int least_priority; /* cuCtxGetStreamPriorityRange: the least (numerically greatest) priority */
    allowance_route *routes;
    stream_pair *pairs;
    int green_streams; /* create application streams as green streams (LITHOS_GREEN_STREAMS, self-tested once) */
    int green_streams_tested;
    int pace; /* PACE_*: when low-priority borrowers wait for their queue to drain (LITHOS_LEND_PACE) */
    int dispatch;              /* DISPATCH_*: whose kernel launches are held for the dispatcher (LITHOS_DISPATCH) */
    uint64_t dispatch_depth_ns; /* LITHOS_DISPATCH_DEPTH_US; 0 = half the atom */
    int route_memory_ops;       /* memsets and device-to-device copies onto green streams (LITHOS_ROUTE_MEMORY_OPS, default 1) */
    int copy_graphs;            /* atomic; copy graphs at instantiation so that replays can be unrolled (LITHOS_COPY_GRAPHS, default 1) */
    int defer; /* atomic; deferred joins (LITHOS_DEFER_JOIN, default 1); 0 again if the stub pool runs out */
    const void *libcuda_base; /* load address of libcuda.so.1 (dladdr): dlsym hands out stubs only for its functions */
    pthread_key_t exit_key;   /* destructor drops a per-thread-stream join an exiting thread owes */
    char warned[WARN_COUNT];
} g = {.once = PTHREAD_ONCE_INIT, .lock = PTHREAD_MUTEX_INITIALIZER};

/* The three launch paths, counted per thread (lithos_client_launch_counts); PATH_CONTINUED counts
 * the paired launches that continued a deferred run (no event calls), a subset of PATH_PAIRED.
 * Memsets and device-to-device copies count apart: on a green stream, or not (unconfined, whole GPU). */
enum { PATH_DIRECT = 0, PATH_PAIRED = 1, PATH_UNCONFINED = 2, PATH_CONTINUED = 3, PATH_MEMORY_GREEN = 4, PATH_MEMORY_APP = 5,
       LITHOS_PATHS = 6 };
/* Deferred joins, counted per thread (lithos_client_join_counts): runs started (app_done + wait),
 * joins paid (green_done + wait, by this thread's flushes), per-thread-stream joins made to the
 * legacy stream for another thread. */
enum { JOIN_RUNS = 0, JOIN_PAID = 1, JOIN_LEGACY_FOR_OTHER = 2, JOIN_HANDOFFS = 3, LITHOS_JOIN_COUNTS = 4 };
/* Lending outcomes of launches that may borrow, counted per thread (lithos_client_lending_counts):
 * borrowed; idle lenders but their union still being built (own TPCs used); queue too deep; paced
 * (slept, then decided); no prediction yet; predicted longer than the atom; no lender idle; the
 * stream was capturing a graph (a captured kernel would keep the lenders' TPCs in every replay);
 * the grid fits the own SMs (no more blocks than SMs: more TPCs cannot make it faster); the union
 * adds no TPC in the kernel's view (e.g. no whole co-scheduled group for a cluster kernel). The last
 * is not a count: microseconds slept pacing, in all. */
enum { LEND_BORROWED = 0, LEND_UNION_PENDING = 1, LEND_QUEUE_TOO_DEEP = 2, LEND_PACED = 3, LEND_UNKNOWN = 4,
       LEND_TOO_LONG = 5, LEND_NO_IDLE_LENDER = 6, LEND_CAPTURING = 7, LEND_FITS_OWN_SMS = 8, LEND_NO_GAIN = 9,
       LEND_PACED_US = 10, LITHOS_LEND_COUNTS = 11 };
/* SMs per TPC (Hopper). */
#define SMS_PER_TPC 2u
/* A paced borrower sleeps at most this many atoms per launch for its queue to drain. */
#define PACE_MAX_ATOMS 40u
/* LITHOS_LEND_PACE: 0 (default) off; 1 while a lender is idle; "always": whenever the borrower may
 * borrow, so that its queue is already shallow when a lender goes idle. Off by default: on the H100
 * pacing cost best-effort jobs more throughput than borrowing gave (docs/SCHEDULER.md, "Pacing"). */
enum { PACE_OFF = 0, PACE_WHILE_IDLE = 1, PACE_ALWAYS = 2 };
/* LITHOS_DISPATCH: 1 (default) low-priority borrowers hold their launches for the dispatcher thread;
 * "all": every borrower does; 0 off ("Held launches" below). On by default since the H100 runs at
 * 3ff5789 (docs/SCHEDULER.md, "Held launches"); any other value is named on stderr and 1 used. */
enum { DISPATCH_OFF = 0, DISPATCH_LOW_PRIORITY = 1, DISPATCH_ALL = 2 };

/* Unions (own + borrowed TPC sets) waiting for the builder thread; guarded by g.lock. */
#define BUILD_QUEUE 8
static struct {
    pthread_cond_t wake, done;
    uint64_t masks[BUILD_QUEUE][LITHOS_MASK_WORDS];
    unsigned count;
    pid_t pid; /* the process whose builder thread runs (a forked child starts its own) */
} builder = {.wake = PTHREAD_COND_INITIALIZER, .done = PTHREAD_COND_INITIALIZER};

/* A thread's view of one stream it launched on. */
typedef struct {
    CUcontext ctx;
    CUstream stream;
    uint64_t end_ns; /* predicted end of the work this thread queued on the stream */
} stream_queue;

/* Per-thread cache in front of the locked lists. */
#define TLS_PAIRS 8
#define TLS_UNIONS 4
#define TLS_QUEUES 4
static __thread struct {
    uint64_t generation; /* +1, so 0 = nothing cached */
    allowance_route *route;
    CUcontext ctx;
    int ctx_managed;
    stream_pair *pairs[TLS_PAIRS];
    struct {
        uint64_t tpc_mask[LITHOS_MASK_WORDS];
        allowance_route *route;
    } unions[TLS_UNIONS];
    unsigned union_next;
    stream_queue queues[TLS_QUEUES];
    unsigned queue_next;
    uint64_t random; /* xorshift state of sample_due (0 = not seeded) */
    CUcontext app_timing_ctx; /* of app_timing: launches on app streams (made at the first sampled one) */
    timing_set app_timing;
    uint64_t launches[LITHOS_PATHS];        /* this thread's launches by path, for tools */
    uint64_t lending[LITHOS_LEND_COUNTS];   /* this thread's lending outcomes, for tools */
    uint64_t joins[LITHOS_JOIN_COUNTS];     /* this thread's deferred-join events, for tools */
    int in_join;      /* inside join_lock (a stub entered from the driver meanwhile must not flush) */
    int in_init;      /* running init_once (dlsym hands out no stubs, stubs resolve without it) */
    int exit_key_set; /* the exit_key destructor is armed for this thread */
    int is_dispatcher; /* the dispatcher thread: its launches are never held */
} tls;

/* Deferred joins (see the top of the file): pairs whose join is owed, at most PENDING_MAX (a launch
 * that would owe one more joins eagerly). lithos_pending_joins mirrors pending_count for the stubs. */
#define PENDING_MAX 16
LITHOS_HIDDEN int lithos_pending_joins;
static pthread_mutex_t join_lock = PTHREAD_MUTEX_INITIALIZER;
static stream_pair *pending_pairs[PENDING_MAX];
static unsigned pending_count;
/* Stub pool: slots handed out so far, guarded by stub_lock (taken by the cuGetProcAddress and dlsym hooks only). */
static pthread_mutex_t stub_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned stubs_used;

static int launch_bypass; /* atomic; lithos_client_set_bypass (benchmarks only) */

static void notice_once(int which, const char *fmt, ...) {
    if (which >= (int)sizeof(g.warned) || __atomic_exchange_n(&g.warned[which], 1, __ATOMIC_RELAXED)) return;
    va_list ap;
    va_start(ap, fmt);
    fputs("lithos: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

/* ---------------------------------------------------------------- dlsym and init */

static void *real_dlsym_fn(void) {
    void *fn = __atomic_load_n(&g.real_dlsym, __ATOMIC_ACQUIRE);
    if (!fn) {
        fn = dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.34");
        if (!fn) fn = dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.2.5");
        __atomic_store_n(&g.real_dlsym, fn, __ATOMIC_RELEASE);
    }
    return fn;
}

static const hook_entry *find_hook(const char *name) {
    for (size_t i = 0; i < HOOK_COUNT; i++)
        if (strcmp(hooks[i].name, name) == 0) return &hooks[i];
    return NULL;
}

static void resolve_driver(void) {
    g.libcuda = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (!g.libcuda) return;
    void *(*rd)(void *, const char *) = real_dlsym_fn();
    for (size_t i = 0; i < HOOK_COUNT; i++) *hooks[i].real = rd(g.libcuda, hooks[i].name);
#define RESOLVE_DRIVER(name, symbol) drv_##name = rd(g.libcuda, symbol);
    LITHOS_DRIVER_CALLS(RESOLVE_DRIVER)
#undef RESOLVE_DRIVER
}

static int open_ring(const char *table_path, uint32_t slot) {
    char path[4096];
    snprintf(path, sizeof(path), "%s.ring%u", table_path, slot);
    uint32_t capacity = LITHOS_DEFAULT_RING_RECORDS;
    size_t bytes = lithos_ring_bytes(capacity);
    int created = 1;
    int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0 && errno == EEXIST) {
        created = 0;
        fd = open(path, O_RDWR | O_CLOEXEC);
    }
    if (fd < 0) return -1;
    if (created && ftruncate(fd, (off_t)bytes) != 0) {
        close(fd);
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || (size_t)st.st_size < bytes) { /* another writer is still creating it */
        close(fd);
        return -1;
    }
    void *base = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (base == MAP_FAILED) return -1;
    lithos_ring_header *h = base;
    if (created) {
        h->layout_version[0] = LITHOS_LAYOUT_VERSION;
        h->header_bytes[0] = sizeof(lithos_ring_header);
        h->record_bytes[0] = sizeof(lithos_launch_record);
        h->capacity[0] = capacity;
        h->sample_every[0] = g.sample_every;
        h->writer_pid[0] = (uint32_t)getpid();
        __atomic_thread_fence(__ATOMIC_RELEASE);
        memcpy(h->magic, LITHOS_RING_MAGIC, sizeof(h->magic));
    } else if (memcmp(h->magic, LITHOS_RING_MAGIC, sizeof(h->magic)) != 0 || h->capacity[0] != capacity) {
        munmap(base, bytes);
        return -1;
    }
    g.ring = h;
    g.records = (lithos_launch_record *)((char *)base + h->header_bytes[0]);
    return 0;
}

/* Map every slot's activity page read-only and this slot's page writable (lithos_shm.h, region 3). */
static void open_activity(const char *table_path) {
    char path[4096];
    snprintf(path, sizeof(path), "%s.activity", table_path);
    size_t bytes = lithos_activity_bytes(g.table->max_slots[0]);
    if (g.table->activity_stride[0] != LITHOS_ACTIVITY_STRIDE || sysconf(_SC_PAGESIZE) > (long)LITHOS_ACTIVITY_STRIDE) {
        notice_once(WARN_ACTIVITY, "activity pages do not fit this machine's page size: no lending for this client");
        return;
    }
    int fd = open(path, O_RDWR | O_CLOEXEC), writable = fd >= 0;
    if (fd < 0) fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0 || (size_t)st.st_size < bytes) {
        notice_once(WARN_ACTIVITY, "activity file %s not usable (%s): no lending for this client", path,
                    fd < 0 ? strerror(errno) : "too small");
        if (fd >= 0) close(fd);
        return;
    }
    void *all = mmap(NULL, bytes, PROT_READ, MAP_SHARED, fd, 0);
    void *own = writable ? mmap(NULL, LITHOS_ACTIVITY_STRIDE, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
                                (off_t)g.slot * LITHOS_ACTIVITY_STRIDE)
                         : MAP_FAILED;
    close(fd);
    if (all == MAP_FAILED) {
        notice_once(WARN_ACTIVITY, "cannot map %s: no lending for this client", path);
        if (own != MAP_FAILED) munmap(own, LITHOS_ACTIVITY_STRIDE);
        return;
    }
    g.activity = all;
    if (own == MAP_FAILED) {
        notice_once(WARN_ACTIVITY, "cannot write this client's activity word in %s: its TPCs must not be lent "
                    "(its writer_pid stays 0)", path);
        return;
    }
    g.own_activity = own;
    __atomic_store_n(&g.own_activity->writer_pid[0], (uint32_t)getpid(), __ATOMIC_RELEASE);
}

static void on_thread_exit(void *unused);
static void forget_held_in_child(void);
static int drain_held_launches(int paced);
static int waits_for_gpu(lithos_stub_slot *slot);
LITHOS_HIDDEN int lithos_held_launches;

/* An on-by-default switch: off only when the variable is "0". */
static int env_on(const char *name) {
    const char *text = getenv(name);
    return !(text && strcmp(text, "0") == 0);
}

static void init_body(void) {
    resolve_driver();
    const char *table_path = getenv("LITHOS_SHM"), *slot_text = getenv("LITHOS_SLOT");
    g.verbose = getenv("LITHOS_VERBOSE") && atoi(getenv("LITHOS_VERBOSE")) > 0;
    const char *sample_text = getenv("LITHOS_SAMPLE_EVERY");
    g.sample_every = sample_text ? (uint32_t)strtoul(sample_text, NULL, 10) : 64u;
    g.green_streams = env_on("LITHOS_GREEN_STREAMS");
    const char *pace_text = getenv("LITHOS_LEND_PACE");
    g.pace = !pace_text || strcmp(pace_text, "0") == 0 ? PACE_OFF : strcmp(pace_text, "always") == 0 ? PACE_ALWAYS : PACE_WHILE_IDLE;
    const char *dispatch_text = getenv("LITHOS_DISPATCH"), *depth_text = getenv("LITHOS_DISPATCH_DEPTH_US");
    g.dispatch = DISPATCH_LOW_PRIORITY;
    if (dispatch_text && *dispatch_text) {
        if (strcmp(dispatch_text, "0") == 0)
            g.dispatch = DISPATCH_OFF;
        else if (strcmp(dispatch_text, "all") == 0)
            g.dispatch = DISPATCH_ALL;
        else if (strcmp(dispatch_text, "1") != 0)
            notice_once(WARN_DISPATCH_VALUE, "LITHOS_DISPATCH=%s is not 0, 1 or all: 1 is used (best-effort borrowers hold their launches)", dispatch_text);
    }
    g.route_memory_ops = env_on("LITHOS_ROUTE_MEMORY_OPS");
    g.copy_graphs = env_on("LITHOS_COPY_GRAPHS");
    g.dispatch_depth_ns = 0;
    if (depth_text && *depth_text) {
        char *depth_end = NULL;
        double depth_us = strtod(depth_text, &depth_end);
        if (depth_end == depth_text || *depth_end || !(depth_us >= 0 && depth_us <= 1e7))
            notice_once(WARN_DISPATCH_CONFIG, "LITHOS_DISPATCH_DEPTH_US=%s is not a number of microseconds in 0..1e7: half the atom is used", depth_text);
        else
            g.dispatch_depth_ns = (uint64_t)(depth_us * 1000.0);
    }
    g.mode = MODE_PASS_THROUGH;
    if (!table_path || !slot_text || !*table_path || !*slot_text) {
        notice_once(WARN_PASS, "LITHOS_SHM/LITHOS_SLOT not set: passing CUDA launches through unchanged (no TPC allowance)");
        return;
    }
    char *end = NULL;
    unsigned long slot = strtoul(slot_text, &end, 10);
    int fd = open(table_path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0 || (size_t)st.st_size < sizeof(lithos_table_header)) {
        notice_once(WARN_PASS, "allowance table %s not usable (%s): passing CUDA launches through unchanged", table_path,
                    fd < 0 ? strerror(errno) : "too small");
        if (fd >= 0) close(fd);
        return;
    }
    /* PROT_READ on an O_RDONLY descriptor: this process cannot write any allowance. */
    const lithos_table_header *table = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (table == MAP_FAILED || memcmp(table->magic, LITHOS_TABLE_MAGIC, 8) != 0 ||
        table->layout_version[0] != LITHOS_LAYOUT_VERSION ||
        (size_t)st.st_size < lithos_table_bytes(table->max_slots[0])) {
        notice_once(WARN_PASS, "%s is not a lithos allowance table of layout %u: passing CUDA launches through unchanged",
                    table_path, LITHOS_LAYOUT_VERSION);
        return;
    }
    if (*end != '\0' || slot >= table->max_slots[0]) {
        notice_once(WARN_PASS, "LITHOS_SLOT=%s is not a slot of %s (0..%u): passing CUDA launches through unchanged",
                    slot_text, table_path, table->max_slots[0] - 1);
        return;
    }
    g.table = table;
    g.slot = (uint32_t)slot;
    g.predictor = lithos_predictor_create(LITHOS_PREDICTOR_DEFAULT_CAPACITY);
    open_activity(table_path);
    if (open_ring(table_path, g.slot) != 0)
        notice_once(WARN_RING, "cannot open launch ring %s.ring%lu: launches are confined but not recorded", table_path, slot);
    g.mode = MODE_CONFINED;
    if (g.verbose) notice_once(WARN_CONFINED, "slot %lu of %s: confining kernel launches", slot, table_path);
}

/* A forked child owes no joins (its parent's streams are not its own) and must not inherit a lock
 * another parent thread held at the fork. */
static void forget_joins_in_child(void) {
    pthread_mutex_init(&join_lock, NULL);
    pthread_mutex_init(&stub_lock, NULL);
    for (unsigned i = 0; i < pending_count; i++) pending_pairs[i]->pending = 0;
    pending_count = 0;
    __atomic_store_n(&lithos_pending_joins, 0, __ATOMIC_RELEASE);
    tls.in_join = 0;
    forget_held_in_child();
}

static void init_once(void) {
    tls.in_init = 1;
    init_body();
    int defer = g.mode == MODE_CONFINED && env_on("LITHOS_DEFER_JOIN");
    Dl_info info;
    if (defer && drv_cuCtxGetCurrent && dladdr((void *)drv_cuCtxGetCurrent, &info) && info.dli_fbase)
        g.libcuda_base = info.dli_fbase;
    if (defer && pthread_key_create(&g.exit_key, on_thread_exit) != 0) defer = 0;
    if (defer) pthread_atfork(NULL, NULL, forget_joins_in_child);
    __atomic_store_n(&g.defer, defer, __ATOMIC_RELEASE);
    __atomic_store_n(&g.initialized, 1, __ATOMIC_RELEASE);
    tls.in_init = 0;
}

/* One load once initialised: pthread_once is a call into libc, whose code is cold at every launch. */
static inline void ensure_init(void) {
    if (__builtin_expect(!__atomic_load_n(&g.initialized, __ATOMIC_ACQUIRE), 0)) pthread_once(&g.once, init_once);
}

static void *stub_for(const char *name, void *fn, int only_libcuda);

EXPORT void *dlsym(void *handle, const char *symbol) {
    void *(*rd)(void *, const char *) = real_dlsym_fn();
    if (symbol && symbol[0] == 'c' && symbol[1] == 'u') {
        const hook_entry *e = find_hook(symbol);
        if (e) {
            ensure_init();
            return rd(handle, symbol) ? e->hook : NULL;
        }
        if (symbol[2] >= 'A' && symbol[2] <= 'Z' && !tls.in_init) { /* a driver name: a stub that pays owed joins */
            void *fn = rd(handle, symbol);
            return fn ? stub_for(symbol, fn, 1) : NULL;
        }
    }
    return rd(handle, symbol);
}

/* The hooks that change or destroy executable graphs (their copies for unrolled replays follow them). */
static int changes_graphs(const void *hook) {
    const void *changing[] = {(void *)cuGraphExecDestroy, (void *)cuGraphExecUpdate_v2, (void *)cuGraphExecKernelNodeSetParams_v2,
                              (void *)cuGraphExecMemsetNodeSetParams, (void *)cuGraphExecNodeSetParams, (void *)cuGraphNodeSetEnabled};
    for (size_t i = 0; i < sizeof(changing) / sizeof(changing[0]); i++)
        if (hook == changing[i]) return 1;
    return 0;
}

/* Swap a driver pointer the runtime asked for by name for our hook of the same function, or for a
 * stub that pays owed joins (every other name but those of lithos_nojoin.h). */
static void swap_for_hook(const char *symbol, void **pfn, cuuint64_t flags) {
    if (!pfn || !*pfn) return;
    const hook_entry *by_name = NULL;
    for (size_t i = 0; i < HOOK_COUNT; i++) {
        if (strcmp(hooks[i].query_name, symbol) != 0) continue;
        if (*hooks[i].real == *pfn) {
            *pfn = hooks[i].hook;
            return;
        }
        if (hooks[i].per_thread_stream == ((flags & CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM) != 0)) by_name = &hooks[i];
    }
    for (size_t i = 0; i < HOOK_COUNT && !by_name; i++) /* another name of a hooked function (cuGraphInstantiate: ...WithFlags) */
        if (*hooks[i].real && *hooks[i].real == *pfn) {
            *pfn = hooks[i].hook;
            return;
        }
    if (by_name && !*by_name->real) { /* libcuda did not export it under our name: adopt this pointer */
        *by_name->real = *pfn;
        *pfn = by_name->hook;
        return;
    } else if (by_name && changes_graphs(by_name->hook)) {
        /* an older version of a call that changes executable graphs: copies could go stale */
        __atomic_store_n(&g.copy_graphs, 0, __ATOMIC_RELEASE);
        notice_once(WARN_GRAPH_VERSION, "cuGetProcAddress(%s) returned an older version: graph replays are never unrolled", symbol);
    } else if (by_name) {
        notice_once(WARN_UNHOOKED, "cuGetProcAddress(%s) returned an unknown variant; it is not confined", symbol);
    }
    *pfn = stub_for(symbol, *pfn, 0);
}

EXPORT CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int cuda_version, cuuint64_t flags,
                                    CUdriverProcAddressQueryResult *status) {
    ensure_init();
    if (!real_cuGetProcAddress_v2) return CUDA_ERROR_NOT_FOUND;
    CUresult r = real_cuGetProcAddress_v2(symbol, pfn, cuda_version, flags, status);
    if (r == CUDA_SUCCESS && symbol) swap_for_hook(symbol, pfn, flags);
    return r;
}

EXPORT CUresult cuGetProcAddress(const char *symbol, void **pfn, int cuda_version, cuuint64_t flags) {
    ensure_init();
    if (!real_cuGetProcAddress) return CUDA_ERROR_NOT_FOUND;
    CUresult r = real_cuGetProcAddress(symbol, pfn, cuda_version, flags);
    if (r == CUDA_SUCCESS && symbol) swap_for_hook(symbol, pfn, flags);
    return r;
}

EXPORT CUresult cuInit(unsigned int flags) {
    ensure_init();
    return real_cuInit ? real_cuInit(flags) : CUDA_ERROR_NOT_FOUND;
}

EXPORT int64_t lithos_client_allowance(uint64_t tpc_mask[LITHOS_MASK_WORDS]) {
    ensure_init();
    if (g.mode != MODE_CONFINED) return -1;
    uint32_t flags;
    return (int64_t)lithos_table_read_allowance(g.table, g.slot, tpc_mask, &flags);
}

/* ---------------------------------------------------------------- kernels: names and clusters */

#define FUNC_CACHE_SIZE 8192u
typedef struct {
    uintptr_t function; /* atomic; 0 = empty */
    uint32_t ready;     /* atomic; 1 once the fields below are filled */
    uint32_t refused; /* atomic; REFUSED_COSCHED once the TPC view refused its cluster shape, | ctas << 8: launches with
                       * clusters of at least that many CTAs run unconfined (one word: func_info's size is on the launch path) */
    uint32_t cluster[3];
    int32_t param_count;    /* kernel parameters (cuFuncGetParamInfo), with LITHOS_DISPATCH only; -1 unknown */
    uint32_t param_bytes;   /* end of the last parameter */
    uint16_t *param_layout; /* offset and size of each parameter */
    char name[LITHOS_KERNEL_NAME_BYTES];
} func_info;
static func_info func_cache[FUNC_CACHE_SIZE];
static uint64_t func_queries; /* atomic; driver queries of a kernel's name and cluster (cache fills and misses) */

/* The runtime launches library kernels by their CUkernel handle, which cuFunc* queries refuse:
 * after such a refusal a kernel is asked through its CUfunction in the current context (NULL when
 * f is no CUkernel either). */
static CUfunction function_of_kernel(CUfunction f) {
    CUfunction from_kernel = NULL;
    return drv_cuKernelGetFunction && drv_cuKernelGetFunction(&from_kernel, (CUkernel)f) == CUDA_SUCCESS ? from_kernel : NULL;
}

#define HELD_MAX_PARAMS 256
/* The parameter layout of f, or of the function of CUkernel f: (offset, size) pairs into layout, the
 * end of the last parameter into *bytes. Returns the count (0: the kernel takes none), -1 when f
 * cannot be asked or has more than max. */
static int param_layout(CUfunction f, uint16_t *layout, int max, size_t *bytes) {
    size_t offset, size;
    int n = 0;
    *bytes = 0;
    if (!drv_cuFuncGetParamInfo) return -1;
    CUresult r = drv_cuFuncGetParamInfo(f, 0, &offset, &size);
    CUfunction from_kernel = r == CUDA_SUCCESS ? NULL : function_of_kernel(f);
    if (from_kernel) r = drv_cuFuncGetParamInfo(f = from_kernel, 0, &offset, &size);
    if (r != CUDA_SUCCESS) return r == CUDA_ERROR_INVALID_VALUE ? 0 : -1; /* index 0 out of range: no parameters */
    for (; r == CUDA_SUCCESS; r = drv_cuFuncGetParamInfo(f, (size_t)++n, &offset, &size)) {
        if (n == max || offset > 0xffff || size > 0xffff) return -1;
        layout[2 * n] = (uint16_t)offset, layout[2 * n + 1] = (uint16_t)size;
        if (offset + size > *bytes) *bytes = offset + size;
    }
    return n;
}

/* The parameter layout a held launch copies its arguments by (-1: none known, never held). A kernel
 * with no parameter is never held (its launch has nothing to copy, and holding buys nothing). */
static void query_params(CUfunction f, func_info *out) {
    uint16_t layout[2 * HELD_MAX_PARAMS];
    size_t bytes;
    out->param_count = -1;
    int n = param_layout(f, layout, HELD_MAX_PARAMS, &bytes);
    if (n <= 0 || !(out->param_layout = malloc(sizeof(uint16_t) * 2 * (size_t)n))) return;
    memcpy(out->param_layout, layout, sizeof(uint16_t) * 2 * (size_t)n);
    out->param_bytes = (uint32_t)bytes;
    out->param_count = n;
}

static void query_func(CUfunction f, func_info *out, int cached) {
    __atomic_fetch_add(&func_queries, 1, __ATOMIC_RELAXED);
    out->param_count = -1;
    out->refused = 0; /* a scratch entry lives on the stack */
    if (cached && g.dispatch && drv_cuFuncGetParamInfo) query_params(f, out);
    /* Name and compiled-in cluster shape (a shape missed here sends the kernel to a view that refuses it). */
    const char *name = NULL;
    CUfunction asked = f;
    if (drv_cuFuncGetName(&name, f) != CUDA_SUCCESS || !name) {
        CUfunction from_kernel = function_of_kernel(f);
        if (from_kernel) asked = from_kernel;
        if (!from_kernel || drv_cuFuncGetName(&name, asked) != CUDA_SUCCESS) name = NULL;
    }
    if (!name) name = "?";
    int dims[3] = {0, 0, 0};
    const CUfunction_attribute attrs[3] = {CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_WIDTH, CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_HEIGHT,
                                           CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_DEPTH};
    for (int i = 0; i < 3; i++)
        if (drv_cuFuncGetAttribute(&dims[i], attrs[i], asked) != CUDA_SUCCESS) dims[i] = 0;
    for (int i = 0; i < 3; i++) out->cluster[i] = dims[i] > 0 ? (uint32_t)dims[i] : 1u;
    strncpy(out->name, name, sizeof(out->name) - 1);
    out->name[sizeof(out->name) - 1] = '\0';
}

/* Lock-free insert-once cache: the first thread to see a function fills its entry. */
static const func_info *lookup_func(CUfunction f, func_info *scratch) {
    uintptr_t key = (uintptr_t)f;
    uint32_t h = (uint32_t)((key >> 4) * 2654435761u) & (FUNC_CACHE_SIZE - 1);
    for (uint32_t probe = 0; probe < 64; probe++) {
        func_info *e = &func_cache[(h + probe) & (FUNC_CACHE_SIZE - 1)];
        uintptr_t current = __atomic_load_n(&e->function, __ATOMIC_ACQUIRE);
        if (current == key) {
            if (__atomic_load_n(&e->ready, __ATOMIC_ACQUIRE)) return e;
            break; /* another thread is filling it */
        }
        if (current == 0) {
            uintptr_t expected = 0;
            if (__atomic_compare_exchange_n(&e->function, &expected, key, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
                query_func(f, e, 1);
                __atomic_store_n(&e->ready, 1u, __ATOMIC_RELEASE);
                return e;
            }
            if (expected == key) break;
        }
    }
    query_func(f, scratch, 0);
    return scratch;
}

/* ---------------------------------------------------------------- green contexts */

/* Fills view (green context, its CUcontext) or leaves it empty (green NULL) and returns -1. */
static int build_view(view_ctx *view, CUdevResource *groups, unsigned count) {
    CUdevResourceDesc desc;
    CUgreenCtx green = NULL;
    if (count == 0 || drv_cuDevResourceGenerateDesc(&desc, groups, count) != CUDA_SUCCESS ||
        drv_cuGreenCtxCreate(&green, desc, g.device, CU_GREEN_CTX_DEFAULT_STREAM) != CUDA_SUCCESS)
        return -1;
    if (drv_cuCtxFromGreenCtx(&view->ctx, green) != CUDA_SUCCESS) {
        drv_cuGreenCtxDestroy(green);
        return -1;
    }
    view->green = green;
    return 0;
}

static int mask_has(const uint64_t *mask, unsigned tpc) { return (mask[tpc / 64] >> (tpc % 64)) & 1u; }

/* The green contexts of one TPC set (1-2 ms on an H100). Needs no lock: it reads only what
 * prepare_device fixed. Returns NULL without memory, else a route (failed = 1 without a TPC view).
 * When the co-scheduled 8-SM groups inside the set cover all of it (Ray grants a multiple of 4 TPCs so), one
 * green context of those groups serves both views (one_view). */
static allowance_route *build_route(const uint64_t mask[LITHOS_MASK_WORDS]) {
    allowance_route *r = calloc(1, sizeof(*r));
    if (!r) return NULL;
    memcpy(r->tpc_mask, mask, sizeof(r->tpc_mask));
    CUdevResource picked[LITHOS_MAX_TPCS], cosched[LITHOS_MAX_TPCS];
    unsigned n = 0, groups = 0, cosched_tpcs = 0;
    for (unsigned t = 0; t < g.tpc_group_count; t++)
        if (mask_has(mask, t)) picked[n++] = g.tpc_groups[t];
    /* Co-scheduled view: the 8-SM groups whose TPCs all lie in the allowance. */
    if (__atomic_load_n(&g.table->cosched_probed[0], __ATOMIC_ACQUIRE)) {
        for (unsigned c = 0; c < g.cosched_group_count; c++) {
            unsigned members = 0, allowed = 0;
            for (unsigned t = 0; t < g.tpc_group_count; t++)
                if (g.table->cosched_group_of_tpc[t] == c) {
                    members++;
                    allowed += mask_has(mask, t);
                }
            if (members > 0 && members == allowed) {
                cosched[groups++] = g.cosched_groups[c];
                cosched_tpcs += members;
            }
        }
    }
    r->views[LITHOS_VIEW_TPC].tpcs = (uint16_t)n;
    r->views[LITHOS_VIEW_COSCHED].tpcs = (uint16_t)cosched_tpcs;
    if (n > 0 && cosched_tpcs == n && build_view(&r->views[LITHOS_VIEW_COSCHED], cosched, groups) == 0) {
        r->views[LITHOS_VIEW_TPC] = r->views[LITHOS_VIEW_COSCHED];
        r->one_view = 1;
        return r;
    }
    if (cosched_tpcs == n) groups = 0; /* that build failed: no co-scheduled view */
    if (n == 0 || build_view(&r->views[LITHOS_VIEW_TPC], picked, n) != 0) {
        notice_once(WARN_ROUTE, "cannot build a green context for a set of %u TPCs: launches on it pass through or "
                    "stay on the own TPCs", n);
        r->failed = 1;
        return r;
    }
    if (groups > 0) build_view(&r->views[LITHOS_VIEW_COSCHED], cosched, groups);
    if (!r->views[LITHOS_VIEW_COSCHED].green)
        notice_once(WARN_COSCHED, "%s: kernels with clusters > 2 pass through unconfined",
                    g.table->cosched_probed[0] ? "no co-scheduled 8-SM group lies inside the allowance"
                                               : "the table has no co-scheduled group map (run probe-layout)");
    return r;
}

/* Called with g.lock held: the route of this exact TPC set, built or failed; NULL if none yet. */
static allowance_route *find_route(const uint64_t mask[LITHOS_MASK_WORDS], int whole_gpu) {
    for (allowance_route *r = g.routes; r; r = r->next)
        if (r->whole_gpu == whole_gpu && memcmp(r->tpc_mask, mask, sizeof(r->tpc_mask)) == 0) return r;
    return NULL;
}

/* Called with g.lock held: the route of the slot's own allowance, built here if new (the one
 * green-context build on the launch path, once per distinct allowance). */
static allowance_route *find_or_build_route(const uint64_t mask[LITHOS_MASK_WORDS]) {
    unsigned tpcs = 0;
    for (unsigned t = 0; t < g.tpc_group_count; t++) tpcs += mask_has(mask, t);
    int whole_gpu = tpcs > 0 && tpcs == g.tpc_group_count; /* nothing to confine (a lending union of every TPC is green) */
    allowance_route *r = find_route(mask, whole_gpu);
    if (r && !r->failed) return r;
    if (whole_gpu && (r = calloc(1, sizeof(*r)))) {
        memcpy(r->tpc_mask, mask, sizeof(r->tpc_mask));
        r->whole_gpu = 1;
        r->views[LITHOS_VIEW_TPC].tpcs = r->views[LITHOS_VIEW_COSCHED].tpcs = (uint16_t)tpcs;
    } else {
        r = build_route(mask);
    }
    if (r && r->failed) {
        free(r);
        return NULL;
    }
    if (r) {
        r->next = g.routes;
        g.routes = r;
    }
    return r;
}

/* The builder thread: creates the green contexts of queued unions off the launch path. */
static void *builder_main(void *unused) {
    pthread_mutex_lock(&g.lock);
    for (;;) {
        while (builder.count == 0) pthread_cond_wait(&builder.wake, &g.lock);
        uint64_t mask[LITHOS_MASK_WORDS];
        memcpy(mask, builder.masks[0], sizeof(mask));
        pthread_mutex_unlock(&g.lock);
        allowance_route *r = build_route(mask);
        pthread_mutex_lock(&g.lock);
        if (r) {
            r->next = g.routes;
            g.routes = r;
        }
        builder.count--; /* dequeued only now, so a launch meanwhile does not queue it again */
        memmove(builder.masks[0], builder.masks[1], builder.count * sizeof(builder.masks[0]));
        if (builder.count == 0) pthread_cond_broadcast(&builder.done);
    }
    return NULL;
}

/* Called with g.lock held: queue a union for the builder thread (started on first use per process). */
static void request_build(const uint64_t mask[LITHOS_MASK_WORDS]) {
    pid_t pid = getpid(); /* first: a forked child may have inherited a queue but no thread */
    if (builder.pid != pid) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int started = pthread_create(&thread, &attr, builder_main, NULL) == 0;
        pthread_attr_destroy(&attr);
        if (!started) {
            notice_once(WARN_BUILDER, "cannot start the green-context builder thread: no lending for this client");
            return;
        }
        builder.pid = pid;
    }
    int queued = 0;
    for (unsigned i = 0; i < builder.count; i++) queued |= memcmp(builder.masks[i], mask, sizeof(builder.masks[i])) == 0;
    if (!queued && builder.count < BUILD_QUEUE) memcpy(builder.masks[builder.count++], mask, sizeof(builder.masks[0]));
    pthread_cond_signal(&builder.wake);
}

/* The route of own + borrowed TPCs, or NULL while it is being built (or could not be). */
static allowance_route *union_route(const uint64_t mask[LITHOS_MASK_WORDS]) {
    for (unsigned i = 0; i < TLS_UNIONS; i++)
        if (tls.unions[i].route && memcmp(tls.unions[i].tpc_mask, mask, sizeof(tls.unions[i].tpc_mask)) == 0)
            return tls.unions[i].route->failed ? NULL : tls.unions[i].route;
    pthread_mutex_lock(&g.lock);
    allowance_route *r = find_route(mask, 0);
    if (!r) request_build(mask);
    pthread_mutex_unlock(&g.lock);
    if (!r) return NULL;
    unsigned i = tls.union_next++ % TLS_UNIONS;
    memcpy(tls.unions[i].tpc_mask, mask, sizeof(tls.unions[i].tpc_mask));
    tls.unions[i].route = r;
    return r->failed ? NULL : r;
}

/* Called with g.lock held: is the current context's device the one the table manages? */
static int prepare_device(CUdevice dev) {
    if (g.device_state != 0) return g.device_state > 0 && dev == g.device;
    CUuuid uuid;
    char text[64];
    if (drv_cuDeviceGetUuid(&uuid, dev) != CUDA_SUCCESS) return 0;
    const unsigned char *b = (const unsigned char *)uuid.bytes;
    snprintf(text, sizeof(text), "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1], b[2],
             b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
    if (strcmp(text, g.table->gpu_uuid) != 0) {
        notice_once(WARN_DEVICE, "device %d is %s, not the table's %s: its launches pass through", (int)dev, text,
                    g.table->gpu_uuid);
        return 0; /* another device: keep looking, it may be used later */
    }
    g.device = dev;
    g.device_state = -1;
    CUdevResource all, rest;
    unsigned count = g.table->tpcs_on_gpu[0];
    if (drv_cuDeviceGetDevResource(dev, &all, CU_DEV_RESOURCE_TYPE_SM) != CUDA_SUCCESS ||
        drv_cuDevSmResourceSplitByCount(g.tpc_groups, &count, &all, &rest, CU_DEV_SM_RESOURCE_SPLIT_IGNORE_SM_COSCHEDULING, 2) !=
            CUDA_SUCCESS) {
        notice_once(WARN_ROUTE, "cannot split device %d into TPCs: launches pass through", (int)dev);
        return 0;
    }
    g.tpc_group_count = count;
    count = 32;
    if (drv_cuDevSmResourceSplitByCount(g.cosched_groups, &count, &all, &rest, 0, 8) != CUDA_SUCCESS)
        count = 0;
    g.cosched_group_count = count;
    int least = 0, greatest = 0;
    g.least_priority = drv_cuCtxGetStreamPriorityRange && drv_cuCtxGetStreamPriorityRange(&least, &greatest) == CUDA_SUCCESS
                           ? least : 0;
    g.device_state = 1;
    return 1;
}

static int special_stream(CUstream s) { return s == NULL || s == CU_STREAM_LEGACY || s == CU_STREAM_PER_THREAD; }

/* Does entry p serve launches on app_stream in this view of this route? Special handles stand for
 * a different stream in every context (and every thread, for the per-thread stream); a real handle
 * names one stream. */
static int pair_matches(const stream_pair *p, CUcontext app_ctx, CUstream app_stream, pid_t thread, allowance_route *route,
                        int view, int low_priority) {
    return p->app_stream == app_stream && p->route == route && p->view == view && p->thread == thread &&
           p->low_priority == low_priority &&
           (!special_stream(app_stream) || p->app_ctx == app_ctx) && !__atomic_load_n(&p->dead, __ATOMIC_RELAXED);
}

static void timing_destroy(timing_set *t) {
    for (int i = 0; i < TIMING_PAIRS; i++)
        for (int j = 0; j < 2; j++)
            if (t->ev[i][j]) drv_cuEventDestroy(t->ev[i][j]);
    memset(t, 0, sizeof(*t));
}

/* Called with g.lock held (as every push of a possibly green context here): all pairs, in ctx.
 * Returns 0, keeping none, when one cannot be made. */
static int timing_create(timing_set *t, CUcontext ctx) {
    memset(t, 0, sizeof(*t));
    if (drv_cuCtxPushCurrent(ctx) != CUDA_SUCCESS) return 0;
    int ok = 1;
    for (int i = 0; ok && i < TIMING_PAIRS; i++)
        ok = drv_cuEventCreate(&t->ev[i][0], CU_EVENT_DEFAULT) == CUDA_SUCCESS &&
             drv_cuEventCreate(&t->ev[i][1], CU_EVENT_DEFAULT) == CUDA_SUCCESS;
    CUcontext popped;
    drv_cuCtxPopCurrent(&popped);
    if (!ok) timing_destroy(t);
    return ok;
}

/* Called with g.lock held: where kernels that fail in green contexts run for this app stream. An
 * ordinary stream of the current context takes them itself (no events, as without the shim); a
 * green application stream is paired with an ordinary helper stream of the current context. */
static stream_pair *build_unconfined_pair(stream_pair *p, int priority) {
    CUcontext stream_ctx = NULL, popped;
    int ok = drv_cuStreamGetCtx(p->app_stream, &stream_ctx) == CUDA_SUCCESS && stream_ctx;
    if (ok && stream_ctx == p->app_ctx) {
        p->owned = 1; /* launches go on the app stream itself */
        p->green_stream = p->app_stream;
    } else if (ok && drv_cuCtxPushCurrent(stream_ctx) == CUDA_SUCCESS) {
        ok = drv_cuEventCreate(&p->app_done, CU_EVENT_DISABLE_TIMING) == CUDA_SUCCESS;
        drv_cuCtxPopCurrent(&popped);
        ok = ok && real_cuStreamCreateWithPriority(&p->green_stream, CU_STREAM_NON_BLOCKING, priority) == CUDA_SUCCESS &&
             drv_cuEventCreate(&p->green_done, CU_EVENT_DISABLE_TIMING) == CUDA_SUCCESS;
    } else {
        ok = 0;
    }
    if (!ok) {
        free(p);
        return NULL;
    }
    p->next = g.pairs;
    g.pairs = p;
    return p;
}

/* Called with g.lock held. */
static stream_pair *find_or_build_pair(CUcontext app_ctx, CUstream app_stream, allowance_route *route, int view,
                                       int low_priority) {
    pid_t thread = app_stream == CU_STREAM_PER_THREAD ? gettid() : 0;
    for (stream_pair *p = g.pairs; p; p = p->next)
        if (pair_matches(p, app_ctx, app_stream, thread, route, view, low_priority)) return p;
    stream_pair *p = calloc(1, sizeof(*p));
    if (!p) return NULL;
    p->app_ctx = app_ctx;
    p->app_stream = app_stream;
    p->thread = thread;
    p->route = route;
    p->view = view;
    p->low_priority = low_priority;
    int priority = 0;
    if (!special_stream(app_stream) && drv_cuStreamGetPriority(app_stream, &priority) != CUDA_SUCCESS) priority = 0;
    if (low_priority) priority = g.least_priority;
    if (view == LITHOS_VIEW_UNCONFINED) return build_unconfined_pair(p, priority);
    view_ctx *v = &route->views[view];
    /* app_done must live in the app stream's own context (event and stream of one context): for an
     * owned stream of an earlier allowance that is that allowance's green context. */
    CUcontext stream_ctx = NULL, popped;
    int ok = drv_cuStreamGetCtx(app_stream, &stream_ctx) == CUDA_SUCCESS && stream_ctx &&
             drv_cuCtxPushCurrent(stream_ctx) == CUDA_SUCCESS;
    if (ok) {
        ok = drv_cuEventCreate(&p->app_done, CU_EVENT_DISABLE_TIMING) == CUDA_SUCCESS;
        drv_cuCtxPopCurrent(&popped);
    }
    ok = ok && drv_cuGreenCtxStreamCreate(&p->green_stream, v->green, CU_STREAM_NON_BLOCKING, priority) == CUDA_SUCCESS &&
         drv_cuCtxPushCurrent(v->ctx) == CUDA_SUCCESS;
    if (ok) {
        ok = drv_cuEventCreate(&p->green_done, CU_EVENT_DISABLE_TIMING) == CUDA_SUCCESS;
        drv_cuCtxPopCurrent(&popped);
    }
    ok = ok && timing_create(&p->timing, v->ctx);
    if (!ok) {
        notice_once(WARN_ROUTE, "cannot create a green stream or its events: launches pass through");
        free(p);
        return NULL;
    }
    p->next = g.pairs;
    g.pairs = p;
    return p;
}

/* Called with g.lock held, once: can the application use a green stream as its own? The one thing
 * the driver may refuse is recording an event of the application's context on it (cuEventRecord
 * wants event and stream in one context); if it does, application streams stay ordinary. */
static int green_streams_usable(CUstream green_stream) {
    if (g.green_streams_tested) return g.green_streams;
    g.green_streams_tested = 1;
    CUstreamCaptureMode mode = CU_STREAM_CAPTURE_MODE_RELAXED;
    drv_cuThreadExchangeStreamCaptureMode(&mode);
    CUevent app_event = NULL;
    CUresult r = drv_cuEventCreate(&app_event, CU_EVENT_DISABLE_TIMING);
    if (r == CUDA_SUCCESS) r = drv_cuEventRecord(app_event, green_stream);
    if (app_event) drv_cuEventDestroy(app_event);
    drv_cuThreadExchangeStreamCaptureMode(&mode);
    if (r != CUDA_SUCCESS) {
        g.green_streams = 0;
        notice_once(WARN_GREEN_STREAMS, "the driver refuses application events on green streams (CUresult %d): "
                    "application streams stay ordinary and every launch is ordered with events", (int)r);
    }
    return g.green_streams;
}

/* Called with g.lock held: create the application's stream as a green stream of the route's TPC
 * view. Returns the owned entry, or NULL (the caller creates an ordinary stream). */
static stream_pair *build_owned_stream(CUcontext app_ctx, allowance_route *route, unsigned flags, int priority) {
    if (route->whole_gpu) return NULL; /* an ordinary stream is the whole GPU */
    view_ctx *v = &route->views[LITHOS_VIEW_TPC];
    stream_pair *p = calloc(1, sizeof(*p));
    if (!p) return NULL;
    if (drv_cuGreenCtxStreamCreate(&p->green_stream, v->green, flags, priority) != CUDA_SUCCESS) {
        free(p);
        return NULL;
    }
    if (!green_streams_usable(p->green_stream) || !timing_create(&p->timing, v->ctx)) {
        real_cuStreamDestroy_v2(p->green_stream);
        free(p);
        return NULL;
    }
    p->app_ctx = app_ctx;
    p->app_stream = p->green_stream;
    p->route = route;
    p->view = LITHOS_VIEW_TPC;
    p->owned = 1;
    p->next = g.pairs;
    g.pairs = p;
    return p;
}

/* Called with g.lock held: the application destroyed `stream`; retire every entry for it. The
 * shim's own green streams and events of paired entries go too; owned streams are destroyed by
 * the caller (they are the application's stream). */
static void drop_pending(stream_pair *p);
static void retire_pairs(CUstream stream) {
    for (stream_pair **link = &g.pairs; *link;) {
        stream_pair *p = *link;
        if (p->app_stream != stream) {
            link = &p->next;
            continue;
        }
        __atomic_store_n(&p->dead, 1, __ATOMIC_RELAXED);
        *link = p->next;
        pthread_mutex_lock(&join_lock); /* cuStreamDestroy flushed: owed only by a launch racing with the destroy */
        drop_pending(p);
        pthread_mutex_unlock(&join_lock);
        if (!p->owned) {
            drv_cuEventDestroy(p->app_done);
            drv_cuEventDestroy(p->green_done);
            real_cuStreamDestroy_v2(p->green_stream);
        }
        timing_destroy(&p->timing);
    }
}

/* ---------------------------------------------------------------- deferred joins and stubs */

/* Take / let go of join_lock on this thread (in_join: a stub the driver calls meanwhile must not flush). */
static inline void join_enter(void) {
    pthread_mutex_lock(&join_lock);
    tls.in_join = 1;
}

static inline void join_leave(void) {
    tls.in_join = 0;
    pthread_mutex_unlock(&join_lock);
}

static int defer_on(void) { return __atomic_load_n(&g.defer, __ATOMIC_ACQUIRE); }

/* Called with join_lock held: `wait_stream` (p's app stream, or the legacy stream of p's context)
 * waits for everything launched on p's green stream so far. A special handle means a stream of the
 * current context, so p's context is made current around it when it is not. */
static void join_pair(stream_pair *p, CUstream wait_stream) {
    CUcontext current = NULL, popped;
    int pushed = 0;
    if (special_stream(wait_stream) && (drv_cuCtxGetCurrent(&current) != CUDA_SUCCESS || current != p->app_ctx)) {
        if (drv_cuCtxPushCurrent(p->app_ctx) != CUDA_SUCCESS) return; /* its context is gone, and its streams with it */
        pushed = 1;
    }
    if (drv_cuEventRecord(p->green_done, p->green_stream) == CUDA_SUCCESS) drv_cuStreamWaitEvent(wait_stream, p->green_done, 0);
    if (pushed) drv_cuCtxPopCurrent(&popped);
}

/* Called with join_lock held. */
static void remove_pending_at(unsigned i) {
    pending_pairs[i]->pending = 0;
    pending_pairs[i] = pending_pairs[--pending_count];
    __atomic_store_n(&lithos_pending_joins, (int)pending_count, __ATOMIC_RELEASE);
}

/* Called with join_lock held: pay every owed join this thread can. Another thread's per-thread
 * default stream cannot be named from here: its context's legacy stream waits instead (once per
 * run) and the owner keeps owing the join to its own stream. Returns the number of joins made. */
static int flush_joins_locked(void) {
    int made = 0;
    for (unsigned i = 0; i < pending_count;) {
        stream_pair *p = pending_pairs[i];
        if (p->app_stream == CU_STREAM_PER_THREAD && p->pending_owner != (const void *)&tls) {
            if (!p->legacy_joined) {
                join_pair(p, CU_STREAM_LEGACY);
                p->legacy_joined = 1;
                tls.joins[JOIN_LEGACY_FOR_OTHER]++;
                made++;
            }
            i++;
            continue;
        }
        join_pair(p, p->app_stream);
        tls.joins[JOIN_PAID]++;
        made++;
        remove_pending_at(i);
    }
    return made;
}

/* Called with join_lock held: p's green stream holds (or is about to hold) a launch its app stream
 * has not joined. */
static void owe_join(stream_pair *p, CUstream app_stream) {
    if (!p->pending && pending_count >= PENDING_MAX) { /* full since the run started: join now */
        join_pair(p, app_stream);
        return;
    }
    if (!p->pending) {
        p->pending = 1;
        pending_pairs[pending_count++] = p; /* room checked when the run started */
        __atomic_store_n(&lithos_pending_joins, (int)pending_count, __ATOMIC_RELEASE);
    }
    p->pending_owner = &tls;
    p->legacy_joined = 0;
    if (app_stream == CU_STREAM_PER_THREAD && !tls.exit_key_set) { /* no allocation for the first 32 keys (glibc) */
        pthread_setspecific(g.exit_key, (void *)1);
        tls.exit_key_set = 1;
    }
}

/* Called with join_lock held: this thread's owed run on (ctx, app_stream), or NULL. */
static stream_pair *owed_run(CUcontext ctx, CUstream app_stream) {
    for (unsigned i = 0; i < pending_count; i++) {
        stream_pair *p = pending_pairs[i];
        if (p->pending_owner == (const void *)&tls && p->app_stream == app_stream && p->app_ctx == ctx) return p;
    }
    return NULL;
}

/* Called with join_lock held: p's join was made (or is not owed any more). */
static void drop_pending(stream_pair *p) {
    for (unsigned i = 0; i < pending_count; i++)
        if (pending_pairs[i] == p) {
            remove_pending_at(i);
            return;
        }
}

/* Pay the owed joins (a no-op inside join_lock on this thread: a stub the driver calls meanwhile). */
static int flush_joins(void) {
    if (tls.in_join) return 0;
    join_enter();
    int made = pending_count ? flush_joins_locked() : 0;
    join_leave();
    return made;
}

static inline void flush_if_pending(void) {
    if (__atomic_load_n(&lithos_pending_joins, __ATOMIC_ACQUIRE)) flush_joins();
}

/* pthread key destructor: a thread that exits owing the join of its per-thread default stream (a
 * stream nobody can name any more) makes its context's legacy stream wait for it instead. */
static void on_thread_exit(void *unused) {
    pthread_mutex_lock(&join_lock);
    for (unsigned i = 0; i < pending_count;) {
        stream_pair *p = pending_pairs[i];
        if (p->pending_owner != (const void *)&tls || p->app_stream != CU_STREAM_PER_THREAD) {
            i++;
            continue;
        }
        if (!p->legacy_joined) join_pair(p, CU_STREAM_LEGACY);
        remove_pending_at(i);
    }
    pthread_mutex_unlock(&join_lock);
}

/* Length of a driver symbol's base name: cuMemcpyDtoH_v2_ptds -> strlen("cuMemcpyDtoH"). The same
 * rule as base_name() in gen_stubs.py. */
static size_t base_name_length(const char *name) {
    for (size_t i = 0; name[i]; i++)
        if (name[i] == '_' && ((name[i + 1] == 'v' && name[i + 2] >= '0' && name[i + 2] <= '9') ||
                               (name[i + 1] == 'p' && name[i + 2] == 't')))
            return i;
    return strlen(name);
}

/* Is `name` in lithos_nojoin.h (neither enqueues nor waits: no flush needed)? */
static int no_flush_name(const char *name) {
    size_t n = base_name_length(name);
#define NO_FLUSH_MATCH(rule, prefix)                                                                  \
    if ((prefix) ? n >= sizeof(rule) - 1 && strncmp(name, rule, sizeof(rule) - 1) == 0               \
                 : n == sizeof(rule) - 1 && strncmp(name, rule, n) == 0)                              \
        return 1;
    LITHOS_NO_FLUSH(NO_FLUSH_MATCH)
#undef NO_FLUSH_MATCH
    return 0;
}

/* What the cuGetProcAddress and dlsym hooks hand out for driver function `fn` asked for as `name`:
 * fn itself while deferral is off, for the names of lithos_nojoin.h and (only_libcuda, the dlsym
 * hook) for functions outside libcuda.so.1; else the pool stub of fn (one per real pointer). When
 * the pool is full the process goes back to eager joins and fn is returned. */
static void *stub_for(const char *name, void *fn, int only_libcuda) {
    ensure_init();
    if (!fn || !defer_on() || no_flush_name(name)) return fn;
    Dl_info info;
    if (only_libcuda && (!g.libcuda_base || !dladdr(fn, &info) || info.dli_fbase != g.libcuda_base)) return fn;
    void *stub = NULL;
    pthread_mutex_lock(&stub_lock);
    for (unsigned i = 0; i < stubs_used && !stub; i++)
        if (lithos_stub_slots[i].real == fn) stub = lithos_stub_pool + (size_t)i * LITHOS_STUB_CODE_BYTES;
    if (!stub && stubs_used < LITHOS_STUB_POOL) {
        lithos_stub_slot *slot = &lithos_stub_slots[stubs_used];
        slot->name = strdup(name);
        __atomic_store_n(&slot->real, fn, __ATOMIC_RELEASE);
        stub = lithos_stub_pool + (size_t)stubs_used++ * LITHOS_STUB_CODE_BYTES;
    }
    pthread_mutex_unlock(&stub_lock);
    if (stub) return stub;
    __atomic_store_n(&g.defer, 0, __ATOMIC_RELEASE); /* launches read it under join_lock: none defers after this flush */
    notice_once(WARN_STUBS, "more than %d driver entry points handed out: deferred joins off (paired launches join at once)",
                LITHOS_STUB_POOL);
    flush_joins();
    return fn;
}

/* The slow path of every stub (lithos_stubs.S), entered with a join owed or the real pointer not yet
 * known: resolve an exported stub's function in libcuda.so.1 (once), pay the owed joins, return
 * the function to jump to (NULL: the stub returns CUDA_ERROR_NOT_FOUND). */
LITHOS_HIDDEN void *lithos_stub_slow(lithos_stub_slot *slot) {
    void *real = __atomic_load_n(&slot->real, __ATOMIC_ACQUIRE);
    if (!real && slot->name) {
        void *handle = NULL;
        if (tls.in_init) { /* the driver calls itself while init_once loads it */
            handle = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
        } else {
            ensure_init();
            handle = g.libcuda;
        }
        void *(*rd)(void *, const char *) = real_dlsym_fn();
        real = handle && rd ? rd(handle, slot->name) : NULL;
        if (real) __atomic_store_n(&slot->real, real, __ATOMIC_RELEASE);
    }
    int flushed = __atomic_load_n(&lithos_held_launches, __ATOMIC_ACQUIRE) && !tls.in_init &&
                  drain_held_launches(waits_for_gpu(slot));
    if (__atomic_load_n(&lithos_pending_joins, __ATOMIC_ACQUIRE) && !tls.in_init && flush_joins()) flushed = 1;
    if (flushed) __atomic_add_fetch(&slot->flushes, 1, __ATOMIC_RELAXED);
    return real;
}

/* ---------------------------------------------------------------- launch records */

typedef struct {
    int api, per_thread;
    CUfunction function;
    unsigned grid[3], block[3], shared_bytes;
    CUstream stream;
    void **params, **extra;
    const CUlaunchConfig *config;
    CUgraphExec graph;
    int retry;              /* a launch that failed in a green context, again: RETRY_COSCHED or RETRY_WHOLE_GPU */
    int activity_published; /* after_launch done for this launch (not again on a retry) */
    CUdeviceptr mem_dst, mem_src; /* API_MEMSET, API_COPY */
    unsigned mem_value, mem_width; /* memsets: the value; its width in bytes (1, 2 or 4) */
    size_t mem_count;              /* memsets: elements; copies: bytes */
} launch_request;
/* Memsets and device-to-device copies go through the launch path too (never into launch records):
 * the driver runs them as kernels on SMs (memory_op_probe.py), so they belong on the client's TPCs. */
#define API_MEMSET 16
#define API_COPY 17
static int is_memory_api(int api) { return api >= API_MEMSET; }
static int is_memory_op(const launch_request *q) { return is_memory_api(q->api); }
enum { RETRY_NONE = 0, RETRY_COSCHED, RETRY_WHOLE_GPU };
#define REFUSED_COSCHED 1u /* func_info.refused: the TPC view refused its cluster shape */

/* The packed argument buffer of a launch's `extra` (CU_LAUNCH_PARAM_BUFFER_POINTER and _SIZE): 1 with
 * *buffer and *bytes set, 0 when extra holds anything else or lacks either. */
static int packed_args(void **extra, const void **buffer, size_t *bytes) {
    *buffer = NULL;
    const size_t *size = NULL;
    for (void **e = extra; *e != CU_LAUNCH_PARAM_END; e += 2) {
        if (*e == CU_LAUNCH_PARAM_BUFFER_POINTER) *buffer = e[1];
        else if (*e == CU_LAUNCH_PARAM_BUFFER_SIZE) size = e[1];
        else return 0;
    }
    if (!*buffer || !size) return 0;
    *bytes = *size;
    return 1;
}

/* Where a kernel refused before goes now (func_info.refused; off the common path). */
static __attribute__((noinline)) int retry_of(uint32_t verdict, uint32_t ctas) {
    if ((verdict >> 8) && (ctas ? ctas : 1u) >= (verdict >> 8)) return RETRY_WHOLE_GPU;
    return verdict & REFUSED_COSCHED ? RETRY_COSCHED : RETRY_NONE;
}

/* Where one launch goes and what the lending rule found (recorded in its launch record). */
typedef struct {
    allowance_route *route;    /* the own route, or the union of own and borrowed TPCs */
    uint64_t lenders_used;     /* slots whose TPCs were added (bit s = slot s); 0 = own TPCs only */
    uint64_t predicted_own_ns; /* predictor on the own TPCs of the view; 0 = unknown or not asked */
    uint64_t predicted_ns;     /* predictor on the TPCs used; 0 = unknown */
    uint16_t own_tpcs;
    int low_priority;
} lend_choice;

static uint64_t monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Returns the ring index + 1 of the record, or 0 when nothing was recorded. */
static uint64_t record_launch(const launch_request *q, const func_info *info, const unsigned cluster[3], int view,
                              unsigned tpcs, uint64_t generation, const lend_choice *lend, uint64_t now_ns) {
    if (!g.ring || is_memory_op(q)) return 0;
    uint64_t index = __atomic_fetch_add(&g.ring->head[0], 1, __ATOMIC_RELAXED);
    lithos_launch_record *r = &g.records[index % g.ring->capacity[0]];
    __atomic_store_n(&r->seq[0], 0, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    r->function[0] = q->api == LITHOS_API_GRAPH_LAUNCH ? (uint64_t)(uintptr_t)q->graph : (uint64_t)(uintptr_t)q->function;
    r->host_ns[0] = now_ns;
    __atomic_store_n(&r->gpu_ns[0], 0, __ATOMIC_RELAXED);
    r->allowance_generation[0] = generation;
    for (int i = 0; i < 3; i++) {
        r->grid[i] = q->grid[i];
        r->block[i] = q->block[i];
        r->cluster[i] = cluster[i];
    }
    r->shared_bytes[0] = q->shared_bytes;
    r->tpcs[0] = (uint16_t)tpcs;
    r->view[0] = (uint8_t)view;
    r->api[0] = (uint8_t)q->api;
    if (info) /* func_info names are NUL-padded to the same 64 bytes */
        memcpy(r->kernel_name, info->name, sizeof(r->kernel_name));
    else
        strncpy(r->kernel_name, "cuGraphLaunch", sizeof(r->kernel_name));
    r->predicted_ns[0] = lend->predicted_ns;
    r->predicted_own_ns[0] = lend->predicted_own_ns;
    r->lender_slots_used[0] = lend->lenders_used;
    r->own_tpcs[0] = lend->own_tpcs;
    r->low_priority[0] = (uint8_t)lend->low_priority;
    __atomic_store_n(&r->seq[0], index + 1, __ATOMIC_RELEASE);
    return index + 1;
}

/* Fill gpu_ns of finished sampled launches and feed them to the predictor. Runs in relaxed
 * capture mode (event queries are otherwise forbidden while any thread captures a graph in global mode). */
static void harvest_timings(timing_set *t) {
    CUstreamCaptureMode mode = CU_STREAM_CAPTURE_MODE_RELAXED;
    drv_cuThreadExchangeStreamCaptureMode(&mode);
    for (int i = 0; i < TIMING_PAIRS; i++) {
        uint64_t ticket = t->ticket[i];
        if (!ticket || drv_cuEventQuery(t->ev[i][1]) != CUDA_SUCCESS) continue;
        float ms = 0.0f;
        if (drv_cuEventElapsedTime(&ms, t->ev[i][0], t->ev[i][1]) == CUDA_SUCCESS) {
            lithos_launch_record *r = &g.records[(ticket - 1) % g.ring->capacity[0]];
            uint64_t gpu_ns = (uint64_t)((double)ms * 1e6);
            if (__atomic_load_n(&r->seq[0], __ATOMIC_ACQUIRE) == ticket) {
                __atomic_store_n(&r->gpu_ns[0], gpu_ns, __ATOMIC_RELAXED);
                lithos_kernel_key key = {r->function[0], (uint64_t)r->grid[0] * r->grid[1] * r->grid[2],
                                         (uint64_t)r->block[0] * r->block[1] * r->block[2]};
                uint32_t tpcs = r->tpcs[0];
                __atomic_thread_fence(__ATOMIC_ACQUIRE);
                if (__atomic_load_n(&r->seq[0], __ATOMIC_RELAXED) == ticket && g.predictor && gpu_ns && tpcs)
                    lithos_predictor_observe(g.predictor, key.function, key.grid_blocks, key.block_threads, gpu_ns, tpcs);
            }
        }
        t->ticket[i] = 0;
    }
    drv_cuThreadExchangeStreamCaptureMode(&mode);
}

/* Whether this launch is timed: one in sample_every at random, and a kernel with no prediction yet
 * (predicted_ns 0) one in UNKNOWN_SAMPLE_EVERY. Random (a per-thread xorshift), not every Nth: a
 * fixed period aliases with programs that repeat a fixed number of launches (154 per BERT forward
 * and every 64th launch time only even positions), and kernels never timed stay unknown. */
#define UNKNOWN_SAMPLE_EVERY 4u
static int sample_due(uint64_t predicted_ns) {
    if (!g.sample_every || !g.ring) return 0;
    uint64_t x = tls.random ? tls.random : ((uint64_t)(uintptr_t)&tls * 0x9e3779b97f4a7c15ull) | 1u;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    tls.random = x;
    uint32_t every = predicted_ns || g.sample_every < UNKNOWN_SAMPLE_EVERY ? g.sample_every : UNKNOWN_SAMPLE_EVERY;
    return x % every == 0;
}

/* A sampled launch about to go on `stream`: harvests finished pairs and records a start event.
 * Returns the pair to end after the launch, or -1 (no events here, capturing, or none free). */
static int timing_begin(timing_set *t, CUstream stream) {
    if (!t->ev[0][0]) return -1;
    CUstreamCaptureStatus capture = CU_STREAM_CAPTURE_STATUS_ACTIVE;
    if (drv_cuStreamIsCapturing(stream, &capture) != CUDA_SUCCESS || capture != CU_STREAM_CAPTURE_STATUS_NONE) return -1;
    harvest_timings(t);
    unsigned i = t->next % TIMING_PAIRS;
    return !t->ticket[i] && drv_cuEventRecord(t->ev[i][0], stream) == CUDA_SUCCESS ? (int)i : -1;
}

/* After the launch timing_begin chose: the end event, and the record (ticket) the pair times. */
static void timing_end(timing_set *t, int pair, CUstream stream, uint64_t ticket) {
    if (pair >= 0 && drv_cuEventRecord(t->ev[pair][1], stream) == CUDA_SUCCESS && ticket) {
        t->ticket[pair] = ticket;
        t->next++;
    }
}

/* after_launch on this thread's queue estimate of a stream (lithos_busy_after). */
static void queue_after_launch(uint64_t *end_ns, uint64_t now_ns, uint64_t predicted_ns) {
    *end_ns = lithos_busy_after(*end_ns, now_ns, predicted_ns, __atomic_load_n(&g.table->lend_unknown_kernel_busy_ns[0], __ATOMIC_RELAXED));
}

/* ---------------------------------------------------------------- the launch path */

static CUresult call_real(const launch_request *q, CUstream stream) {
    switch (q->api) {
    case LITHOS_API_LAUNCH_KERNEL: {
        fn_cuLaunchKernel fn = q->per_thread ? real_cuLaunchKernel_ptsz : real_cuLaunchKernel;
        if (!fn) return CUDA_ERROR_NOT_FOUND;
        return fn(q->function, q->grid[0], q->grid[1], q->grid[2], q->block[0], q->block[1], q->block[2], q->shared_bytes,
                  stream, q->params, q->extra);
    }
    case LITHOS_API_LAUNCH_KERNEL_EX: {
        fn_cuLaunchKernelEx fn = q->per_thread ? real_cuLaunchKernelEx_ptsz : real_cuLaunchKernelEx;
        if (!fn) return CUDA_ERROR_NOT_FOUND;
        if (!q->config) return fn(q->config, q->function, q->params, q->extra);
        CUlaunchConfig moved = *q->config;
        moved.hStream = stream;
        return fn(&moved, q->function, q->params, q->extra);
    }
    case LITHOS_API_LAUNCH_COOPERATIVE: {
        fn_cuLaunchCooperativeKernel fn = q->per_thread ? real_cuLaunchCooperativeKernel_ptsz : real_cuLaunchCooperativeKernel;
        if (!fn) return CUDA_ERROR_NOT_FOUND;
        return fn(q->function, q->grid[0], q->grid[1], q->grid[2], q->block[0], q->block[1], q->block[2], q->shared_bytes,
                  stream, q->params);
    }
    case API_COPY: {
        fn_cuMemcpyDtoDAsync_v2 fn = q->per_thread ? real_cuMemcpyDtoDAsync_v2_ptsz : real_cuMemcpyDtoDAsync_v2;
        return fn ? fn(q->mem_dst, q->mem_src, q->mem_count, stream) : CUDA_ERROR_NOT_FOUND;
    }
    case API_MEMSET: {
        if (q->mem_width == 1) {
            fn_cuMemsetD8Async fn = q->per_thread ? real_cuMemsetD8Async_ptsz : real_cuMemsetD8Async;
            return fn ? fn(q->mem_dst, (unsigned char)q->mem_value, q->mem_count, stream) : CUDA_ERROR_NOT_FOUND;
        }
        if (q->mem_width == 2) {
            fn_cuMemsetD16Async fn = q->per_thread ? real_cuMemsetD16Async_ptsz : real_cuMemsetD16Async;
            return fn ? fn(q->mem_dst, (unsigned short)q->mem_value, q->mem_count, stream) : CUDA_ERROR_NOT_FOUND;
        }
        fn_cuMemsetD32Async fn = q->per_thread ? real_cuMemsetD32Async_ptsz : real_cuMemsetD32Async;
        return fn ? fn(q->mem_dst, q->mem_value, q->mem_count, stream) : CUDA_ERROR_NOT_FOUND;
    }
    default: {
        fn_cuGraphLaunch fn = q->per_thread ? real_cuGraphLaunch_ptsz : real_cuGraphLaunch;
        if (!fn) return CUDA_ERROR_NOT_FOUND;
        return fn(q->graph, stream);
    }
    }
}

static void cluster_of(const launch_request *q, const func_info *info, unsigned cluster[3]) {
    for (int i = 0; i < 3; i++) cluster[i] = info ? info->cluster[i] : 1u;
    if (q->api == LITHOS_API_LAUNCH_KERNEL_EX && q->config)
        for (unsigned i = 0; i < q->config->numAttrs; i++)
            if (q->config->attrs[i].id == CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION) {
                cluster[0] = q->config->attrs[i].value.clusterDim.x;
                cluster[1] = q->config->attrs[i].value.clusterDim.y;
                cluster[2] = q->config->attrs[i].value.clusterDim.z;
            }
}

static const lithos_slot *slot_at_index(uint32_t slot) {
    return (const lithos_slot *)((const char *)g.table + g.table->header_bytes[0] + (size_t)slot * g.table->slot_bytes[0]);
}

/* Leaving a whole-GPU allowance, whose launches were not queued in the estimates: this thread's
 * queue estimates say busy for lend_unknown_kernel_busy_ns from now, as after an unknown kernel. */
static void assume_unknown_work_queued(void) {
    uint64_t now_ns = monotonic_ns(), unknown_ns = __atomic_load_n(&g.table->lend_unknown_kernel_busy_ns[0], __ATOMIC_RELAXED);
    for (unsigned i = 0; i < TLS_QUEUES; i++)
        tls.queues[i].end_ns = lithos_busy_after(tls.queues[i].end_ns, now_ns, 0, unknown_ns);
}

/* Refresh this thread's route if the allowance changed. Returns the route or NULL (pass through). */
static allowance_route *current_route(uint64_t *generation_out, CUcontext *ctx_out) {
    const lithos_slot *slot = slot_at_index(g.slot);
    uint64_t generation = __atomic_load_n(&slot->generation[0], __ATOMIC_ACQUIRE);
    CUcontext ctx = NULL;
    if (drv_cuCtxGetCurrent(&ctx) != CUDA_SUCCESS || !ctx) return NULL;
    *ctx_out = ctx;
    if (generation + 1 == tls.generation && ctx == tls.ctx) {
        *generation_out = generation;
        return tls.ctx_managed ? tls.route : NULL;
    }
    uint64_t mask[LITHOS_MASK_WORDS];
    uint32_t flags = 0;
    generation = lithos_table_read_allowance(g.table, g.slot, mask, &flags);
    CUdevice dev;
    allowance_route *route = NULL;
    int managed = 0;
    if (drv_cuCtxGetDevice(&dev) == CUDA_SUCCESS) {
        pthread_mutex_lock(&g.lock);
        managed = prepare_device(dev);
        if (managed && (flags & LITHOS_SLOT_ACTIVE)) route = find_or_build_route(mask);
        pthread_mutex_unlock(&g.lock);
    }
    memset(tls.pairs, 0, sizeof(tls.pairs));
    if (tls.route && tls.route->whole_gpu && !(route && route->whole_gpu)) assume_unknown_work_queued();
    tls.generation = generation + 1;
    tls.ctx = ctx;
    tls.ctx_managed = managed;
    tls.route = route;
    *generation_out = generation;
    return route;
}

/* Whether the agent wrote this slot's allowance since generation was read (e.g. while a launch paced). */
static int allowance_changed(uint64_t generation) {
    return __atomic_load_n(&slot_at_index(g.slot)->generation[0], __ATOMIC_ACQUIRE) != generation;
}

static uint64_t predict_ns(const lithos_kernel_key *key, unsigned tpcs) {
    if (!g.predictor || !key->function || !tpcs) return 0;
    return lithos_predictor_predict_ns(g.predictor, key->function, key->grid_blocks, key->block_threads, tpcs);
}

/* after_launch of scheduler/lending.py on this client's activity word (once per launch). */
static void publish_activity(launch_request *q, uint64_t now_ns, uint64_t predicted_ns) {
    if (q->activity_published || !g.own_activity) return;
    q->activity_published = 1;
    lithos_activity_after_launch(g.own_activity, now_ns, predicted_ns,
                                 __atomic_load_n(&g.table->lend_unknown_kernel_busy_ns[0], __ATOMIC_RELAXED));
}

/* This thread's predicted end of its queued work on one stream. A stream seen for the first time
 * starts at the process's busy_until (its activity word). Unknown kernels count one credit, not one
 * each (lithos_busy_after): several long unknown kernels queued over more than a credit ago are
 * under-counted; known ones add up. */
static stream_queue *queue_of(CUcontext ctx, CUstream stream) {
    for (unsigned i = 0; i < TLS_QUEUES; i++)
        if (tls.queues[i].stream == stream && tls.queues[i].ctx == ctx) return &tls.queues[i];
    stream_queue *q = &tls.queues[tls.queue_next++ % TLS_QUEUES];
    q->ctx = ctx;
    q->stream = stream;
    q->end_ns = g.own_activity ? __atomic_load_n(&g.own_activity->busy_until_ns[0], __ATOMIC_RELAXED) : 0;
    return q;
}

/* Whether everything queued on the stream has finished. The caller (choose_lending) has checked
 * that the stream is not capturing: a query would invalidate the capture. */
static int stream_drained(CUcontext ctx, CUstream stream) {
    if (!drv_cuStreamQuery) return 0;
    CUstreamCaptureMode mode = CU_STREAM_CAPTURE_MODE_RELAXED;
    drv_cuThreadExchangeStreamCaptureMode(&mode);
    int drained = drv_cuStreamQuery(stream) == CUDA_SUCCESS;
    /* A deferred run's kernels are on its green stream until the join: ask those too, rather than
     * paying the join (that would end the run this launch may continue). */
    if (drained && __atomic_load_n(&lithos_pending_joins, __ATOMIC_ACQUIRE) && !tls.in_join) {
        pthread_mutex_lock(&join_lock);
        for (unsigned i = 0; drained && i < pending_count; i++)
            if (pending_pairs[i]->app_stream == stream && pending_pairs[i]->app_ctx == ctx)
                drained = drv_cuStreamQuery(pending_pairs[i]->green_stream) == CUDA_SUCCESS;
        pthread_mutex_unlock(&join_lock);
    }
    drv_cuThreadExchangeStreamCaptureMode(&mode);
    return drained;
}

/* The queue rule of lenders_at_launch: a borrowed kernel must be predicted to END within the atom,
 * counting the work queued ahead of it on its stream. A kernel queued behind others runs later
 * than its launch call, so without this a borrower queueing far ahead would hold lent TPCs long
 * after their owner woke. Returns 0 when the kernel fits, else how much longer the queue must drain;
 * when the estimate says no, the stream is asked (it may have drained early). */
static uint64_t queue_wait_ns(uint64_t *end_ns, uint64_t now_ns, uint64_t predicted_ns, uint64_t atom_ns, CUcontext ctx,
                              CUstream stream) {
    uint64_t ahead = *end_ns > now_ns ? *end_ns - now_ns : 0;
    if (ahead + predicted_ns <= atom_ns) return 0;
    if (stream_drained(ctx, stream)) {
        *end_ns = now_ns;
        return 0;
    }
    return ahead + predicted_ns - atom_ns;
}

/* A grid of at most one block per SM of `tpcs` TPCs runs in one wave: more TPCs cannot speed it up. */
static int fits_own_sms(uint64_t grid_blocks, unsigned tpcs) { return grid_blocks <= (uint64_t)SMS_PER_TPC * tpcs; }

/* The slots this client may borrow from (its lend list, itself left out). */
static uint64_t my_lender_mask(const lithos_slot *me) {
    uint64_t mask = __atomic_load_n(&me->lender_mask[0], __ATOMIC_ACQUIRE);
    return g.slot < LITHOS_LEND_SLOTS ? mask & ~(1ull << g.slot) : mask;
}

/* Idle lenders of this slot at now_ns, and the union of their TPCs with `own_mask`. */
static uint64_t idle_lenders(uint64_t lender_mask, uint64_t now_ns, uint64_t mask[LITHOS_MASK_WORDS]) {
    uint64_t idle_window_ns = __atomic_load_n(&g.table->lend_idle_window_ns[0], __ATOMIC_RELAXED), lenders = 0;
    for (uint32_t s = 0; s < LITHOS_LEND_SLOTS && s < g.table->max_slots[0]; s++) {
        if (!((lender_mask >> s) & 1u)) continue;
        const lithos_activity *word = (const lithos_activity *)(g.activity + (size_t)s * LITHOS_ACTIVITY_STRIDE);
        if (!lithos_lender_is_idle(__atomic_load_n(&word->last_launch_ns[0], __ATOMIC_ACQUIRE),
                                   __atomic_load_n(&word->busy_until_ns[0], __ATOMIC_ACQUIRE), now_ns, idle_window_ns))
            continue;
        uint64_t lent[LITHOS_MASK_WORDS];
        uint32_t flags = 0;
        lithos_table_read_allowance(g.table, s, lent, &flags);
        if (!(flags & LITHOS_SLOT_ACTIVE)) continue;
        for (unsigned w = 0; w < LITHOS_MASK_WORDS; w++) mask[w] |= lent[w];
        lenders |= 1ull << s;
    }
    return lenders;
}

/* Whether this thread owes the join of a deferred run on app_stream that is on a lending union (a
 * route other than the own allowance's). */
static int in_borrowing_run(const allowance_route *own, CUcontext ctx, CUstream app_stream) {
    if (!__atomic_load_n(&lithos_pending_joins, __ATOMIC_ACQUIRE)) return 0;
    join_enter();
    const stream_pair *p = owed_run(ctx, app_stream);
    int found = p && p->route != own;
    join_leave();
    return found;
}

/* lenders_at_launch of scheduler/lending.py: sets c->route to the union of the own TPCs and every
 * idle lender's when the kernel, queued behind this thread's earlier work on the stream, is
 * predicted to end within the atom on the own TPCs. A paced borrower (low priority) whose queue is
 * too deep sleeps while it has idle lenders (PACE_ALWAYS: whether or not one is idle), at most one
 * atom at a time (then the lenders and the stream are asked again) and PACE_MAX_ATOMS atoms per
 * launch: its queue drains to where its next kernel may borrow, while the GPU still has its work. */
static void choose_lending(lend_choice *c, allowance_route *own, int view, uint64_t own_ns, uint64_t grid_blocks,
                           uint64_t *now_ns, stream_queue *queue, CUcontext ctx, CUstream app_stream) {
    c->route = own;
    c->own_tpcs = own->views[view].tpcs;
    const lithos_slot *me = slot_at_index(g.slot);
    uint64_t lender_mask = my_lender_mask(me);
    if (!lender_mask || !g.activity) return;
    c->predicted_own_ns = own_ns; /* recorded only when the launch may borrow */
    uint64_t atom_ns = __atomic_load_n(&g.table->lend_atom_ns[0], __ATOMIC_RELAXED);
    if (!c->predicted_own_ns || c->predicted_own_ns > atom_ns) {
        tls.lending[c->predicted_own_ns ? LEND_TOO_LONG : LEND_UNKNOWN]++;
        return;
    }
    /* One block per own SM at most: it already runs in one wave, so it stays on the own TPCs, unless
     * this thread's owed run on the stream is in a union (staying there spares a move between green
     * contexts); then it borrows only as things are, never pacing for it. */
    int fits_own = fits_own_sms(grid_blocks, c->own_tpcs);
    if (fits_own && !in_borrowing_run(own, ctx, app_stream)) {
        tls.lending[LEND_FITS_OWN_SMS]++;
        return;
    }
    int low_priority = (__atomic_load_n(&me->lending_flags[0], __ATOMIC_RELAXED) & LITHOS_LEND_LOW_PRIORITY) != 0;
    int pace = low_priority && !fits_own ? g.pace : PACE_OFF, paced = 0;
    uint64_t mask[LITHOS_MASK_WORDS], lenders, slept_ns = 0;
    for (;;) {
        memcpy(mask, own->tpc_mask, sizeof(mask));
        lenders = idle_lenders(lender_mask, *now_ns, mask);
        if (!lenders && pace != PACE_ALWAYS) {
            tls.lending[LEND_NO_IDLE_LENDER]++;
            return;
        }
        if (!paced) { /* asked once, only when borrowing is possible at all */
            CUstreamCaptureStatus capture = CU_STREAM_CAPTURE_STATUS_ACTIVE;
            if (drv_cuStreamIsCapturing(app_stream, &capture) != CUDA_SUCCESS || capture != CU_STREAM_CAPTURE_STATUS_NONE) {
                tls.lending[LEND_CAPTURING]++;
                return;
            }
        }
        uint64_t wait_ns = queue_wait_ns(&queue->end_ns, *now_ns, c->predicted_own_ns, atom_ns, ctx, app_stream);
        if (!wait_ns && !lenders) { /* PACE_ALWAYS: the queue is shallow, but nobody is idle now */
            tls.lending[LEND_NO_IDLE_LENDER]++;
            return;
        }
        if (!wait_ns) break;
        if (pace == PACE_OFF || slept_ns >= PACE_MAX_ATOMS * atom_ns) {
            tls.lending[LEND_QUEUE_TOO_DEEP]++;
            return;
        }
        uint64_t nap = wait_ns < atom_ns ? wait_ns : atom_ns;
        if (nap > PACE_MAX_ATOMS * atom_ns - slept_ns) nap = PACE_MAX_ATOMS * atom_ns - slept_ns;
        struct timespec ts = {(time_t)(nap / 1000000000u), (long)(nap % 1000000000u)};
        nanosleep(&ts, NULL);
        uint64_t after = monotonic_ns();
        slept_ns += after - *now_ns;
        tls.lending[LEND_PACED_US] += (after - *now_ns) / 1000u;
        *now_ns = after;
        if (!paced++) tls.lending[LEND_PACED]++;
    }
    if (memcmp(mask, own->tpc_mask, sizeof(mask)) == 0) return;
    allowance_route *u = union_route(mask);
    if (!u) {
        tls.lending[LEND_UNION_PENDING]++;
        return;
    }
    if (!u->views[view].green || u->views[view].tpcs <= c->own_tpcs) {
        tls.lending[LEND_NO_GAIN]++;
        return;
    }
    c->route = u;
    c->lenders_used = lenders;
    c->low_priority = low_priority;
    tls.lending[LEND_BORROWED]++;
}

static CUresult launch_unconfined(launch_request *q, const func_info *info, const unsigned cluster[3], uint64_t generation,
                                  const lithos_kernel_key *key, uint64_t now_ns) {
    lend_choice lend = {0};
    lend.predicted_ns = predict_ns(key, g.table->tpcs_on_gpu[0]);
    publish_activity(q, now_ns, lend.predicted_ns);
    flush_if_pending();
    CUresult r = call_real(q, q->stream);
    tls.launches[is_memory_op(q) ? PATH_MEMORY_APP : PATH_UNCONFINED]++;
    if (r == CUDA_SUCCESS) record_launch(q, info, cluster, LITHOS_VIEW_UNCONFINED, 0, generation, &lend, now_ns);
    return r;
}

/* This thread's timing events for graph replays on app streams, in the
 * context of `stream` (events and stream must share one), made once per thread and context (a
 * replaced context's are destroyed; a thread that exits leaves its 8 events). NULL when they cannot
 * be made. */
static timing_set *app_stream_timing(CUstream stream) {
    CUcontext ctx = NULL;
    if (drv_cuStreamGetCtx(stream, &ctx) != CUDA_SUCCESS || !ctx) return NULL;
    if (tls.app_timing_ctx != ctx) {
        timing_destroy(&tls.app_timing);
        pthread_mutex_lock(&g.lock);
        int made = timing_create(&tls.app_timing, ctx);
        pthread_mutex_unlock(&g.lock);
        tls.app_timing_ctx = made ? ctx : NULL;
        if (!made) return NULL;
    }
    return &tls.app_timing;
}

/* A graph replays on the app stream; its kernel nodes keep the green context they were captured in
 * (the allowance then). Sampled replays are timed by an event pair on the app stream and fed to the
 * predictor keyed (graph exec, 0, 0) on the current allowance's TPCs (after an allowance change
 * the samples' TPC count is wrong until the window rolls over), so an owner that replays graphs
 * publishes when it will be idle, as one launching kernels does. */
static CUresult launch_graph(launch_request *q, const allowance_route *route, uint64_t generation, CUcontext ctx,
                             CUstream app_stream, uint64_t now_ns) {
    unsigned tpcs = route && route->views[LITHOS_VIEW_TPC].green ? route->views[LITHOS_VIEW_TPC].tpcs : g.table->tpcs_on_gpu[0];
    lend_choice lend = {.own_tpcs = (uint16_t)tpcs};
    uint64_t longest_ns = 0;
    if (g.predictor)
        lend.predicted_ns = lithos_predictor_predict_longest_ns(g.predictor, (uint64_t)(uintptr_t)q->graph, 0, 0, tpcs, &longest_ns);
    publish_activity(q, now_ns, longest_ns);
    flush_if_pending();
    if (ctx) queue_after_launch(&queue_of(ctx, app_stream)->end_ns, now_ns, longest_ns); /* kernels behind it start after it */
    timing_set *timing = sample_due(longest_ns) ? app_stream_timing(app_stream) : NULL;
    int pair = timing ? timing_begin(timing, app_stream) : -1;
    CUresult r = call_real(q, q->stream);
    tls.launches[PATH_UNCONFINED]++;
    if (r == CUDA_SUCCESS) {
        uint64_t ticket = record_launch(q, NULL, (const unsigned[3]){1, 1, 1}, LITHOS_VIEW_GRAPH, tpcs, generation, &lend, now_ns);
        if (timing) timing_end(timing, pair, app_stream, ticket);
    }
    return r;
}

/* Every TPC allowed: the launch goes on the app stream as without the shim. Nobody can lend to or
 * borrow from this client, so nothing is predicted, queued or timed (current_route makes this
 * thread's queue estimates conservative when the allowance shrinks); the launch is recorded and
 * the activity word moved as for an unknown kernel (busy for lend_unknown_kernel_busy_ns), so the
 * client does not look idle with work queued when its allowance shrinks. */
static CUresult launch_whole_gpu(launch_request *q, const func_info *info, const unsigned cluster[3], int view, unsigned tpcs,
                                 uint64_t generation, uint64_t now_ns) {
    publish_activity(q, now_ns, 0);
    flush_if_pending();
    PROF_MARK(PROF_PUBLISH);
    CUresult r = call_real(q, q->stream);
    PROF_MARK(PROF_REAL);
    tls.launches[is_memory_op(q) ? PATH_MEMORY_APP : PATH_DIRECT]++;
    lend_choice lend = {.own_tpcs = (uint16_t)tpcs};
    if (r == CUDA_SUCCESS) record_launch(q, info, cluster, view, tpcs, generation, &lend, now_ns);
    PROF_MARK(PROF_RECORD);
    return r;
}

/* ---------------------------------------------------------------- held launches (LITHOS_DISPATCH) */

/*
 * A kernel's TPCs are fixed when it is handed to the driver, and one queued behind others runs long
 * after that: the queue rule above keeps it off lent TPCs (their owner would wait for it), so a
 * best-effort job that queues deep rarely borrows. With LITHOS_DISPATCH its kernel launches are
 * HELD instead: the launching thread copies the launch (arguments by the kernel's parameter layout,
 * cuFuncGetParamInfo; a packed buffer as is; launch attributes) into a FIFO and returns
 * CUDA_SUCCESS; the process's dispatcher thread hands the FIFO's head to route_launch once the
 * predicted work queued ahead of it on its stream is at most dispatch_depth_ns, or the stream has
 * drained; when the head could borrow and a lender is idle, until the queue ahead lets it
 * (dispatch_gate_open). The lending rule then decides with a shallow queue, just before the kernel runs.
 * Held: cuLaunchKernel / cuLaunchKernelEx of a client with a lend list (low priority only, unless
 * LITHOS_DISPATCH=all), confined to a green view, known parameter layout, legacy or created
 * stream, not capturing, deferred joins on; behind held launches, any such launch with a known
 * layout (green view or not), memsets (cuMemsetD8/16/32Async) and device-to-device copies
 * (cuMemcpyDtoDAsync), in stream order. A kernel attribute set (cuKernelSetAttribute,
 * cuFuncSetAttribute) to the value in force is a no-op. Everything else is sent as before, after a
 * DRAIN: every other launch, a changed kernel attribute, cuStreamDestroy and every driver call
 * outside lithos_nojoin.h (through the stubs) first waits until the FIFO is empty. Calls that wait
 * for the GPU anyway (names with "Synchronize", synchronous copies) let the dispatcher keep its
 * pace; any other makes it send everything at once. A launch that fails at dispatch is counted (lithos_client_dispatch_counts)
 * and noticed once: the program was told it succeeded. Locking: held.lock guards the FIFO's tail
 * and the waits; only the dispatcher moves the head.
 */
#define HELD_MAX 1024
#define HELD_INLINE_ARGS 512
#define HELD_ATTRS 8
#define DISPATCH_NAP_MAX_NS 20000u

typedef struct {
    int gated_to_borrow;    /* the gate waited for the queue to let it borrow (counted once) */
    unsigned borrow_tpcs;   /* kernels: the own TPCs of its view when it could borrow, else 0 */
    const allowance_route *route; /* kernels: the allowance it was held under (routes are never freed) */
    lithos_kernel_key key;  /* kernels: what its time is predicted by */
    CUdeviceptr mem_dst, mem_src; /* memsets and device-to-device copies */
    unsigned mem_value, mem_width; /* memsets: the value; its width in bytes (1, 2 or 4) */
    size_t mem_count;              /* memsets: elements; copies: bytes */
    CUcontext ctx;
    CUstream stream;
    CUfunction function;
    const func_info *info;
    int api, packed; /* API_MEMSET / API_COPY: sent at once when they reach the head; packed: the arguments came as one
                      * buffer (CU_LAUNCH_PARAM_BUFFER_POINTER) */
    unsigned grid[3], block[3], shared_bytes;
    int has_config;
    CUlaunchConfig config; /* attrs and hStream are set at dispatch */
    CUlaunchAttribute attrs[HELD_ATTRS];
    size_t arg_bytes;
    unsigned char *args; /* inline_args, or malloc'd when larger */
    unsigned char inline_args[HELD_INLINE_ARGS];
} held_launch;

/* lithos_client_dispatch_counts: launches held; sent by the dispatcher; held at the depth gate (at
 * least once); microseconds the gate waited; drains that let the dispatcher keep its pace; drains
 * that made it send at once; launches that waited for room in the FIFO; launches failed at dispatch;
 * launches sent directly because the kernel's parameter layout is not known (or it has none);
 * drains at once made by a hook (a launch that was not held, a changed kernel attribute; the rest
 * came through the stubs: their flush counts, lithos_client_stub); memsets held behind held launches; device-to-device copies
 * held likewise; kernel attribute sets that changed nothing, so drained nothing; gates held
 * tighter so that the head could borrow (an idle lender, a kernel short enough). */
enum { DISPATCH_HELD = 0, DISPATCH_SENT, DISPATCH_GATED, DISPATCH_GATE_US, DISPATCH_DRAIN_PACED, DISPATCH_DRAIN_AT_ONCE,
       DISPATCH_FULL, DISPATCH_FAILED, DISPATCH_NO_LAYOUT, DISPATCH_DRAIN_BY_HOOK, DISPATCH_HELD_MEMSETS,
       DISPATCH_HELD_COPIES, DISPATCH_SAME_ATTRIBUTE, DISPATCH_GATED_TO_BORROW, LITHOS_DISPATCH_COUNTS };

LITHOS_HIDDEN int lithos_held_launches; /* 1 while the FIFO holds a launch; read by every stub */
static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake, moved; /* wake: for the dispatcher; moved: the FIFO's head moved */
    held_launch ring[HELD_MAX];
    uint64_t pushed;  /* atomic; moved under lock */
    uint64_t sent;    /* atomic; moved by the dispatcher */
    int hurry;        /* atomic; drains waiting that asked for everything at once (under lock) */
    int sleeping;     /* the dispatcher waits on wake (under lock) */
    int waiters;      /* atomic; threads waiting on moved (under lock) */
    pid_t pid;        /* the process whose dispatcher runs */
    uint64_t counts[LITHOS_DISPATCH_COUNTS]; /* atomic */
    const uint64_t *launches, *lending, *joins; /* the dispatcher thread's counters */
} held = {.lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER, .moved = PTHREAD_COND_INITIALIZER};

static void count_dispatch(int which, uint64_t n) { __atomic_fetch_add(&held.counts[which], n, __ATOMIC_RELAXED); }

/* A forked child has no dispatcher and none of its parent's held launches. */
static void forget_held_in_child(void) {
    pthread_mutex_init(&held.lock, NULL);
    pthread_cond_init(&held.wake, NULL);
    pthread_cond_init(&held.moved, NULL);
    held.pushed = held.sent = 0;
    held.hurry = held.sleeping = held.waiters = 0;
    held.pid = 0;
    held.launches = held.lending = held.joins = NULL;
    __atomic_store_n(&lithos_held_launches, 0, __ATOMIC_RELEASE);
}

/* Wait until every held launch has been sent (not run). paced: the caller is about to wait for the
 * GPU anyway, so the dispatcher keeps its depth gate; else it sends everything at once. Returns 1
 * when it waited for any. */
static int drain_held_launches(int paced) {
    if (!__atomic_load_n(&lithos_held_launches, __ATOMIC_ACQUIRE) || tls.is_dispatcher || tls.in_init || tls.in_join) return 0;
    int waited = 0;
    pthread_mutex_lock(&held.lock);
    if (__atomic_load_n(&held.pushed, __ATOMIC_RELAXED) != __atomic_load_n(&held.sent, __ATOMIC_SEQ_CST)) {
        waited = 1;
        count_dispatch(paced ? DISPATCH_DRAIN_PACED : DISPATCH_DRAIN_AT_ONCE, 1);
        if (!paced) __atomic_add_fetch(&held.hurry, 1, __ATOMIC_SEQ_CST);
        __atomic_add_fetch(&held.waiters, 1, __ATOMIC_SEQ_CST);
        while (held.pushed != __atomic_load_n(&held.sent, __ATOMIC_SEQ_CST)) pthread_cond_wait(&held.moved, &held.lock);
        __atomic_sub_fetch(&held.waiters, 1, __ATOMIC_SEQ_CST);
        if (!paced) __atomic_sub_fetch(&held.hurry, 1, __ATOMIC_SEQ_CST);
    }
    pthread_mutex_unlock(&held.lock);
    return waited;
}

/* Does the driver call through this stub wait for the GPU anyway (a paced drain will do)? */
static int waits_for_gpu(lithos_stub_slot *slot) {
    uint64_t known = __atomic_load_n(&slot->reserved, __ATOMIC_RELAXED); /* 0 not yet asked, 1 yes, 2 no */
    if (!known) {
        const char *name = slot->name ? slot->name : "";
        int waits = strstr(name, "Synchronize") || (strncmp(name, "cuMemcpy", 8) == 0 && !strstr(name, "Async"));
        known = waits ? 1 : 2;
        __atomic_store_n(&slot->reserved, known, __ATOMIC_RELAXED);
    }
    return known == 1;
}

/* Called on the dispatcher thread: whether the head may be sent now (else it napped a little). The
 * queue ahead may be dispatch_depth_ns deep; when the head could borrow (more blocks than own SMs, a
 * prediction within the atom) and a lender is idle, only as deep as lets it borrow (the lending rule's
 * ahead + predicted <= atom). */
static int dispatch_gate_open(held_launch *h) {
    stream_queue *queue = queue_of(h->ctx, h->stream);
    uint64_t now_ns = monotonic_ns(), depth_ns = g.dispatch_depth_ns;
    uint64_t atom_ns = __atomic_load_n(&g.table->lend_atom_ns[0], __ATOMIC_RELAXED);
    if (!depth_ns) depth_ns = atom_ns / 2;
    uint64_t ahead_ns = queue->end_ns > now_ns ? queue->end_ns - now_ns : 0;
    uint64_t own_ns = h->borrow_tpcs ? predict_ns(&h->key, h->borrow_tpcs) : 0; /* as choose_lending will */
    if (own_ns && own_ns <= atom_ns && atom_ns - own_ns < depth_ns && ahead_ns > atom_ns - own_ns) {
        uint64_t lender_mask = my_lender_mask(slot_at_index(g.slot)), mask[LITHOS_MASK_WORDS];
        memcpy(mask, h->route->tpc_mask, sizeof(mask));
        if (lender_mask && idle_lenders(lender_mask, now_ns, mask) && memcmp(mask, h->route->tpc_mask, sizeof(mask)) != 0) {
            if (ahead_ns <= depth_ns && !h->gated_to_borrow) count_dispatch(DISPATCH_GATED_TO_BORROW, 1);
            h->gated_to_borrow = 1;
            depth_ns = atom_ns - own_ns;
        }
    }
    if (ahead_ns <= depth_ns) return 1;
    if (stream_drained(h->ctx, h->stream)) {
        queue->end_ns = now_ns;
        return 1;
    }
    uint64_t nap = ahead_ns - depth_ns < DISPATCH_NAP_MAX_NS ? ahead_ns - depth_ns : DISPATCH_NAP_MAX_NS;
    struct timespec ts = {0, (long)nap};
    nanosleep(&ts, NULL);
    count_dispatch(DISPATCH_GATE_US, (monotonic_ns() - now_ns) / 1000u);
    return 0;
}

static CUresult route_launch(launch_request *q);
static CUresult send_memory_op(launch_request *q);

/* Called on the dispatcher thread: the held launch, rebuilt, through the launch path. */
static void dispatch_held(held_launch *h) {
    void *params[HELD_MAX_PARAMS];
    size_t packed_bytes = h->arg_bytes;
    void *extra[5] = {CU_LAUNCH_PARAM_BUFFER_POINTER, h->args, CU_LAUNCH_PARAM_BUFFER_SIZE, &packed_bytes, CU_LAUNCH_PARAM_END};
    launch_request q = {.api = h->api, .function = h->function, .grid = {h->grid[0], h->grid[1], h->grid[2]},
                        .block = {h->block[0], h->block[1], h->block[2]}, .shared_bytes = h->shared_bytes, .stream = h->stream};
    if (h->packed) {
        q.extra = extra;
    } else {
        for (int i = 0; i < h->info->param_count; i++) params[i] = h->args + h->info->param_layout[2 * i];
        q.params = params;
    }
    if (h->has_config) {
        h->config.attrs = h->attrs;
        h->config.hStream = h->stream;
        q.config = &h->config;
    }
    CUresult r = route_launch(&q);
    count_dispatch(DISPATCH_SENT, 1);
    if (r != CUDA_SUCCESS) {
        count_dispatch(DISPATCH_FAILED, 1);
        notice_once(WARN_DISPATCH, "a held launch of %s failed when it was sent (CUresult %d); the program was told it succeeded",
                    h->info->name, (int)r);
    }
}

/* Called on the dispatcher thread: a held memset or copy, sent as the hooks send one. */
static void dispatch_memory_op(const held_launch *h) {
    launch_request q = {.api = h->api, .stream = h->stream, .mem_dst = h->mem_dst, .mem_src = h->mem_src,
                        .mem_value = h->mem_value, .mem_width = h->mem_width, .mem_count = h->mem_count};
    CUresult r = send_memory_op(&q);
    count_dispatch(DISPATCH_SENT, 1);
    if (r != CUDA_SUCCESS) {
        count_dispatch(DISPATCH_FAILED, 1);
        notice_once(WARN_DISPATCH, "a held %s failed when it was sent (CUresult %d); the program was told it succeeded",
                    h->api == API_COPY ? "copy" : "memset", (int)r);
    }
}

static void *dispatcher_main(void *unused) {
    tls.is_dispatcher = 1;
    prctl(PR_SET_TIMERSLACK, 1000ul); /* naps of microseconds, not the default 50 us slack */
    pthread_mutex_lock(&held.lock);
    held.launches = tls.launches, held.lending = tls.lending, held.joins = tls.joins;
    pthread_mutex_unlock(&held.lock);
    CUcontext current = NULL;
    uint64_t gated_at = UINT64_MAX; /* the FIFO index last counted as gated */
    for (;;) {
        uint64_t sent = __atomic_load_n(&held.sent, __ATOMIC_RELAXED);
        if (__atomic_load_n(&held.pushed, __ATOMIC_ACQUIRE) == sent) {
            pthread_mutex_lock(&held.lock);
            if (held.pushed == sent) {
                __atomic_store_n(&lithos_held_launches, 0, __ATOMIC_RELEASE);
                pthread_cond_broadcast(&held.moved);
                held.sleeping = 1;
                while (held.pushed == sent) pthread_cond_wait(&held.wake, &held.lock);
                held.sleeping = 0;
            }
            pthread_mutex_unlock(&held.lock);
            continue;
        }
        held_launch *h = &held.ring[sent % HELD_MAX];
        if (h->ctx != current && drv_cuCtxSetCurrent(h->ctx) == CUDA_SUCCESS) current = h->ctx;
        if (!is_memory_api(h->api) && !__atomic_load_n(&held.hurry, __ATOMIC_SEQ_CST) && !dispatch_gate_open(h)) {
            if (gated_at != sent) count_dispatch(DISPATCH_GATED, 1);
            gated_at = sent;
            continue;
        }
        if (is_memory_api(h->api)) {
            dispatch_memory_op(h);
        } else {
            dispatch_held(h);
            if (h->args != h->inline_args) free(h->args);
        }
        __atomic_store_n(&held.sent, sent + 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&held.waiters, __ATOMIC_SEQ_CST)) {
            pthread_mutex_lock(&held.lock);
            pthread_cond_broadcast(&held.moved);
            pthread_mutex_unlock(&held.lock);
        }
    }
    return NULL;
}

static void drain_at_exit(void) { drain_held_launches(0); }

/* Called with held.lock held: the dispatcher of this process runs (started once). */
static int dispatcher_running(void) {
    if (held.pid == getpid()) return 1;
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int ok = pthread_create(&thread, &attr, dispatcher_main, NULL) == 0;
    pthread_attr_destroy(&attr);
    if (!ok) {
        notice_once(WARN_DISPATCH, "cannot start the dispatcher thread: launches are not held");
        return 0;
    }
    if (!held.pid) atexit(drain_at_exit);
    held.pid = getpid();
    return 1;
}

/* Called with held.lock held: the FIFO's next free entry, once there is room. */
static held_launch *fifo_tail_locked(void) {
    if (held.pushed - __atomic_load_n(&held.sent, __ATOMIC_SEQ_CST) >= HELD_MAX) {
        count_dispatch(DISPATCH_FULL, 1);
        __atomic_add_fetch(&held.waiters, 1, __ATOMIC_SEQ_CST);
        while (held.pushed - __atomic_load_n(&held.sent, __ATOMIC_SEQ_CST) >= HELD_MAX) pthread_cond_wait(&held.moved, &held.lock);
        __atomic_sub_fetch(&held.waiters, 1, __ATOMIC_SEQ_CST);
    }
    return &held.ring[held.pushed % HELD_MAX];
}

/* Hold the launch for the dispatcher when it qualifies (see above), or, with a known layout, when
 * launches are held already (kept in order instead of draining the FIFO). Returns 1 when held. */
static int hold_launch(const launch_request *q, const allowance_route *route, const func_info *info, const func_info *scratch,
                       int view, int refused, CUcontext ctx, CUstream app_stream, const lithos_kernel_key *key) {
    if (!g.dispatch || tls.is_dispatcher || q->retry || q->per_thread || app_stream == CU_STREAM_PER_THREAD ||
        (q->api != LITHOS_API_LAUNCH_KERNEL && q->api != LITHOS_API_LAUNCH_KERNEL_EX) || !info || info == scratch ||
        !g.activity || !defer_on())
        return 0;
    int confined = refused != RETRY_WHOLE_GPU && !route->whole_gpu && route->views[view].green;
    if (!__atomic_load_n(&lithos_held_launches, __ATOMIC_ACQUIRE)) {
        const lithos_slot *me = slot_at_index(g.slot);
        if (!confined || !my_lender_mask(me) ||
            (g.dispatch == DISPATCH_LOW_PRIORITY &&
             !(__atomic_load_n(&me->lending_flags[0], __ATOMIC_RELAXED) & LITHOS_LEND_LOW_PRIORITY)))
            return 0;
    }
    if (info->param_count <= 0) {
        count_dispatch(DISPATCH_NO_LAYOUT, 1);
        return 0;
    }
    if (q->api == LITHOS_API_LAUNCH_KERNEL_EX) {
        if (!q->config || q->config->numAttrs > HELD_ATTRS) return 0;
        for (unsigned i = 0; i < q->config->numAttrs; i++) /* events the launch records: queried without a drain */
            if (q->config->attrs[i].id == CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_EVENT ||
                q->config->attrs[i].id == CU_LAUNCH_ATTRIBUTE_LAUNCH_COMPLETION_EVENT)
                return 0;
    }
    const void *packed = NULL;
    size_t bytes = info->param_bytes;
    if (!q->params && q->extra) { /* only the packed-buffer form */
        if (!packed_args(q->extra, &packed, &bytes)) return 0;
    } else if (!q->params) {
        return 0;
    }
    CUstreamCaptureStatus capture = CU_STREAM_CAPTURE_STATUS_ACTIVE;
    if (drv_cuStreamIsCapturing(app_stream, &capture) != CUDA_SUCCESS || capture != CU_STREAM_CAPTURE_STATUS_NONE) return 0;
    pthread_mutex_lock(&held.lock);
    if (!dispatcher_running()) {
        pthread_mutex_unlock(&held.lock);
        return 0;
    }
    held_launch *h = fifo_tail_locked();
    h->args = bytes <= HELD_INLINE_ARGS ? h->inline_args : malloc(bytes);
    if (!h->args) {
        pthread_mutex_unlock(&held.lock);
        return 0;
    }
    h->gated_to_borrow = 0;
    h->key = *key;
    h->route = route;
    h->borrow_tpcs = confined && !fits_own_sms(key->grid_blocks, route->views[view].tpcs) ? route->views[view].tpcs : 0;
    h->ctx = ctx, h->stream = app_stream, h->function = q->function, h->info = info, h->api = q->api;
    h->packed = packed != NULL, h->arg_bytes = bytes, h->shared_bytes = q->shared_bytes;
    memcpy(h->grid, q->grid, sizeof(h->grid));
    memcpy(h->block, q->block, sizeof(h->block));
    if (packed) {
        memcpy(h->args, packed, bytes);
    } else {
        for (int i = 0; i < info->param_count; i++)
            memcpy(h->args + info->param_layout[2 * i], q->params[i], info->param_layout[2 * i + 1]);
    }
    h->has_config = q->api == LITHOS_API_LAUNCH_KERNEL_EX;
    if (h->has_config) {
        h->config = *q->config;
        memcpy(h->attrs, q->config->attrs, sizeof(CUlaunchAttribute) * q->config->numAttrs);
    }
    __atomic_store_n(&held.pushed, held.pushed + 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(&lithos_held_launches, 1, __ATOMIC_RELEASE);
    if (held.sleeping) pthread_cond_signal(&held.wake);
    pthread_mutex_unlock(&held.lock);
    count_dispatch(DISPATCH_HELD, 1);
    return 1;
}

/* Whether ptr is device memory (not host memory reached through unified addressing: a copy to or
 * from pageable memory may complete before it returns, and an invalid pointer must fail at once). */
static int is_device_memory(CUdeviceptr ptr) {
    unsigned type = 0;
    return drv_cuPointerGetAttribute &&
           drv_cuPointerGetAttribute(&type, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, ptr) == CUDA_SUCCESS && type == CU_MEMORYTYPE_DEVICE;
}

/* A memset or device-to-device copy behind held launches is held too (its stream's order), instead
 * of draining the FIFO: libraries issue them between kernels (cuBLAS split-K, cuDNN workspaces,
 * optimizer steps). Returns 1 when held. */
static int hold_memory_op(const launch_request *q) {
    if (!__atomic_load_n(&lithos_held_launches, __ATOMIC_ACQUIRE) || tls.is_dispatcher || q->per_thread ||
        q->stream == CU_STREAM_PER_THREAD)
        return 0;
    if (!is_device_memory(q->mem_dst) || (q->api == API_COPY && !is_device_memory(q->mem_src)))
        return 0; /* host memory: the driver's rules */
    CUcontext ctx = NULL;
    CUstreamCaptureStatus capture = CU_STREAM_CAPTURE_STATUS_ACTIVE;
    if (drv_cuCtxGetCurrent(&ctx) != CUDA_SUCCESS || !ctx || drv_cuStreamIsCapturing(q->stream, &capture) != CUDA_SUCCESS ||
        capture != CU_STREAM_CAPTURE_STATUS_NONE)
        return 0;
    pthread_mutex_lock(&held.lock);
    if (held.pid != getpid()) {
        pthread_mutex_unlock(&held.lock);
        return 0;
    }
    held_launch *h = fifo_tail_locked();
    h->api = q->api;
    h->ctx = ctx, h->stream = q->stream;
    h->mem_dst = q->mem_dst, h->mem_src = q->mem_src, h->mem_value = q->mem_value, h->mem_width = q->mem_width,
    h->mem_count = q->mem_count;
    __atomic_store_n(&held.pushed, held.pushed + 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(&lithos_held_launches, 1, __ATOMIC_RELEASE);
    if (held.sleeping) pthread_cond_signal(&held.wake);
    pthread_mutex_unlock(&held.lock);
    count_dispatch(q->api == API_COPY ? DISPATCH_HELD_COPIES : DISPATCH_HELD_MEMSETS, 1);
    return 1;
}

/* What every hook but the launch path's does before its driver call, as the stubs do: held launches
 * sent, owed joins paid. */
static void pay_owed(void) {
    drain_held_launches(0);
    flush_if_pending();
}

/* ---------------------------------------------------------------- unrolled graph replays */

/*
 * A graph's kernel nodes keep the green context they were captured in, so a replay cannot borrow
 * (and it is longer than the atom). When this slot's lending_flags hold LITHOS_LEND_UNROLL_GRAPHS,
 * a replay of a graph the shim copied at instantiation is UNROLLED instead: its nodes are sent one
 * by one, in a topological order, on the replay's stream, kernels through route_launch (so the
 * lending rule decides per kernel) and memsets as the hooks send them (send_memory_op). Copied at cuGraphInstantiate*
 * (PyTorch destroys the CUgraph right after, so the copies are the only record): graphs of kernel,
 * 1-D memset and empty nodes, each kernel with its parameter values (by cuFuncGetParamInfo's layout,
 * or its packed buffer) and its cluster shape or cooperative attribute. Any other graph, or one
 * captured on a stream that is capturing now, replays whole. An executable graph that
 * cuGraphExecUpdate, cuGraphExec*SetParams or cuGraphNodeSetEnabled changed replays whole from then
 * on; cuGraphExecDestroy forgets it. Parallel branches run one after another, and the graph's own
 * launch savings are lost (a few microseconds of CPU per kernel). LITHOS_COPY_GRAPHS=0: copy none (replays are never unrolled).
 * Locking: graphs.lock guards the table and each copy's users/dead (a copy in use by a replay is
 * freed by its last user).
 */
typedef struct {
    int api; /* LITHOS_API_LAUNCH_KERNEL, _EX (cluster shape in attr), _COOPERATIVE, or API_MEMSET */
    /* kernels */
    CUfunction function;
    unsigned grid[3], block[3], shared_bytes;
    CUlaunchAttribute attr;
    void **params;     /* into args; NULL for a kernel without parameters or a packed one */
    void *extra[5];    /* packed: CU_LAUNCH_PARAM_BUFFER_POINTER args, _SIZE &arg_bytes, _END */
    size_t arg_bytes;
    unsigned char *args;
    /* memsets */
    CUdeviceptr dst;
    unsigned value, width;
    size_t count;
} unrolled_node;

typedef struct unrolled_graph {
    CUgraphExec exec;
    unsigned count;
    int users, dead;
    unrolled_node *nodes;
    struct unrolled_graph *next;
} unrolled_graph;

/* lithos_client_graph_counts: graphs copied; graphs not copied (a node the shim cannot send); replays
 * unrolled; nodes sent by them; replays whole while unrolling was on; copies dropped because the
 * executable graph was changed. */
enum { GRAPH_COPIED = 0, GRAPH_NOT_COPIED, GRAPH_REPLAYS_UNROLLED, GRAPH_NODES_SENT, GRAPH_REPLAYS_WHOLE,
       GRAPH_CHANGED, LITHOS_GRAPH_COUNTS };
#define GRAPH_BUCKETS 256u
#define GRAPH_MAX_NODES 65536u
static struct {
    pthread_mutex_t lock;
    unrolled_graph *buckets[GRAPH_BUCKETS];
    uint64_t counts[LITHOS_GRAPH_COUNTS]; /* atomic */
} graphs = {.lock = PTHREAD_MUTEX_INITIALIZER};

static void count_graph(int which, uint64_t n) { __atomic_fetch_add(&graphs.counts[which], n, __ATOMIC_RELAXED); }
static unsigned graph_bucket(CUgraphExec exec) { return (unsigned)(((uintptr_t)exec >> 4) * 2654435761u) % GRAPH_BUCKETS; }

static void free_unrolled(unrolled_graph *u) {
    for (unsigned i = 0; i < u->count; i++) {
        free(u->nodes[i].params);
        free(u->nodes[i].args);
    }
    free(u->nodes);
    free(u);
}

/* Unlinks exec's copy (freed now, or by its last user). 1 if there was one. */
static int forget_graph(CUgraphExec exec) {
    int found = 0;
    pthread_mutex_lock(&graphs.lock);
    for (unrolled_graph **at = &graphs.buckets[graph_bucket(exec)]; *at; at = &(*at)->next) {
        if ((*at)->exec != exec) continue;
        unrolled_graph *u = *at;
        *at = u->next;
        if (u->users) u->dead = 1;
        else free_unrolled(u);
        found = 1;
        break;
    }
    pthread_mutex_unlock(&graphs.lock);
    return found;
}

static unrolled_graph *take_graph(CUgraphExec exec) {
    pthread_mutex_lock(&graphs.lock);
    unrolled_graph *u = graphs.buckets[graph_bucket(exec)];
    while (u && u->exec != exec) u = u->next;
    if (u) u->users++;
    pthread_mutex_unlock(&graphs.lock);
    return u;
}

static void release_graph(unrolled_graph *u) {
    pthread_mutex_lock(&graphs.lock);
    int last = --u->users == 0 && u->dead;
    pthread_mutex_unlock(&graphs.lock);
    if (last) free_unrolled(u);
}

/* Copies one kernel node; NULL on success, else why not. */
static const char *copy_kernel_node(CUgraphNode node, unrolled_node *out) {
    CUDA_KERNEL_NODE_PARAMS p;
    memset(&p, 0, sizeof(p));
    if (drv_cuGraphKernelNodeGetParams(node, &p) != CUDA_SUCCESS) return "a kernel node's parameters cannot be read";
    out->function = p.func ? p.func : (CUfunction)p.kern;
    out->grid[0] = p.gridDimX, out->grid[1] = p.gridDimY, out->grid[2] = p.gridDimZ;
    out->block[0] = p.blockDimX, out->block[1] = p.blockDimY, out->block[2] = p.blockDimZ;
    out->shared_bytes = p.sharedMemBytes;
    out->api = LITHOS_API_LAUNCH_KERNEL;
    CUkernelNodeAttrValue value;
    memset(&value, 0, sizeof(value));
    if (drv_cuGraphKernelNodeGetAttribute(node, CU_KERNEL_NODE_ATTRIBUTE_CLUSTER_DIMENSION, &value) == CUDA_SUCCESS &&
        value.clusterDim.x * value.clusterDim.y * value.clusterDim.z > 1) {
        out->api = LITHOS_API_LAUNCH_KERNEL_EX;
        out->attr.id = CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
        out->attr.value = value;
    }
    memset(&value, 0, sizeof(value));
    if (drv_cuGraphKernelNodeGetAttribute(node, CU_KERNEL_NODE_ATTRIBUTE_COOPERATIVE, &value) == CUDA_SUCCESS &&
        value.cooperative) {
        if (out->api == LITHOS_API_LAUNCH_KERNEL_EX) return "a cooperative kernel node with a cluster shape";
        out->api = LITHOS_API_LAUNCH_COOPERATIVE;
    }
    if (p.kernelParams) {
        uint16_t layout[2 * HELD_MAX_PARAMS];
        int n = param_layout(out->function, layout, HELD_MAX_PARAMS, &out->arg_bytes);
        if (n < 0) return "a kernel node whose parameter layout is unknown";
        if (n == 0) return NULL; /* no parameters */
        if (!(out->args = calloc(1, out->arg_bytes)) || !(out->params = malloc(sizeof(void *) * (size_t)n))) return "out of memory";
        for (int i = 0; i < n; i++) {
            out->params[i] = out->args + layout[2 * i];
            memcpy(out->params[i], p.kernelParams[i], layout[2 * i + 1]);
        }
    } else if (p.extra) {
        if (out->api == LITHOS_API_LAUNCH_COOPERATIVE) return "a cooperative kernel node with packed arguments";
        const void *buffer;
        if (!packed_args(p.extra, &buffer, &out->arg_bytes)) return "a kernel node with launch options other than a packed buffer";
        if (!(out->args = malloc(out->arg_bytes ? out->arg_bytes : 1))) return "out of memory";
        memcpy(out->args, buffer, out->arg_bytes);
        out->extra[0] = CU_LAUNCH_PARAM_BUFFER_POINTER, out->extra[1] = out->args;
        out->extra[2] = CU_LAUNCH_PARAM_BUFFER_SIZE, out->extra[3] = &out->arg_bytes;
        out->extra[4] = CU_LAUNCH_PARAM_END;
    }
    return NULL;
}

static const char *copy_memset_node(CUgraphNode node, unrolled_node *out) {
    CUDA_MEMSET_NODE_PARAMS p;
    if (drv_cuGraphMemsetNodeGetParams(node, &p) != CUDA_SUCCESS) return "a memset node's parameters cannot be read";
    if (p.elementSize != 1 && p.elementSize != 2 && p.elementSize != 4) return "a memset node of an odd element size";
    if (p.height > 1 && p.pitch != p.width * p.elementSize) return "a 2-D memset node";
    out->api = API_MEMSET;
    out->dst = p.dst, out->value = p.value, out->width = p.elementSize, out->count = p.width * (p.height ? p.height : 1);
    return NULL;
}

static int compare_handles(const void *a, const void *b) {
    uintptr_t x = *(const uintptr_t *)a, y = *(const uintptr_t *)b; /* (handle, index) pairs: by handle */
    return x < y ? -1 : x > y;
}

/* Index of node in the sorted (handle, index) pairs, or -1. */
static long node_index(const uintptr_t *sorted, size_t n, CUgraphNode node) {
    uintptr_t key[2] = {(uintptr_t)node, 0};
    const uintptr_t *hit = bsearch(key, sorted, n, 2 * sizeof(uintptr_t), compare_handles);
    return hit ? (long)hit[1] : -1;
}

/* The nodes of graph in a topological order (Kahn, ties in cuGraphGetNodes order), copied. */
static unrolled_graph *copy_graph(CUgraph graph, const char **why) {
    size_t n = 0, edges = 0;
    unrolled_graph *u = NULL;
    CUgraphNode *nodes = NULL, *from = NULL, *to = NULL;
    CUgraphEdgeData *edge_data = NULL;
    uintptr_t *sorted = NULL;
    size_t *waiting = NULL, *order = NULL, *first_out = NULL, *out_edges = NULL;
    *why = "the graph's nodes cannot be read";
    if (drv_cuGraphGetNodes(graph, NULL, &n) != CUDA_SUCCESS) return NULL;
    *why = n > GRAPH_MAX_NODES ? "more than 65536 nodes" : "out of memory";
    if (n > GRAPH_MAX_NODES || !(nodes = calloc(n + 1, sizeof(*nodes))) || !(sorted = calloc(2 * n + 2, sizeof(*sorted))) ||
        !(waiting = calloc(n + 1, sizeof(*waiting))) || !(order = calloc(n + 1, sizeof(*order))) ||
        !(first_out = calloc(n + 2, sizeof(*first_out))))
        goto done;
    *why = "the graph's nodes or edges cannot be read";
    if (drv_cuGraphGetNodes(graph, nodes, &n) != CUDA_SUCCESS || drv_cuGraphGetEdges(graph, NULL, NULL, NULL, &edges) != CUDA_SUCCESS)
        goto done;
    *why = "out of memory";
    if (!(from = calloc(edges + 1, sizeof(*from))) || !(to = calloc(edges + 1, sizeof(*to))) ||
        !(edge_data = calloc(edges + 1, sizeof(*edge_data))) || !(out_edges = calloc(edges + 1, sizeof(*out_edges))))
        goto done;
    *why = "the graph's nodes or edges cannot be read";
    if (edges && drv_cuGraphGetEdges(graph, from, to, edge_data, &edges) != CUDA_SUCCESS) goto done;
    for (size_t i = 0; i < n; i++) sorted[2 * i] = (uintptr_t)nodes[i], sorted[2 * i + 1] = i;
    qsort(sorted, n, 2 * sizeof(uintptr_t), compare_handles);
    /* out-edges grouped by source (counting sort), in-degrees in waiting */
    *why = "an edge names a node the graph does not list";
    for (size_t e = 0; e < edges; e++) {
        long a = node_index(sorted, n, from[e]), b = node_index(sorted, n, to[e]);
        if (a < 0 || b < 0) goto done;
        first_out[a + 1]++;
        waiting[b]++;
    }
    for (size_t i = 0; i < n; i++) first_out[i + 1] += first_out[i];
    size_t *fill = order; /* borrowed as a cursor per node until the order is built */
    for (size_t i = 0; i < n; i++) fill[i] = first_out[i];
    for (size_t e = 0; e < edges; e++) out_edges[fill[node_index(sorted, n, from[e])]++] = (size_t)node_index(sorted, n, to[e]);
    size_t head = 0, tail = 0;
    for (size_t i = 0; i < n; i++)
        if (!waiting[i]) order[tail++] = i;
    while (head < tail) {
        size_t i = order[head++];
        for (size_t e = first_out[i]; e < first_out[i + 1]; e++)
            if (--waiting[out_edges[e]] == 0) order[tail++] = out_edges[e];
    }
    *why = "the graph has a cycle";
    if (tail != n) goto done;
    *why = "out of memory";
    if (!(u = calloc(1, sizeof(*u))) || !(u->nodes = calloc(n + 1, sizeof(*u->nodes)))) {
        free(u);
        u = NULL;
        goto done;
    }
    for (size_t k = 0; k < n; k++) {
        CUgraphNodeType type;
        const char *bad = "a node of unknown type";
        if (drv_cuGraphNodeGetType(nodes[order[k]], &type) == CUDA_SUCCESS) {
            if (type == CU_GRAPH_NODE_TYPE_EMPTY) continue;
            bad = type == CU_GRAPH_NODE_TYPE_KERNEL   ? copy_kernel_node(nodes[order[k]], &u->nodes[u->count])
                  : type == CU_GRAPH_NODE_TYPE_MEMSET ? copy_memset_node(nodes[order[k]], &u->nodes[u->count])
                                                      : "a node that is no kernel, memset or empty node";
        }
        u->count++; /* a partly copied node is freed with the rest */
        if (bad) {
            *why = bad;
            free_unrolled(u);
            u = NULL;
            goto done;
        }
    }
    *why = NULL;
done:
    if (u == NULL && !*why) *why = "out of memory";
    free(nodes), free(sorted), free(waiting), free(order), free(first_out), free(from), free(to), free(edge_data), free(out_edges);
    return u;
}

/* After a successful instantiation: copy graph for exec (an earlier copy under the same handle is gone). */
static void remember_graph(CUgraphExec exec, CUgraph graph) {
    forget_graph(exec);
    if (g.mode != MODE_CONFINED || !g.copy_graphs || !drv_cuGraphGetNodes || !drv_cuGraphGetEdges || !drv_cuGraphNodeGetType ||
        !drv_cuGraphKernelNodeGetParams || !drv_cuGraphKernelNodeGetAttribute || !drv_cuGraphMemsetNodeGetParams)
        return;
    const char *why = NULL;
    unrolled_graph *u = copy_graph(graph, &why);
    if (!u) {
        count_graph(GRAPH_NOT_COPIED, 1);
        notice_once(WARN_GRAPH, "a CUDA graph holds %s: its replays are never unrolled (they cannot borrow)", why);
        return;
    }
    u->exec = exec;
    pthread_mutex_lock(&graphs.lock);
    unsigned b = graph_bucket(exec);
    u->next = graphs.buckets[b];
    graphs.buckets[b] = u;
    pthread_mutex_unlock(&graphs.lock);
    count_graph(GRAPH_COPIED, 1);
}

/* Sends u's nodes in order on the replay's stream; stops at the first failure (the kernels before it
 * are enqueued: the program sees the error, as from a failed replay). */
static CUresult replay_unrolled(const unrolled_graph *u, const launch_request *replay) {
    for (unsigned i = 0; i < u->count; i++) {
        const unrolled_node *n = &u->nodes[i];
        CUresult r;
        if (n->api == API_MEMSET) {
            launch_request q = {.api = API_MEMSET, .per_thread = replay->per_thread, .stream = replay->stream,
                                .mem_dst = n->dst, .mem_value = n->value, .mem_width = n->width, .mem_count = n->count};
            r = send_memory_op(&q);
        } else {
            CUlaunchConfig config = {n->grid[0], n->grid[1], n->grid[2], n->block[0], n->block[1], n->block[2],
                                     n->shared_bytes, replay->stream, (CUlaunchAttribute *)&n->attr, 1};
            launch_request q = {.api = n->api, .per_thread = replay->per_thread, .function = n->function,
                                .grid = {n->grid[0], n->grid[1], n->grid[2]}, .block = {n->block[0], n->block[1], n->block[2]},
                                .shared_bytes = n->shared_bytes, .stream = replay->stream, .params = n->params,
                                .extra = n->extra[0] ? (void **)n->extra : NULL,
                                .config = n->api == LITHOS_API_LAUNCH_KERNEL_EX ? &config : NULL};
            r = route_launch(&q);
        }
        if (r != CUDA_SUCCESS) {
            notice_once(WARN_GRAPH_REPLAY, "node %u of an unrolled graph replay failed (CUresult %d)", i, (int)r);
            count_graph(GRAPH_NODES_SENT, i);
            return r;
        }
    }
    count_graph(GRAPH_NODES_SENT, u->count);
    count_graph(GRAPH_REPLAYS_UNROLLED, 1);
    return CUDA_SUCCESS;
}

/* A replay's copy when this slot unrolls graphs now and the stream is not capturing; else NULL. */
static unrolled_graph *graph_to_unroll(const launch_request *q, const allowance_route *route, CUstream app_stream) {
    if (!route || route->whole_gpu || !__atomic_load_n(&g.copy_graphs, __ATOMIC_ACQUIRE)) return NULL;
    const lithos_slot *me = slot_at_index(g.slot);
    if (!(__atomic_load_n(&me->lending_flags[0], __ATOMIC_RELAXED) & LITHOS_LEND_UNROLL_GRAPHS)) return NULL;
    unrolled_graph *u = take_graph(q->graph);
    if (!u) {
        count_graph(GRAPH_REPLAYS_WHOLE, 1);
        return NULL;
    }
    CUstreamCaptureStatus capture = CU_STREAM_CAPTURE_STATUS_ACTIVE;
    if (drv_cuStreamIsCapturing(app_stream, &capture) != CUDA_SUCCESS || capture != CU_STREAM_CAPTURE_STATUS_NONE) {
        release_graph(u);
        return NULL;
    }
    return u;
}

/* The graph hooks pay what is owed first, as the stubs they replace did (an upload may enqueue). */
#define INSTANTIATE_HOOK(name, options_type)                                                                           \
    EXPORT CUresult name(CUgraphExec *exec, CUgraph graph, options_type options) {                                    \
        ensure_init();                                                                                                 \
        if (!real_##name) return CUDA_ERROR_NOT_FOUND;                                                                 \
        pay_owed();                                                                                                    \
        CUresult r = real_##name(exec, graph, options);                                                                \
        if (r == CUDA_SUCCESS && exec) remember_graph(*exec, graph);                                                   \
        return r;                                                                                                      \
    }
INSTANTIATE_HOOK(cuGraphInstantiateWithFlags, unsigned long long)
INSTANTIATE_HOOK(cuGraphInstantiateWithParams, CUDA_GRAPH_INSTANTIATE_PARAMS *)
INSTANTIATE_HOOK(cuGraphInstantiateWithParams_ptsz, CUDA_GRAPH_INSTANTIATE_PARAMS *)

EXPORT CUresult cuGraphExecDestroy(CUgraphExec exec) {
    ensure_init();
    if (!real_cuGraphExecDestroy) return CUDA_ERROR_NOT_FOUND;
    pay_owed();
    forget_graph(exec);
    return real_cuGraphExecDestroy(exec);
}

/* Changes to an executable graph: its copy is dropped, so it replays whole from then on. */
#define GRAPH_CHANGE_HOOK(name, params, args)                                                                          \
    EXPORT CUresult name params {                                                                                      \
        ensure_init();                                                                                                 \
        if (!real_##name) return CUDA_ERROR_NOT_FOUND;                                                                 \
        pay_owed();                                                                                                    \
        if (forget_graph(exec)) count_graph(GRAPH_CHANGED, 1);                                                         \
        return real_##name args;                                                                                       \
    }
GRAPH_CHANGE_HOOK(cuGraphExecUpdate_v2, (CUgraphExec exec, CUgraph graph, CUgraphExecUpdateResultInfo *info), (exec, graph, info))
GRAPH_CHANGE_HOOK(cuGraphExecKernelNodeSetParams_v2, (CUgraphExec exec, CUgraphNode node, const CUDA_KERNEL_NODE_PARAMS *p),
                  (exec, node, p))
GRAPH_CHANGE_HOOK(cuGraphExecMemsetNodeSetParams,
                  (CUgraphExec exec, CUgraphNode node, const CUDA_MEMSET_NODE_PARAMS *p, CUcontext ctx), (exec, node, p, ctx))
GRAPH_CHANGE_HOOK(cuGraphExecNodeSetParams, (CUgraphExec exec, CUgraphNode node, CUgraphNodeParams *p), (exec, node, p))
GRAPH_CHANGE_HOOK(cuGraphNodeSetEnabled, (CUgraphExec exec, CUgraphNode node, unsigned int enabled), (exec, node, enabled))

/* As without the shim, after the held launches and owed joins (bypass, LITHOS_ROUTE_MEMORY_OPS=0). */
static CUresult pass_through(const launch_request *q) {
    pay_owed();
    return call_real(q, q->stream);
}

/* Memsets and device-to-device copies (hooks, held ones, unrolled graph nodes): held behind held
 * launches, else through the launch path onto the client's own TPCs. They move no activity word. */
static CUresult send_memory_op(launch_request *q) {
    ensure_init();
    q->activity_published = 1;
    if (g.mode == MODE_CONFINED && hold_memory_op(q)) return CUDA_SUCCESS;
    if (g.mode == MODE_CONFINED && !g.route_memory_ops) {
        tls.launches[PATH_MEMORY_APP]++;
        return pass_through(q);
    }
    return route_launch(q);
}

static CUresult route_launch(launch_request *q) {
    PROF_BEGIN();
    ensure_init();
    if (g.mode != MODE_CONFINED) return call_real(q, q->stream);
    if (__atomic_load_n(&launch_bypass, __ATOMIC_RELAXED)) { /* benchmarks: created streams stay green (README) */
        CUresult r = pass_through(q);
        PROF_MARK(PROF_BYPASS_REAL);
        return r;
    }
    CUstream app_stream = q->stream;
    if (q->per_thread && (app_stream == NULL)) app_stream = CU_STREAM_PER_THREAD;
    uint64_t now_ns = monotonic_ns(); /* CLOCK_MONOTONIC through the vDSO: no syscall */
    PROF_MARK(PROF_CLOCK);
    uint64_t generation = 0;
    CUcontext ctx = NULL;
    allowance_route *route = current_route(&generation, &ctx);
    PROF_MARK(PROF_ROUTE);
    if (q->api == LITHOS_API_GRAPH_LAUNCH) {
        unrolled_graph *unrolled = graph_to_unroll(q, route, app_stream);
        if (unrolled) {
            CUresult r = replay_unrolled(unrolled, q);
            release_graph(unrolled);
            return r;
        }
        drain_held_launches(0);
        return launch_graph(q, route, generation, ctx, app_stream, now_ns);
    }
    static const func_info no_function; /* memory ops: nothing to look up, never refused */
    int memory_op = is_memory_op(q);
    func_info scratch;
    const func_info *info = memory_op ? &no_function : lookup_func(q->function, &scratch);
    unsigned cluster[3];
    cluster_of(q, info, cluster);
    lithos_kernel_key key = {(uint64_t)(uintptr_t)q->function, (uint64_t)q->grid[0] * q->grid[1] * q->grid[2],
                             (uint64_t)q->block[0] * q->block[1] * q->block[2]};
    uint32_t ctas = cluster[0] * cluster[1] * cluster[2], verdict = __atomic_load_n(&info->refused, __ATOMIC_RELAXED);
    int refused = q->retry ? q->retry : __builtin_expect(verdict != 0, 0) ? retry_of(verdict, ctas) : RETRY_NONE;
    int view = ctas > 2 || refused == RETRY_COSCHED ? LITHOS_VIEW_COSCHED : LITHOS_VIEW_TPC;
    if (route && hold_launch(q, route, info, &scratch, view, refused, ctx, app_stream, &key)) return CUDA_SUCCESS;
    if (drain_held_launches(0)) count_dispatch(DISPATCH_DRAIN_BY_HOOK, 1);
    if (!route) return launch_unconfined(q, info, cluster, generation, &key, now_ns);
    lend_choice lend = {.route = route};
    if (route->whole_gpu) { /* as without the shim; a green stream of an earlier allowance goes to the unconfined pair */
        CUcontext stream_ctx = NULL;
        if (special_stream(app_stream) || (drv_cuStreamGetCtx(app_stream, &stream_ctx) == CUDA_SUCCESS && stream_ctx == ctx)) {
            PROF_MARK(PROF_LOOKUP);
            return launch_whole_gpu(q, info, cluster, view, route->views[view].tpcs, generation, now_ns);
        }
    }
    stream_queue *queue = NULL;
    if (refused == RETRY_WHOLE_GPU || !route->views[view].green) {
        /* Unconfined: on the app stream when it is the context's own; a created stream may be a green
         * stream (of the TPC view), where e.g. a cluster kernel would fail and poison the context, so
         * it goes through the unconfined pair (an ordinary helper stream, ordered by events). */
        if (special_stream(app_stream)) return launch_unconfined(q, info, cluster, generation, &key, now_ns);
        view = LITHOS_VIEW_UNCONFINED;
        lend.predicted_ns = predict_ns(&key, g.table->tpcs_on_gpu[0]);
    } else if (!memory_op) { /* memory ops: own TPCs, not predicted or queued */
        queue = queue_of(ctx, app_stream);
        uint64_t before_ns = now_ns, own_ns = predict_ns(&key, route->views[view].tpcs);
        choose_lending(&lend, route, view, own_ns, key.grid_blocks, &now_ns, queue, ctx, app_stream);
        if (now_ns != before_ns && allowance_changed(generation)) return route_launch(q); /* it slept: route again */
        lend.predicted_ns = lend.route == route ? own_ns : predict_ns(&key, lend.route->views[view].tpcs);
    }
    publish_activity(q, now_ns, lend.predicted_ns);
    route = lend.route;
    /* Entry for (app stream, view, route, priority): thread cache, then the locked list. A one-view
     * route's cluster kernels share the TPC view's entry (one green context), so runs go on. */
    int pair_view = view == LITHOS_VIEW_COSCHED && route->one_view ? (int)LITHOS_VIEW_TPC : view;
    unsigned h = (unsigned)(((uintptr_t)app_stream >> 3) * 2 + (unsigned)pair_view + ((uintptr_t)route >> 4) * 3 +
                            (unsigned)lend.low_priority) % TLS_PAIRS;
    stream_pair *p = tls.pairs[h];
    if (!p || !pair_matches(p, ctx, app_stream, p->thread, route, pair_view, lend.low_priority)) {
        pthread_mutex_lock(&g.lock);
        p = find_or_build_pair(ctx, app_stream, route, pair_view, lend.low_priority);
        pthread_mutex_unlock(&g.lock);
        if (!p) return launch_unconfined(q, info, cluster, generation, &key, now_ns);
        tls.pairs[h] = p;
    }
    /* Paired: everything before on the app stream, then the kernel, then everything after.
     * Owned: the app stream is the green stream, so the driver keeps the order by itself.
     * Deferred (paired, LITHOS_DEFER_JOIN on): the first launch of a run orders the green stream
     * after the app stream; the join back is owed ("Deferred joins" at the top). join_lock is held
     * from the decision to the end of this launch; every other launch pays the owed joins first. */
    int paired = !p->owned, deferred = 0, continued = 0, handed_off = 0;
    if (paired && defer_on()) {
        join_enter();
        continued = p->pending && p->pending_owner == (const void *)&tls;
        if (!continued) {
            /* The only owed run is this thread's on the same app stream (e.g. own TPCs, now lent
             * ones): nothing was enqueued on the app stream since it started, so the new green
             * stream waits for the old one's last kernel and takes over the owed join (2 event calls
             * instead of a join and a run start, 4). */
            stream_pair *previous = pending_count == 1 ? owed_run(ctx, app_stream) : NULL;
            if (pending_count && !previous) flush_joins_locked();
            /* A capturing stream is paired eagerly: the graph must get both dependencies as nodes. */
            CUstreamCaptureStatus capture = CU_STREAM_CAPTURE_STATUS_ACTIVE;
            deferred = defer_on() && pending_count < PENDING_MAX &&
                       drv_cuStreamIsCapturing(app_stream, &capture) == CUDA_SUCCESS &&
                       capture == CU_STREAM_CAPTURE_STATUS_NONE;
            if (previous && deferred && drv_cuEventRecord(previous->green_done, previous->green_stream) == CUDA_SUCCESS &&
                drv_cuStreamWaitEvent(p->green_stream, previous->green_done, 0) == CUDA_SUCCESS) {
                /* swapped in place: lithos_pending_joins never reads 0 while the old run is unjoined */
                previous->pending = 0;
                pending_pairs[0] = p;
                p->pending = 1;
                p->pending_owner = &tls;
                handed_off = 1;
                tls.joins[JOIN_HANDOFFS]++;
            } else if (previous) {
                flush_joins_locked();
            }
        } else {
            deferred = 1;
        }
        if (!deferred) {
            join_leave();
        }
    } else {
        flush_if_pending();
    }
    if (paired && !continued && !handed_off &&
        (drv_cuEventRecord(p->app_done, app_stream) != CUDA_SUCCESS ||
         drv_cuStreamWaitEvent(p->green_stream, p->app_done, 0) != CUDA_SUCCESS)) {
        if (deferred) {
            join_leave();
        }
        notice_once(WARN_RETRY, "cannot order the app stream before a green stream: this launch passes through");
        return launch_unconfined(q, info, cluster, generation, &key, now_ns);
    }
    tls.launches[!memory_op ? (paired ? PATH_PAIRED : PATH_DIRECT) : view == LITHOS_VIEW_UNCONFINED ? PATH_MEMORY_APP : PATH_MEMORY_GREEN]++;
    if (continued) {
        if (!memory_op) tls.launches[PATH_CONTINUED]++;
    } else if (deferred && !handed_off) {
        tls.joins[JOIN_RUNS]++;
    }
    if (deferred) {
        /* Owed from before the launch and join_lock released across it: a launch can block (full
         * queue, lazy loading) on work that another thread's driver call must first let go. A
         * flush that lands meanwhile is not ordered with this launch on the host (README: limits);
         * the launch owes its join again below. */
        owe_join(p, app_stream);
        join_leave();
    }
    int pair = !memory_op && sample_due(lend.predicted_ns) ? timing_begin(&p->timing, p->green_stream) : -1;
    CUresult r = call_real(q, p->green_stream);
    if (deferred) {
        join_enter();
    }
    if (r != CUDA_SUCCESS && view != LITHOS_VIEW_UNCONFINED) {
        /* A cluster shape the TPC view refuses: this and every later launch of the kernel go to the
         * co-scheduled view (whole 8-SM groups of the allowance; unconfined where it holds none).
         * A refusal in the co-scheduled view (e.g. a 4x4 cluster: 16 CTAs cannot fit an 8-SM group):
         * this and later launches of the kernel with clusters at least as large run unconfined; any
         * other refusal (e.g. a cooperative grid too large for the allowance): every later launch of
         * it. Either way in stream order. */
        int to_cosched = !memory_op && r == CUDA_ERROR_INVALID_CLUSTER_SIZE && view == LITHOS_VIEW_TPC && !route->one_view;
        if (memory_op)
            notice_once(WARN_MEMORY_OP, "a %s failed on a green stream (CUresult %d): it is sent again on the program's "
                        "stream, unconfined (so is any later one that fails)",
                        q->api == API_COPY ? "device-to-device copy" : "memset", (int)r);
        else if (to_cosched)
            notice_once(WARN_RETRY_COSCHED, "kernel %s: the TPC view refused its cluster shape (CUresult %d): it runs in "
                        "the co-scheduled view from now on (unconfined where the allowance holds no whole group)", info->name, (int)r);
        else
            notice_once(WARN_RETRY, "kernel %s (grid %ux%ux%u, cluster %ux%ux%u, %s view of %u TPCs) failed in its green "
                        "context (CUresult %d): %s run unconfined from now on", info->name, q->grid[0], q->grid[1], q->grid[2],
                        cluster[0], cluster[1], cluster[2], view == LITHOS_VIEW_TPC ? "TPC" : "co-scheduled",
                        (unsigned)route->views[view].tpcs, (int)r,
                        r == CUDA_ERROR_INVALID_CLUSTER_SIZE ? "its launches with clusters this large or larger" : "all its launches");
        q->retry = to_cosched ? RETRY_COSCHED : RETRY_WHOLE_GPU;
        if (info != &scratch && !memory_op) { /* the cosched bit only set, the CTA bound only lowered */
            uint32_t from = r != CUDA_ERROR_INVALID_CLUSTER_SIZE || !ctas ? 1u : ctas < 0xffffffu ? ctas : 0xffffffu;
            uint32_t seen = __atomic_load_n(&info->refused, __ATOMIC_RELAXED), wanted;
            do {
                wanted = to_cosched ? seen | REFUSED_COSCHED
                         : (seen >> 8) && (seen >> 8) <= from ? seen
                                                              : (seen & 0xffu) | from << 8;
            } while (wanted != seen && !__atomic_compare_exchange_n(&((func_info *)info)->refused, &seen, wanted, 1,
                                                                     __ATOMIC_RELAXED, __ATOMIC_RELAXED));
        }
        if (paired && drv_cuEventRecord(p->green_done, p->green_stream) == CUDA_SUCCESS)
            drv_cuStreamWaitEvent(app_stream, p->green_done, 0); /* keeps a started timing pair (and a run) ordered */
        if (deferred) {
            drop_pending(p);
            join_leave();
        }
        return route_launch(q);
    }
    if (deferred && r == CUDA_SUCCESS) {
        owe_join(p, app_stream);
    } else if (paired) {
        if (drv_cuEventRecord(p->green_done, p->green_stream) == CUDA_SUCCESS) drv_cuStreamWaitEvent(app_stream, p->green_done, 0);
        if (deferred) drop_pending(p);
    }
    if (r == CUDA_SUCCESS) {
        if (queue) queue_after_launch(&queue->end_ns, now_ns, lend.predicted_ns);
        uint64_t ticket = record_launch(q, info, cluster, view, view == LITHOS_VIEW_UNCONFINED ? 0 : route->views[view].tpcs,
                                        generation, &lend, now_ns);
        timing_end(&p->timing, pair, p->green_stream, ticket);
    }
    if (deferred) {
        join_leave();
    }
    return r;
}

/* ---------------------------------------------------------------- the hooks */

#define LAUNCH_KERNEL_HOOK(name, api_kind, per_thread_stream)                                                          \
    EXPORT CUresult name(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,   \
                         unsigned shared_bytes, CUstream stream, void **params, void **extra) {                        \
        launch_request q = {.api = api_kind, .per_thread = per_thread_stream, .function = f, .grid = {gx, gy, gz},      \
                            .block = {bx, by, bz}, .shared_bytes = shared_bytes, .stream = stream, .params = params,   \
                            .extra = extra};                                                                           \
        return route_launch(&q);                                                                                       \
    }
LAUNCH_KERNEL_HOOK(cuLaunchKernel, LITHOS_API_LAUNCH_KERNEL, 0)
LAUNCH_KERNEL_HOOK(cuLaunchKernel_ptsz, LITHOS_API_LAUNCH_KERNEL, 1)

#define LAUNCH_COOPERATIVE_HOOK(name, per_thread_stream)                                                               \
    EXPORT CUresult name(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,   \
                         unsigned shared_bytes, CUstream stream, void **params) {                                      \
        launch_request q = {.api = LITHOS_API_LAUNCH_COOPERATIVE, .per_thread = per_thread_stream, .function = f,       \
                            .grid = {gx, gy, gz}, .block = {bx, by, bz}, .shared_bytes = shared_bytes, .stream = stream, \
                            .params = params};                                                                         \
        return route_launch(&q);                                                                                       \
    }
LAUNCH_COOPERATIVE_HOOK(cuLaunchCooperativeKernel, 0)
LAUNCH_COOPERATIVE_HOOK(cuLaunchCooperativeKernel_ptsz, 1)

#define LAUNCH_EX_HOOK(name, per_thread_stream)                                                                        \
    EXPORT CUresult name(const CUlaunchConfig *config, CUfunction f, void **params, void **extra) {                   \
        launch_request q = {.api = LITHOS_API_LAUNCH_KERNEL_EX, .per_thread = per_thread_stream, .function = f,         \
                            .params = params, .extra = extra, .config = config};                                       \
        if (config) {                                                                                                  \
            q.grid[0] = config->gridDimX, q.grid[1] = config->gridDimY, q.grid[2] = config->gridDimZ;                  \
            q.block[0] = config->blockDimX, q.block[1] = config->blockDimY, q.block[2] = config->blockDimZ;            \
            q.shared_bytes = config->sharedMemBytes, q.stream = config->hStream;                                       \
        }                                                                                                              \
        return route_launch(&q);                                                                                       \
    }
LAUNCH_EX_HOOK(cuLaunchKernelEx, 0)
LAUNCH_EX_HOOK(cuLaunchKernelEx_ptsz, 1)

#define GRAPH_LAUNCH_HOOK(name, per_thread_stream)                                                                     \
    EXPORT CUresult name(CUgraphExec graph, CUstream stream) {                                                        \
        launch_request q = {.api = LITHOS_API_GRAPH_LAUNCH, .per_thread = per_thread_stream, .stream = stream,          \
                            .graph = graph};                                                                           \
        return route_launch(&q);                                                                                       \
    }
GRAPH_LAUNCH_HOOK(cuGraphLaunch, 0)
GRAPH_LAUNCH_HOOK(cuGraphLaunch_ptsz, 1)

/* Memsets and device-to-device copies: send_memory_op. */
#define MEMSET_HOOK(name, width, value_type, per_thread_stream)                                                        \
    EXPORT CUresult name(CUdeviceptr dst, value_type value, size_t count, CUstream stream) {                          \
        ensure_init();                                                                                                 \
        if (!real_##name) return CUDA_ERROR_NOT_FOUND;                                                                 \
        launch_request q = {.api = API_MEMSET, .per_thread = per_thread_stream, .stream = stream, .mem_dst = dst,       \
                            .mem_value = value, .mem_width = width, .mem_count = count};                               \
        return send_memory_op(&q);                                                                                     \
    }
MEMSET_HOOK(cuMemsetD8Async, 1, unsigned char, 0)
MEMSET_HOOK(cuMemsetD8Async_ptsz, 1, unsigned char, 1)
MEMSET_HOOK(cuMemsetD16Async, 2, unsigned short, 0)
MEMSET_HOOK(cuMemsetD16Async_ptsz, 2, unsigned short, 1)
MEMSET_HOOK(cuMemsetD32Async, 4, unsigned int, 0)
MEMSET_HOOK(cuMemsetD32Async_ptsz, 4, unsigned int, 1)

#define COPY_HOOK(name, per_thread_stream)                                                                             \
    EXPORT CUresult name(CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream stream) {                           \
        ensure_init();                                                                                                 \
        if (!real_##name) return CUDA_ERROR_NOT_FOUND;                                                                 \
        launch_request q = {.api = API_COPY, .per_thread = per_thread_stream, .stream = stream, .mem_dst = dst,         \
                            .mem_src = src, .mem_count = bytes};                                                       \
        return send_memory_op(&q);                                                                                     \
    }
COPY_HOOK(cuMemcpyDtoDAsync_v2, 0)
COPY_HOOK(cuMemcpyDtoDAsync_v2_ptsz, 1)

/* Kernel attributes apply to later launches, held ones included: a set that changes a value first
 * sends every held launch; one that sets the value already in force changes nothing and holds
 * nothing up (PyTorch's attention kernels set their shared memory size before every launch). Only
 * attributes whose get returns what set stored are compared. Owed joins need no flush.
 * Called before a set (of `function`, else of `kernel` on `dev`): 1 when it may be skipped. */
static int attribute_set_changes_nothing(CUfunction_attribute attrib, int value, CUfunction function, CUkernel kernel, CUdevice dev) {
    if (!__atomic_load_n(&lithos_held_launches, __ATOMIC_ACQUIRE) || tls.is_dispatcher) return 0;
    int current = 0;
    if (attrib == CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES || attrib == CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT) {
        CUresult r = function ? (drv_cuFuncGetAttribute ? drv_cuFuncGetAttribute(&current, attrib, function) : CUDA_ERROR_NOT_FOUND)
                              : (drv_cuKernelGetAttribute ? drv_cuKernelGetAttribute(&current, attrib, kernel, dev) : CUDA_ERROR_NOT_FOUND);
        if (r == CUDA_SUCCESS && current == value) {
            count_dispatch(DISPATCH_SAME_ATTRIBUTE, 1);
            return 1;
        }
    }
    if (drain_held_launches(0)) count_dispatch(DISPATCH_DRAIN_BY_HOOK, 1);
    return 0;
}

EXPORT CUresult cuKernelSetAttribute(CUfunction_attribute attrib, int value, CUkernel kernel, CUdevice dev) {
    ensure_init();
    if (!real_cuKernelSetAttribute) return CUDA_ERROR_NOT_FOUND;
    if (attribute_set_changes_nothing(attrib, value, NULL, kernel, dev)) return CUDA_SUCCESS;
    return real_cuKernelSetAttribute(attrib, value, kernel, dev);
}

EXPORT CUresult cuFuncSetAttribute(CUfunction function, CUfunction_attribute attrib, int value) {
    ensure_init();
    if (!real_cuFuncSetAttribute) return CUDA_ERROR_NOT_FOUND;
    if (attribute_set_changes_nothing(attrib, value, function, NULL, 0)) return CUDA_SUCCESS;
    return real_cuFuncSetAttribute(function, attrib, value);
}

/* ---------------------------------------------------------------- streams */

/* A non-blocking stream created while an allowance is in force becomes a green stream of that
 * allowance's TPC view (green streams cannot be blocking, so blocking streams stay ordinary).
 * Returns 1 with *stream set, or 0: the caller creates an ordinary stream. */
static int create_green_stream(CUstream *stream, unsigned flags, int priority) {
    ensure_init();
    if (g.mode != MODE_CONFINED || !g.green_streams || !stream || flags != CU_STREAM_NON_BLOCKING) return 0;
    uint64_t generation;
    CUcontext ctx = NULL;
    allowance_route *route = current_route(&generation, &ctx);
    if (!route) return 0;
    pthread_mutex_lock(&g.lock);
    stream_pair *p = g.green_streams ? build_owned_stream(ctx, route, flags, priority) : NULL;
    pthread_mutex_unlock(&g.lock);
    if (p) *stream = p->green_stream;
    return p != NULL;
}

EXPORT CUresult cuStreamCreate(CUstream *stream, unsigned int flags) {
    if (create_green_stream(stream, flags, 0)) return CUDA_SUCCESS;
    return real_cuStreamCreate ? real_cuStreamCreate(stream, flags) : CUDA_ERROR_NOT_FOUND;
}

EXPORT CUresult cuStreamCreateWithPriority(CUstream *stream, unsigned int flags, int priority) {
    if (create_green_stream(stream, flags, priority)) return CUDA_SUCCESS;
    return real_cuStreamCreateWithPriority ? real_cuStreamCreateWithPriority(stream, flags, priority) : CUDA_ERROR_NOT_FOUND;
}

EXPORT CUresult cuStreamDestroy_v2(CUstream stream) {
    ensure_init();
    if (!real_cuStreamDestroy_v2) return CUDA_ERROR_NOT_FOUND;
    pay_owed(); /* the stream's own owed join, and the order of anything it syncs with */
    if (g.mode == MODE_CONFINED && !special_stream(stream)) {
        pthread_mutex_lock(&g.lock);
        retire_pairs(stream);
        pthread_mutex_unlock(&g.lock);
    }
    return real_cuStreamDestroy_v2(stream);
}

/* For benchmarks: while on, launches skip the shim's work and go to the driver as the program made
 * them (owed joins are paid first), so one process can time steps with and without it. */
EXPORT void lithos_client_set_bypass(int on) {
    ensure_init();
    __atomic_store_n(&launch_bypass, on ? 1 : 0, __ATOMIC_RELEASE);
    if (on) drain_held_launches(0);
    if (on) flush_joins(); /* after the flag: a launch that raced past it owes its join to a bypassed one */
}

/* For benchmarks: the real driver function behind one of the shim's hooks (e.g. "cuLaunchKernel",
 * by hook name), so one process can time launches with and without the shim's work; NULL if unknown. */
EXPORT void *lithos_client_real_hook(const char *name) {
    ensure_init();
    const hook_entry *e = name ? find_hook(name) : NULL;
    return e ? *e->real : NULL;
}

/* The first min(max_counts, n) of one of this thread's counters into out, plus the dispatcher
 * thread's (the launches it sent for this process); returns how many. */
static int copy_counts(uint64_t *out, int max_counts, const uint64_t *counts, const uint64_t *dispatcher, int n) {
    if (max_counts < n) n = max_counts;
    for (int i = 0; i < n; i++) out[i] = counts[i] + (dispatcher && dispatcher != counts ? __atomic_load_n(&dispatcher[i], __ATOMIC_RELAXED) : 0);
    return n;
}

/* For tests and tools: held launches of this process (LITHOS_DISPATCH; DISPATCH_* order: held, sent,
 * gated, gate microseconds, paced drains, drains at once, waits for room, failed, no layout, drains by
 * launches). Returns the number filled. */
EXPORT int lithos_client_dispatch_counts(uint64_t *counts, int max_counts) {
    uint64_t now[LITHOS_DISPATCH_COUNTS];
    for (int i = 0; i < LITHOS_DISPATCH_COUNTS; i++) now[i] = __atomic_load_n(&held.counts[i], __ATOMIC_RELAXED);
    return copy_counts(counts, max_counts, now, NULL, LITHOS_DISPATCH_COUNTS);
}

/* For tests and tools: unrolled graph replays of this process (GRAPH_* order: graphs copied, not
 * copied, replays unrolled, nodes they sent, replays whole while unrolling was on, copies dropped
 * by a change). Returns the number filled. */
EXPORT int lithos_client_graph_counts(uint64_t *counts, int max_counts) {
    uint64_t now[LITHOS_GRAPH_COUNTS];
    for (int i = 0; i < LITHOS_GRAPH_COUNTS; i++) now[i] = __atomic_load_n(&graphs.counts[i], __ATOMIC_RELAXED);
    return copy_counts(counts, max_counts, now, NULL, LITHOS_GRAPH_COUNTS);
}

/* For tests and tools: this thread's launches by path (direct on an owned green stream or, for a
 * whole-GPU allowance, on the app stream; paired with events; unconfined; continued runs).
 * Returns the number of paths filled. */
EXPORT int lithos_client_launch_counts(uint64_t *counts, int max_counts) {
    return copy_counts(counts, max_counts, tls.launches, held.launches, LITHOS_PATHS);
}

/* For tests and tools: this thread's deferred-join events (runs started, joins paid, joins made to
 * the legacy stream for another thread's per-thread stream). Returns the number filled. */
EXPORT int lithos_client_join_counts(uint64_t *counts, int max_counts) {
    return copy_counts(counts, max_counts, tls.joins, held.joins, LITHOS_JOIN_COUNTS);
}

/* For tests and tools: the driver-call stubs, pool first (in hand-out order), then the exported
 * ones. Returns the name (NULL past the end); *stub gets a pool stub's address (NULL for exported
 * ones: dlsym their name), *flushes how many calls through it paid owed joins or waited for held launches. */
EXPORT const char *lithos_client_stub(int index, void **stub, uint64_t *flushes) {
    pthread_mutex_lock(&stub_lock);
    unsigned used = stubs_used;
    pthread_mutex_unlock(&stub_lock);
    const lithos_stub_slot *slot = NULL;
    if (index >= 0 && (unsigned)index < used) {
        slot = &lithos_stub_slots[index];
        if (stub) *stub = lithos_stub_pool + (size_t)index * LITHOS_STUB_CODE_BYTES;
    } else if (index >= 0 && (unsigned)index - used < (unsigned)lithos_export_count) {
        slot = &lithos_export_slots[(unsigned)index - used];
        if (stub) *stub = NULL;
    }
    if (slot && flushes) *flushes = __atomic_load_n(&slot->flushes, __ATOMIC_RELAXED);
    return slot ? slot->name : NULL;
}

/* Cycles and passes per launch-path section (PROF_* order) of a LITHOS_PROFILE build; -1 in a normal one. */
EXPORT int lithos_client_profile(uint64_t *cycles, uint64_t *counts, int max_sections) {
#ifdef LITHOS_PROFILE
    int n = max_sections < PROF_SECTIONS ? max_sections : PROF_SECTIONS;
    for (int i = 0; i < n; i++) {
        cycles[i] = __atomic_load_n(&prof_cycles[i], __ATOMIC_RELAXED);
        counts[i] = __atomic_load_n(&prof_counts[i], __ATOMIC_RELAXED);
    }
    return n;
#else
    return -1;
#endif
}

#ifdef LITHOS_PROFILE
EXPORT uint64_t lithos_client_tsc(void) { return __rdtsc(); } /* to convert the profile's cycles to ns */
#endif

/* How often a launch asked the driver for a kernel's name and cluster (once per kernel when cached). */
EXPORT uint64_t lithos_client_func_queries(void) { return __atomic_load_n(&func_queries, __ATOMIC_RELAXED); }

/* For tests and tools: this thread's lending outcomes (the LEND_* counts, in order). Returns the
 * number filled. */
EXPORT int lithos_client_lending_counts(uint64_t *counts, int max_counts) {
    return copy_counts(counts, max_counts, tls.lending, held.lending, LITHOS_LEND_COUNTS);
}

/* For tests and tools: wait until the builder thread has built every queued union. Returns 0, or
 * -1 after timeout_ms. */
EXPORT int lithos_client_wait_union_builds(int timeout_ms) {
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) deadline.tv_sec++, deadline.tv_nsec -= 1000000000L;
    pthread_mutex_lock(&g.lock);
    int r = 0;
    while (builder.count > 0 && r == 0) r = pthread_cond_timedwait(&builder.done, &g.lock, &deadline);
    int pending = builder.count > 0;
    pthread_mutex_unlock(&g.lock);
    return pending ? -1 : 0;
}

/* For tests and tools: the names of every hook, in list order; NULL past the end. */
EXPORT const char *lithos_hook_name(int index) {
    return index >= 0 && (size_t)index < HOOK_COUNT ? hooks[index].name : NULL;
}
