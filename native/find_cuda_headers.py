"""Print the include folder of a PyPI CUDA headers package (nvidia-cuda-runtime*), if installed."""
import importlib.util
import pathlib

for package in ("nvidia.cu13", "nvidia.cuda_runtime", "nvidia.cu12"):
    try:
        spec = importlib.util.find_spec(package)
    except ModuleNotFoundError:
        continue
    for root in spec.submodule_search_locations if spec else ():
        header = pathlib.Path(root) / "include" / "cuda.h"
        if header.is_file():
            print(header.parent)
            raise SystemExit(0)
raise SystemExit(1)
