"""Build steps beyond plain Python: gRPC stubs from lithos_ray/proto/*.proto and native/liblithos.so.

Both are generated from source in the source tree (so editable installs see them too) and are
never committed.
"""
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def generate_grpc_stubs() -> None:
    from grpc_tools import protoc  # build requirement (pyproject.toml)

    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "lithos_ray" / "proto").glob("*.proto"))
    for proto in protos:
        args = ["protoc", f"-I{ROOT}", f"--python_out={ROOT}", f"--pyi_out={ROOT}", f"--grpc_python_out={ROOT}", proto]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")


def build_native() -> None:
    """Compile native/ with the machine's gcc; a failure is recorded, not fatal (CPU-only use)."""
    lib_dir = ROOT / "lithos_ray" / "_lib"
    lib_dir.mkdir(exist_ok=True)
    error_file = lib_dir / "BUILD_ERROR.txt"
    error_file.unlink(missing_ok=True)
    if not (ROOT / "native" / "Makefile").exists():
        return
    proc = subprocess.run(["make", "-C", str(ROOT / "native")], capture_output=True, text=True)
    if proc.returncode != 0:
        error_file.write_text(proc.stdout[-4000:] + proc.stderr[-4000:])
        print(f"WARNING: native/ did not build; see {error_file}", file=sys.stderr)
        return
    for so in (ROOT / "native" / "build").glob("*.so"):
        shutil.copy2(so, lib_dir / so.name)


class BuildWithNative(build_py):
    def run(self):
        generate_grpc_stubs()
        build_native()
        super().run()


setup(cmdclass={"build_py": BuildWithNative})
