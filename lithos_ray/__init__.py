"""lithos-ray: TPC-granular GPU sharing for Ray.

Kept light on purpose: nothing heavy is imported until used (GPU-side code runs without Ray).
"""
import os as _os

__version__ = "0.1.0"

# In a source checkout that was not installed (the GPU machine gets one), lithos_ray.scheduler and
# lithos_ray.placement are the top-level scheduler/ and placement/ folders, as pyproject maps them.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "pyproject.toml")) and \
        _os.path.isfile(_os.path.join(_checkout, "scheduler", "__init__.py")):
    __path__.append(_checkout)
__all__ = ["remote", "ray_options", "current_grant", "serve"]


def __getattr__(name):
    if name in ("remote", "ray_options"):
        from . import api
        return getattr(api, name)
    if name == "serve":
        import importlib
        return importlib.import_module(".serve", __name__)
    if name == "current_grant":
        from .client import current_grant
        return current_grant
    raise AttributeError(f"module 'lithos_ray' has no attribute {name!r}")
