"""End-to-end step times: ResNet-50 training step and BERT-base inference (random weights).

usage: e2e_worker.py -> prints JSON {"resnet50_train_ms": [...], "bert_base_infer_ms": [...]}
"""
import json
import time

import torch


def timed(fn, warmup, steps):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def resnet50():
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet50().cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(64, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (64,), device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return timed(step, 10, 30)


def bert_base():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    model = BertModel(BertConfig()).cuda().half().eval()
    ids = torch.randint(0, 30522, (8, 128), device="cuda")

    @torch.inference_mode()
    def step():
        model(input_ids=ids)
    return timed(step, 20, 100)


print(json.dumps({"resnet50_train_ms": resnet50(), "bert_base_infer_ms": bert_base()}), flush=True)
