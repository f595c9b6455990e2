"""lithos-ray: TPC-granular GPU sharing for Ray.

Kept light on purpose: nothing heavy is imported until used (GPU-side code runs without Ray).
"""
__version__ = "0.1.0"
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
