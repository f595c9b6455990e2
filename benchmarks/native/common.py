"""Metadata and output helpers shared by the native benchmarks."""
import datetime
import json
import os
import subprocess
import sys


def metadata(command: str) -> dict:
    gpu, driver = "unknown", "unknown"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        gpu, driver = [x.strip() for x in out.split(",")]
    except (OSError, IndexError, subprocess.SubprocessError):
        pass
    return {"command": command, "git_commit": os.environ.get("LITHOS_COMMIT", "unknown"), "gpu": gpu, "driver": driver,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": sys.version.split()[0]}


def last_json(stdout: str):
    """The JSON a worker printed last (its result line)."""
    return json.loads(stdout.strip().splitlines()[-1])


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=1)
    print(f"wrote {path}", flush=True)


def replot_beside(json_path: str, plot) -> None:
    """Redraws a result's plot from its JSON, as JSON_PATH with .png for .json."""
    with open(json_path) as handle:
        plot(json.load(handle), json_path[:-len(".json")] + ".png")
