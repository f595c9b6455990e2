"""End-to-end step times: ResNet-50 training step and BERT-base inference (random weights).

usage: e2e_worker.py -> prints JSON {"resnet50_train_ms": [...], "bert_base_infer_ms": [...],
                                     "resnet50_train_side_stream_ms": [...], "bert_base_infer_side_stream_ms": [...]}
The *_side_stream runs do the same work inside `with torch.cuda.stream(torch.cuda.Stream())`: a
stream the program creates, which liblithos.so makes a green stream (no events per launch); the
plain runs use PyTorch's default stream (the legacy stream 0, which the shim must pair with events).
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


def on_side_stream(make):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        return make()


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
    return timed(step, 5, 20)


def bert_base():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    model = BertModel(BertConfig()).cuda().half().eval()
    ids = torch.randint(0, 30522, (8, 128), device="cuda")

    @torch.inference_mode()
    def step():
        model(input_ids=ids)
    return timed(step, 10, 60)


print(json.dumps({"resnet50_train_ms": resnet50(), "bert_base_infer_ms": bert_base(),
                  "resnet50_train_side_stream_ms": on_side_stream(resnet50),
                  "bert_base_infer_side_stream_ms": on_side_stream(bert_base)}), flush=True)
