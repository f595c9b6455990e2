"""Put on PYTHONPATH of the raylets of a lithos node (lithos_ray.node.worker_env): installs the lithos
worker hook in Ray worker processes, then hands over to any other sitecustomize on sys.path."""
import os
import sys


def _install_lithos_hook():
    argv0 = sys.argv[0] if getattr(sys, "argv", None) else ""
    if os.environ.get("LITHOS_RAY_WORKER_HOOK") == "1" and argv0.endswith("default_worker.py"):
        from lithos_ray import worker_hook
        worker_hook.install()


def _chain_next_sitecustomize():
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec and spec.loader and spec.origin != os.path.abspath(__file__):
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


_install_lithos_hook()
_chain_next_sitecustomize()
