"""The co-location benchmark's models, built from their configs with random weights (nothing
downloaded): inference services and training loops. Imported by its workers and by the native
benchmarks (e2e_worker.py, borrow_training.py, graph_nodes_probe.py), so all time the same models."""
from __future__ import annotations

import torch


def build_service(name: str, batch: int, seq_len: int):
    """(forward callable, description) of an inference service in fp16, eval mode, random weights."""
    if name == "resnet50":
        import torchvision
        model = torchvision.models.resnet50().cuda().half().eval().to(memory_format=torch.channels_last)
        x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.half).to(memory_format=torch.channels_last)
        return (lambda: model(x)), f"torchvision resnet50, fp16, batch {batch}, 224x224"
    if name == "bert_base":
        from transformers import BertConfig, BertModel
        model = BertModel(BertConfig()).cuda().half().eval()
        ids = torch.randint(0, BertConfig().vocab_size, (batch, seq_len), device="cuda")
        # Embeddings + encoder without an attention mask: no host sync inside, so it can be captured.
        return (lambda: model.encoder(model.embeddings(input_ids=ids))[0]), \
            f"transformers BertModel(BertConfig()) encoder, fp16, batch {batch}, seq {seq_len}"
    raise ValueError(f"unknown service {name!r}")


def bf16_step(optimizer, loss_of_batch):
    """One training step: forward under bf16 autocast, backward, optimizer step."""
    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_of_batch()
        loss.backward()
        optimizer.step()
    return step


def build_training(name: str, batch: int, seq_len: int):
    """(step callable, description) of a training loop in bf16 autocast, random weights and data."""
    if name == "resnet50_train":
        import torchvision
        model = torchvision.models.resnet50().cuda().to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (batch,), device="cuda")
        return bf16_step(opt, lambda: torch.nn.functional.cross_entropy(model(x), y)), \
            f"torchvision resnet50 training, SGD, bf16 autocast, batch {batch}"
    if name == "gpt2_small_train":
        from transformers import GPT2Config, GPT2LMHeadModel
        config = GPT2Config()
        model = GPT2LMHeadModel(config).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(0, config.vocab_size, (batch, seq_len), device="cuda")
        return bf16_step(opt, lambda: model(input_ids=ids, labels=ids).loss), f"transformers GPT2LMHeadModel(GPT2Config()) training, AdamW, bf16 autocast, batch {batch}, seq {seq_len}"
    raise ValueError(f"unknown training workload {name!r}")
