"""python -m benchmarks.colocate [options]  (same as `lithos-ray bench colocate`; --help lists the options)."""
import sys

from lithos_ray.bench_colocate import main

sys.exit(main())
