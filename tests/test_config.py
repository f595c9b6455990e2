"""Input validation at the boundary: each bad input gets a message that says what is allowed."""
import pytest

from lithos_ray.api import ray_options
from lithos_ray.config import parse_simulate_spec, request_from_env, whole_tpcs
from lithos_ray.errors import LithosRequestError
from lithos_ray.scheduler.gpu_models import lookup_model


@pytest.mark.parametrize("value, needle", [(0, "at least 1"), (-3, "at least 1"), (1.5, "fractional"),
                                           (float("nan"), "whole number"), ("12", "whole number")])
def test_bad_tpc_counts_are_refused_with_the_rule(value, needle):
    with pytest.raises(LithosRequestError, match=needle):
        whole_tpcs(value)


def test_whole_float_counts_from_ray_are_accepted():
    assert whole_tpcs(12.0) == 12


@pytest.mark.parametrize("kwargs, needle", [
    (dict(tpc=0), "greater than or equal to 1"),
    (dict(tpc=-1), "greater than or equal to 1"),
    (dict(tpc=1.5), "whole number"),
    (dict(tpc=4, priority="urgent"), "latency_critical"),
    (dict(tpc=4, slo_ms=-5), "slo_ms"),
    (dict(tpc=4, resources={"lithos_tpc": 4}), "not also as resources"),
])
def test_remote_options_reject_bad_input(kwargs, needle):
    with pytest.raises(LithosRequestError, match=needle):
        ray_options(**kwargs)


def test_remote_options_carry_priority_and_slo_to_the_worker():
    opts = ray_options(12, priority="latency_critical", slo_ms=50, num_cpus=0, runtime_env={"env_vars": {"A": "1"}})
    assert opts["resources"] == {"lithos_tpc": 12}
    assert opts["num_cpus"] == 0
    assert opts["runtime_env"]["env_vars"] == {"A": "1", "LITHOS_PRIORITY": "latency_critical", "LITHOS_SLO_MS": "50.0"}
    request = request_from_env(12.0, opts["runtime_env"]["env_vars"])
    assert (request.tpcs, request.priority.value, request.slo_ms) == (12, "latency_critical", 50.0)


def test_bad_env_values_are_named():
    with pytest.raises(LithosRequestError, match="LITHOS_SLO_MS"):
        request_from_env(4, {"LITHOS_SLO_MS": "fast"})


@pytest.mark.parametrize("spec, needle", [("H100", "MODEL:COUNT"), ("H100:x", "MODEL:COUNT"), ("Z99:2", "unknown GPU model"),
                                          ("H100:0", "1..16"), ("", "MODEL:COUNT")])
def test_bad_simulate_specs(spec, needle):
    with pytest.raises(LithosRequestError, match=needle):
        parse_simulate_spec(spec)


def test_simulate_spec_and_model_table():
    models = parse_simulate_spec("H100:2, A100:1")
    assert [m.name for m in models] == ["H100", "H100", "A100"]
    assert [m.tpcs for m in models] == [66, 66, 54]
    assert lookup_model("NVIDIA H100 80GB HBM3").name == "H100"
    with pytest.raises(ValueError, match="known models"):
        lookup_model("V999")


def test_documented_status_schema_is_the_code_schema():
    import json
    from pathlib import Path

    from lithos_ray.status import ClusterStatus

    documented = json.loads((Path(__file__).parents[1] / "docs" / "STATUS_SCHEMA.json").read_text())
    assert documented == ClusterStatus.model_json_schema(), "regenerate: lithos-ray status --schema > docs/STATUS_SCHEMA.json"


def test_a_worker_with_an_slo_and_no_priority_is_latency_critical():
    """E.g. a Serve replica a placement plan put on a GPU (placement_ray sets LITHOS_SLO_MS)."""
    assert request_from_env(8, {"LITHOS_SLO_MS": "200", "LITHOS_GPU_INDEX": "0"}).priority.value == "latency_critical"
    assert request_from_env(8, {"LITHOS_SLO_MS": "200", "LITHOS_PRIORITY": "best_effort"}).priority.value == "best_effort"
    assert request_from_env(8, {}).priority.value == "best_effort"
