"""Unchanged Ray code on a lithos cluster: each task or actor gets TPCs of one GPU.

    lithos-ray start --head --simulate H100:2     # or plain `--head` on a GPU node
    python examples/plain_ray.py
    lithos-ray stop
"""
import os

import ray

import lithos_ray


@ray.remote(resources={"lithos_tpc": 12}, num_cpus=0)
def where_am_i():
    grant = lithos_ray.current_grant()
    return f"task pid {os.getpid()}: {grant.tpcs} TPCs {list(grant.tpc_ids)} of {os.environ['CUDA_VISIBLE_DEVICES']}"


@lithos_ray.remote(tpc=24, priority="latency_critical", slo_ms=20, num_cpus=0)
class Service:
    def where(self):
        grant = lithos_ray.current_grant()
        return f"actor pid {os.getpid()}: {grant.tpcs} TPCs of {grant.gpu_uuid} (latency_critical, SLO 20 ms)"


if __name__ == "__main__":
    ray.init(address="auto")
    service = Service.remote()
    print(ray.get(service.where.remote()))
    for line in ray.get([where_am_i.remote() for _ in range(4)]):
        print(line)
