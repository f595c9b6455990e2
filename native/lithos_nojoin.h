/*
 * lithos_nojoin.h - the one list of driver entry points that do NOT flush deferred joins.
 *
 * Background (lithos.c, "Deferred joins"): consecutive paired launches on one application stream
 * run on the pair's green stream without joining back to the application stream; the join (an
 * event recorded on the green stream, the application stream waits on it) is owed until something
 * could observe or depend on the application stream's order. Every driver entry point the shim
 * hands out (cuGetProcAddress, dlsym) or exports (direct-linked calls, build/lithos_exports.S) goes
 * through a stub that pays the owed joins first, EXCEPT the names below: each of them neither
 * enqueues work on a stream nor waits for work, so calling it with a join still owed cannot see a
 * difference. Anything not listed flushes (safe by default). When in doubt, leave a name out.
 *
 * Matching is on the base name: a trailing version (_v2, _v3) and per-thread-stream forms
 * (_ptds, _ptsz) are stripped first, so "cuMemGetInfo" also covers cuMemGetInfo_v2. X(name, 1)
 * matches every base name that starts with `name`; X(name, 0) matches exactly.
 * native/gen_stubs.py reads this file (the X("name", 0|1) entries) to leave these names out of the
 * exported stubs, so keep one entry per X(...) and the format as it is.
 */
#ifndef LITHOS_NOJOIN_H
#define LITHOS_NOJOIN_H

#define LITHOS_NO_FLUSH(X)                                                                              \
    /* contexts: which context is current, and its fixed properties; the flush itself names the   */  \
    /* application's context of each owed join, so switching contexts needs no flush              */  \
    X("cuCtxGet", 1)               /* cuCtxGetCurrent/Device/Flags/Id/Limit/ApiVersion/...: reads */ \
    X("cuCtxSetCurrent", 0)        /* binds a context to the thread; nothing enqueued          */  \
    X("cuCtxPushCurrent", 0)       /* same                                                     */  \
    X("cuCtxPopCurrent", 0)        /* same                                                     */  \
    /* devices and the driver: fixed properties                                                */  \
    X("cuDeviceGet", 1)            /* cuDeviceGet, GetCount/Name/Uuid/Attribute/...: reads      */  \
    X("cuDriverGetVersion", 0)                                                                      \
    X("cuGetErrorName", 0)                                                                          \
    X("cuGetErrorString", 0)                                                                        \
    /* functions, kernels, libraries, modules: metadata of loaded code                          */  \
    X("cuFuncGetAttribute", 0)                                                                      \
    X("cuFuncGetName", 0)                                                                           \
    X("cuFuncGetParamInfo", 0)                                                                      \
    X("cuKernelGet", 1)            /* cuKernelGetFunction/Attribute/Name/ParamInfo/Library      */  \
    X("cuLibraryGet", 1)           /* cuLibraryGetKernel/Module/Global/Managed/...              */  \
    X("cuModuleGet", 1)            /* cuModuleGetFunction/Global/LoadingMode/...                */  \
    X("cuOccupancy", 1)            /* occupancy calculators: arithmetic on function attributes */  \
    /* memory: queries and synchronous allocation (a new allocation has no earlier use to order */  \
    /* with; stream-ordered cuMemAllocAsync / cuMemAllocFromPoolAsync are NOT listed: they may   */  \
    /* make the stream wait on the freeing stream, which a green stream already running would miss) */ \
    X("cuPointerGetAttribute", 0)                                                                   \
    X("cuPointerGetAttributes", 0)                                                                  \
    X("cuMemGetAddressRange", 0)                                                                    \
    X("cuMemGetInfo", 0)                                                                            \
    X("cuMemAlloc", 0)                                                                              \
    X("cuMemAllocPitch", 0)                                                                         \
    X("cuMemAllocManaged", 0)                                                                       \
    X("cuMemAllocHost", 0)                                                                          \
    X("cuMemHostAlloc", 0)                                                                          \
    X("cuMemHostGetDevicePointer", 0)                                                               \
    /* streams: fixed properties and capture state (capture starts/ends flush: cuStreamBeginCapture */ \
    /* and cuStreamEndCapture are not listed)                                                    */  \
    X("cuStreamGetPriority", 0)                                                                     \
    X("cuStreamGetFlags", 0)                                                                        \
    X("cuStreamGetCtx", 0)                                                                          \
    X("cuStreamGetId", 0)                                                                           \
    X("cuStreamGetDevice", 0)                                                                       \
    X("cuStreamIsCapturing", 0)                                                                     \
    X("cuStreamGetCaptureInfo", 0)                                                                  \
    X("cuThreadExchangeStreamCaptureMode", 0) /* a per-thread mode word                        */  \
    /* events: an event is only ever recorded by cuEventRecord*, which flushes first, so it     */  \
    /* already covers every kernel the application launched before it                          */  \
    X("cuEventCreate", 0)                                                                           \
    X("cuEventDestroy", 0)                                                                          \
    X("cuEventElapsedTime", 0)                                                                      \
    X("cuEventQuery", 0)                                                                            \
    X("cuEventSynchronize", 0)                                                                      \
    /* host-side descriptors and properties (cuBLASLt, cuDNN, Triton build TMA descriptors per    */  \
    /* launch): computed on the host, nothing enqueued                                           */  \
    X("cuTensorMapEncode", 1)                                                                       \
    X("cuTensorMapReplaceAddress", 0)                                                               \
    X("cuStreamGetAttribute", 0)                                                                    \
    X("cuFuncIsLoaded", 0)                                                                          \
    X("cuFuncGetModule", 0)                                                                         \
    X("cuMemGetAllocationGranularity", 0)                                                           \
    X("cuDeviceTotalMem", 0)                                                                        \
    X("cuDeviceComputeCapability", 0)                                                               \
    X("cuDeviceCanAccessPeer", 0)                                                                   \
    X("cuDevicePrimaryCtxGetState", 0)

#endif
