"""Co-location benchmark: latency-critical services next to best-effort training on one GPU,
under time-slicing, MPS, MPS with a thread percentage, static green partitions and lithos.

Pure parts (plan.py, metrics.py) import only numpy; worker.py and models.py need torch on the GPU machine;
driver.py starts the workers. Entry points: `python -m benchmarks.colocate` and
`lithos_ray.bench_colocate.configure_parser` / `run` (for `lithos-ray bench colocate`).
"""
