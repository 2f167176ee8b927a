"""Small models with the layer names of real LLM / VLA blocks, and outlier-heavy activations."""
import torch
from torch import nn


class Attention(nn.Module):
    def __init__(self, d, kv):
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.o_proj = nn.Linear(d, d, bias=True)


class Mlp(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.gate_proj = nn.Linear(d, h, bias=False)
        self.up_proj = nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=True)


class Block(nn.Module):
    def __init__(self, d=48, kv=16, h=80):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(d)
        self.self_attn = Attention(d, kv)
        self.mlp = Mlp(d, h)

    def forward(self, x):
        a = self.self_attn
        h = self.input_layernorm(x)
        q, k, v = a.q_proj(h), a.k_proj(h), a.v_proj(h)
        mix = (q[..., : k.shape[-1]] * k).sigmoid() * v
        x = x + a.o_proj(torch.cat([mix, q[..., k.shape[-1]:]], -1))
        m = self.mlp
        return x + m.down_proj(torch.nn.functional.silu(m.gate_proj(x)) * m.up_proj(x))


class TinyLM(nn.Module):
    def __init__(self, layers=2, d=48, kv=16, h=80, vocab=37):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Block(d, kv, h) for _ in range(layers)])
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def add_weight_outliers(model, scale=10.0):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                cols = torch.randperm(m.in_features)[: max(1, m.in_features // 16)]
                m.weight[:, cols] *= scale
    return model


def outlier_acts(tokens, width, channel_scale=50.0, token_scale=1000.0, batch=None):
    shape = (tokens, width) if batch is None else (batch, tokens, width)
    x = torch.randn(*shape)
    x[..., :3] *= channel_scale
    x[..., tokens // 2, :] *= token_scale if batch is not None else 1.0
    if batch is None:
        x[tokens // 2] *= token_scale
    return x
