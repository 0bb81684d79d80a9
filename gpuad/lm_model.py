"""The model of ``python -m gpuad train-lm``: a small decoder-only transformer in torch
(token and position embeddings, pre-norm blocks of causal self-attention and a GELU MLP, a
final LayerNorm) whose output layer and loss is one module, the head: gpuad's fused
``LinearCrossEntropy``, or ``nn.Linear`` + ``F.cross_entropy`` to compare against.

Imports torch (and gpuad.torch for the gpuad head): ``import gpuad`` does not import this.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

HEADS = ("gpuad", "torch")


class TorchHead(nn.Module):
    """nn.Linear (with bias) + F.cross_entropy, with LinearCrossEntropy's interface:
    ``forward(x [..., D], targets [...])`` is the mean loss; ``logits(x)`` is [..., V]."""

    def __init__(self, in_features, num_classes):
        super().__init__()
        self.in_features, self.num_classes = in_features, num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        self.bias = nn.Parameter(torch.empty(num_classes))

    def logits(self, x):
        return F.linear(x, self.weight, self.bias)

    def forward(self, x, targets):
        return F.cross_entropy(self.logits(x).flatten(0, -2), targets.flatten())


def make_head(kind, d_model, vocab_size):
    """The head of `kind` ("gpuad" or "torch"): weight [vocab_size, d_model] and bias
    [vocab_size] (the bias learns the tokens' frequencies fast), set by init_parameters."""
    if kind == "gpuad":
        import gpuad.torch as gt

        return gt.LinearCrossEntropy(d_model, vocab_size, bias=True)
    if kind == "torch":
        return TorchHead(d_model, vocab_size)
    raise ValueError(f"head must be one of {HEADS}, got {kind!r}")


class Block(nn.Module):
    """x + attention(LN(x)), then x + MLP(LN(x)); x [B, T, D], causal, `heads` heads."""

    def __init__(self, d_model, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.fc, self.out = nn.Linear(d_model, 4 * d_model), nn.Linear(4 * d_model, d_model)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class LanguageModel(nn.Module):
    """Token ids [B, T] (T <= context) -> hidden states [B, T, D] (``hidden``); ``forward(ids,
    targets)`` is the head's mean cross-entropy of the next tokens `targets` [B, T]."""

    def __init__(self, head, vocab_size, d_model=128, layers=2, heads=4, context=64):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} must be a multiple of heads {heads}")
        self.context = context
        self.tok, self.pos = nn.Embedding(vocab_size, d_model), nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = head

    def hidden(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.ln(x)

    def forward(self, ids, targets):
        return self.head(self.hidden(ids), targets)


def init_parameters(model, seed):
    """Set every parameter from a torch.Generator seeded with `seed`, drawn on the CPU in
    float32 in the order of named_parameters (so the head's kind and the device do not change
    the values): weights N(0, 0.02²), the residual projections' N(0, 0.02² / 2L); biases 0,
    LayerNorm gains 1."""
    g = torch.Generator().manual_seed(seed)
    residual_std = 0.02 / math.sqrt(2 * len(model.blocks))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                std = residual_std if name.endswith(("proj.weight", "out.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)


@torch.no_grad()
def generate(model, prompt_ids, n_tokens, seed=0, temperature=0.8, top_k=50):
    """n_tokens ids sampled after `prompt_ids` (a non-empty list), each from the top_k most
    likely next tokens at `temperature`, by a torch.Generator seeded with `seed`."""
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = list(prompt_ids)
    for _ in range(n_tokens):
        x = torch.tensor([ids[-model.context:]], device=device)
        logits = model.head.logits(model.hidden(x)[0, -1]).float().cpu() / temperature
        top, which = logits.topk(min(top_k, logits.numel()))
        ids.append(int(which[torch.multinomial(torch.softmax(top, 0), 1, generator=g)]))
    return ids[len(prompt_ids):]
