"""Teacher-forced scoring shared by the quantized-checkpoint tests: one in-process Worker (the served model code,
TP=1), random token sequences, and the agreement measures (top-1, mean KL) every format's bounds are stated in."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from shardserve.workers.device.base import TorchOps
from shardserve.workers.worker import Worker

SEQS = 3
SEQ_LEN = 64


def ids(vocab: int, seqs: int = SEQS, length: int = SEQ_LEN) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(seqs)]


def vocab(path: Path) -> int:
    return json.loads((Path(path) / "config.json").read_text())["vocab_size"]


def worker(path, device: str = "cpu", ops: TorchOps | None = None) -> Worker:
    w = Worker(str(path), device, "float32", None, 0, 1)
    if ops is not None:
        w.backend = dataclasses.replace(w.backend, ops=ops)
    w.init("127.0.0.1", 0, threads=2)
    w.init_cache(num_blocks=16, block_size=16)
    return w


def compare(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(ref || ours))."""
    top1 = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    lp_ref, lp = torch.log_softmax(ref.double(), -1), torch.log_softmax(ours.double(), -1)
    return top1, (lp_ref.exp() * (lp_ref - lp)).sum(-1).mean().item()


def scores(w: Worker, seqs: list[list[int]]) -> torch.Tensor:
    return torch.cat([w.score(s) for s in seqs])


class NpuRoundingOps(TorchOps):
    """The plain-torch table rounding where the NPU's quantized kernels round (they write bf16 for an fp32 model; the
    grouped kernel takes its per-channel scale in the output dtype), so that the npu path can be held to a tight
    bound: on a random model's near-tied logits, each layer's bf16 output flips top-1 and 4-bit activations
    amplify it (npu vs the fp32 reference: top-1 0.69 on W4A4)."""

    bits = 8  # of the last dynamic_quant: npu_quant_matmul writes int4 x int4 in float16 (npu.py)

    def dynamic_quant(self, x, bits=8):
        self.bits = bits
        return super().dynamic_quant(x, bits)

    def static_quant(self, x, input_scale, input_offset):
        self.bits = 8
        return super().static_quant(x, input_scale, input_offset)

    def quant_matmul(self, x_q, w, scale, pertoken_scale=None, bias=None, out_dtype=torch.bfloat16):
        kernel = torch.float16 if self.bits == 4 else torch.bfloat16
        return super().quant_matmul(x_q, w, scale, pertoken_scale, bias, kernel).to(out_dtype)

    def grouped_dynamic_quant_matmul(self, x, w, scale, group_counts, bits=8, group=0):
        if bits != 8 or group:
            return super().grouped_dynamic_quant_matmul(x, w, scale, group_counts, bits, group)
        y = super().grouped_dynamic_quant_matmul(x, w, scale.to(torch.bfloat16), group_counts, bits, group)
        return y.to(torch.bfloat16).to(x.dtype)

    def mx_quant_matmul(self, x, w, w_scale):
        return super().mx_quant_matmul(x, w, w_scale).to(torch.bfloat16).to(x.dtype)
