"""Shared fixtures: a tiny reference model that runs on a CPU in milliseconds."""

import pytest
import torch
from torch import nn


class TinyNet(nn.Module):
    """Conv (grouped, strided, dilated, padded) -> conv -> linear; 4 quantizable layers."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.body = nn.Sequential(
            nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, groups=2), nn.ReLU()
        )
        self.proj = nn.Conv2d(8, 8, 1, bias=False)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = self.body(x)
        x = torch.relu(self.proj(x))
        return self.fc(x.flatten(1))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 1, 8, 8, generator=g)


def save_tiny_llama(folder, layers: int = 2, max_positions: int = 64):
    """A random 2-layer Llama (32 wide) with the byte tokenizer, saved as a local HF folder."""
    import torch
    import transformers

    from smpq.transformer.tiny_lm import ByteTokenizer

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size, hidden_size=32, intermediate_size=64,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=max_positions, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(folder))
    ByteTokenizer().save(folder)
    return folder


def bitops_ladder_space(n_units: int, levels: int, seed: int, frac: float):
    """Units with (weight, activation) ladders of bits 2/3/4/8, a BitOps-like product cost per
    unit, and one limit `frac` of the way from the cheapest to the richest policy."""
    import numpy as np

    from smpq.engine.space import PolicySpace

    rng = np.random.default_rng(seed)
    macs = rng.uniform(1, 4, n_units)
    b = np.array([2, 3, 4, 8])[:levels]
    costs = tuple(np.array([m * b[i] * b[j] for i in range(levels) for j in range(levels)])
                  for m in macs)
    lo, hi = sum(c.min() for c in costs), sum(c.max() for c in costs)
    return PolicySpace(tuple(f"l{u}" for u in range(n_units)), ((levels, levels),) * n_units,
                       {"bitops": costs}, {}, {"bitops": lo + frac * (hi - lo)}, ("w", "a"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: thread sync costs more than it saves, badly so on a busy 2-core machine.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
