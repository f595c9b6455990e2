"""Deterministic GPU workloads; prints a JSON of digests (sha256 of result bytes) and errors.

Run once plainly and once under liblithos.so; correctness.py compares the two.
"""
import hashlib
import json
import os
import sys

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
import torch  # noqa: E402


def digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes() if t.dtype == torch.bfloat16
                 else t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def deterministic(seed=0):
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def resnet50_step():
    import torchvision
    deterministic(1)
    model = torchvision.models.resnet50(num_classes=1000).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator(device="cpu").manual_seed(2)
    x = torch.randn(16, 3, 224, 224, generator=g).cuda()
    y = torch.randint(0, 1000, (16,), generator=g).cuda()
    for _ in range(2):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    return {"loss": float(loss), "digest": digest(loss, *[p for p in model.parameters()])}


def gpt2_step():
    from transformers import GPT2Config, GPT2LMHeadModel
    deterministic(3)
    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=512, n_head=8, vocab_size=8192)).cuda()
    model.config._attn_implementation = "eager"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator(device="cpu").manual_seed(4)
    ids = torch.randint(0, 8192, (4, 128), generator=g).cuda()
    for _ in range(2):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    return {"loss": float(loss), "digest": digest(loss, *[p for p in model.parameters()])}


def gemms():
    deterministic(5)
    out = {}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for n in (64, 256, 1024, 4096):
            a = torch.randn(n, n, device="cuda", dtype=dtype)
            b = torch.randn(n, n, device="cuda", dtype=dtype)
            out[f"{str(dtype).split('.')[-1]}_{n}"] = digest(a @ b)
    a = torch.randn(8, 2048, device="cuda", dtype=torch.half)
    w = torch.randn(1000, 2048, device="cuda", dtype=torch.half)
    out["fp16_classifier_8x2048x1000"] = digest(torch.nn.functional.linear(a, w))
    torch.cuda.synchronize()
    return out


def conv_sdpa():
    deterministic(6)
    x = torch.randn(8, 64, 56, 56, device="cuda", dtype=torch.half)
    w = torch.randn(64, 64, 3, 3, device="cuda", dtype=torch.half)
    q, k, v = (torch.randn(4, 12, 128, 64, device="cuda", dtype=torch.half) for _ in range(3))
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.FLASH_ATTENTION]):
        flash = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION]):
        efficient = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.cuda.synchronize()
    return {"conv_fp16": digest(torch.nn.functional.conv2d(x, w, padding=1)), "sdpa_flash": digest(flash),
            "sdpa_efficient": digest(efficient)}


def cuda_graph():
    deterministic(7)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024)).cuda().half()
    static_in = torch.randn(32, 1024, device="cuda", dtype=torch.half)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            model(static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = model(static_in)
    results = []
    for i in range(3):
        static_in.copy_(torch.full((32, 1024), 0.01 * (i + 1), device="cuda", dtype=torch.half))
        graph.replay()
        results.append(static_out.clone())
    torch.cuda.synchronize()
    eager = model(static_in)
    return {"graph_replays": digest(*results), "graph_equals_eager": bool(torch.equal(results[-1], eager))}


def multi_stream():
    deterministic(8)
    streams = [torch.cuda.Stream() for _ in range(4)]
    a = torch.randn(2048, 2048, device="cuda")
    outs = [None] * 4
    for i, s in enumerate(streams):
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            x = a * (i + 1)
            for _ in range(5):
                x = torch.tanh(x @ a) * 0.5
            outs[i] = x
    for s in streams:
        torch.cuda.current_stream().wait_stream(s)
    # an event recorded on a side stream must cover the moved kernels
    ev = torch.cuda.Event()
    with torch.cuda.stream(streams[0]):
        y = outs[0] + 1
        ev.record()
    ev.synchronize()
    host_copy = y.cpu()
    torch.cuda.synchronize()
    return {"streams": digest(*outs), "event_then_copy": digest(host_copy)}


def triton_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def add(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 2 + tl.load(y_ptr + offs, mask=mask), mask=mask)

    deterministic(9)
    x, y = torch.randn(1 << 20, device="cuda"), torch.randn(1 << 20, device="cuda")
    out = torch.empty_like(x)
    add[(triton.cdiv(x.numel(), 1024),)](x, y, out, x.numel(), BLOCK=1024)
    torch.cuda.synchronize()
    return {"add": digest(out), "matches_torch": bool(torch.equal(out, x * 2 + y))}


def main():
    results, errors = {}, {}
    for name, fn in [("gemms", gemms), ("conv_sdpa", conv_sdpa), ("multi_stream", multi_stream), ("triton", triton_kernel),
                     ("cuda_graph", cuda_graph), ("resnet50_train_step", resnet50_step), ("gpt2_train_step", gpt2_step)]:
        try:
            results[name] = fn()
        except Exception as exc:  # report every failure, keep going
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            try:
                torch.cuda.synchronize()
            except Exception as sync_exc:
                errors[name + "_sync"] = str(sync_exc).splitlines()[0][:200]
                break
    try:
        from lithos_ray.native import thread_shim_counts
        counts = thread_shim_counts()
    except ImportError:
        counts = None
    print(json.dumps({"results": results, "errors": errors, "shim_counts": counts}), flush=True)


if __name__ == "__main__":
    main()
