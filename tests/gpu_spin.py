"""A full-occupancy spin kernel through cuda-bindings (no lithos code): ms per launch for a block count.

One wave on S SMs is 16 x S blocks of 128 threads. Used by the GPU tests inside lithos clients.
"""
import time

import numpy as np


def _check(result):
    err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


class Spinner:
    def __init__(self, cycles: int = 400_000):
        from cuda.bindings import driver as cu, nvrtc
        self.cu = cu
        _check(cu.cuInit(0))
        device = _check(cu.cuDeviceGet(0))
        _check(cu.cuCtxPushCurrent(_check(cu.cuDevicePrimaryCtxRetain(device))))
        self.stream = _check(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING))
        source = b'extern "C" __global__ void spin(long long c){ long long t0 = clock64(); while (clock64() - t0 < c) {} }'
        program = _check(nvrtc.nvrtcCreateProgram(source, b"spin.cu", 0, [], []))
        _check(nvrtc.nvrtcCompileProgram(program, 1, [b"--gpu-architecture=sm_90"]))
        cubin = b" " * _check(nvrtc.nvrtcGetCUBINSize(program))
        _check(nvrtc.nvrtcGetCUBIN(program, cubin))
        self.function = _check(cu.cuModuleGetFunction(_check(cu.cuModuleLoadData(cubin)), b"spin"))
        self.cycles = np.array([cycles], dtype=np.int64)
        self.params = np.array([self.cycles.ctypes.data], dtype=np.uint64)

    def ms_per_launch(self, blocks: int, seconds: float = 1.0) -> float:
        cu = self.cu
        launch = lambda: _check(cu.cuLaunchKernel(self.function, blocks, 1, 1, 128, 1, 1, 0, self.stream,
                                                  self.params.ctypes.data, 0))
        launch()
        _check(cu.cuStreamSynchronize(self.stream))
        launches, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(10):
                launch()
            _check(cu.cuStreamSynchronize(self.stream))
            launches += 10
        return (time.perf_counter() - t0) * 1000 / launches
