import json, os, sys, time, subprocess
sys.path.insert(0, os.getcwd())
from lithos_ray import native
PROG = r'''
import json, time, torch, torchvision
from lithos_ray.native import thread_shim_counts
m = torchvision.models.resnet50().cuda().to(memory_format=torch.channels_last)
opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
x = torch.randn(32, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
y = torch.randint(0, 1000, (32,), device="cuda")
s = torch.cuda.Stream()
def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(m(x), y)
    loss.backward(); opt.step()
with torch.cuda.stream(s):
    for _ in range(5): step()
    s.synchronize()
    before = thread_shim_counts()
    t = time.perf_counter()
    for _ in range(20): step(); s.synchronize()
    dt = (time.perf_counter() - t) / 20
print(json.dumps({"ms_per_step": dt * 1e3, "before": before, "after": thread_shim_counts()}))
'''
table = native.AllowanceTable.create(native._default_gpu_uuid())
native.probe_layout_into(table)
table.set_allowance(0, list(range(22))); table.set_allowance(1, list(range(22, 66)))
table.set_lending(0, [1], low_priority=True)
for dispatch in ("0", "1"):
    env = {**os.environ, **native.client_env(table.path, 0), "LITHOS_DISPATCH": dispatch, "LITHOS_SAMPLE_EVERY": "8"}
    p = subprocess.run([sys.executable, "-c", PROG], env=env, capture_output=True, text=True, timeout=200)
    print("DISPATCH", dispatch, p.stdout[-3000:], p.stderr[-1500:])
table.close()
