"""An independent bf16 implementation of gpt-oss in PyTorch, op by op as OpenAI's reference
(gpt_oss/torch/model.py) computes it: every op on bf16 tensors, so torch rounds after each
one; softmaxes and the sigmoid evaluated in fp32 inside torch and rounded once; the sink
appended as an extra logit column. It reads the parameters of a gptoss_jax model and runs
one block at a time, so tests can compare block by block (docs/architecture.md 2.7)."""

from __future__ import annotations

import math

import numpy as np
import torch
from flax import nnx

from gptoss_jax import mxfp4
from gptoss_jax.config import GptOssConfig, yarn_correction_range


def tensor(array) -> torch.Tensor:
    array = np.asarray(array)
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.uint16).astype(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(array))


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """bf16 tensors come back as uint16 bit patterns (for bit-exact comparisons)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


class Reference:
    """The torch reference for one model's parameters (bf16 models only)."""

    def __init__(self, model):
        self.config: GptOssConfig = model.config
        self.params = {"/".join(map(str, path)): value.get_value()
                       for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param))}

    def p(self, name: str) -> torch.Tensor:
        return tensor(self.params[name])

    def experts(self, layer: int, which: str) -> torch.Tensor:
        """A layer's mlp1 or mlp2 weights dequantized to bf16 [experts, out, in], as the
        reference's loader does (value * 2^(scale - 127), exact)."""
        fp4, scales = self.params[f"blocks/{layer}/mlp/{which}_fp4"], self.params[f"blocks/{layer}/mlp/{which}_scales"]
        return tensor(np.asarray(mxfp4.dequantize(fp4, scales)))

    # ---------------------------------------------------------------------------- ops
    def rms_norm(self, x, scale):
        t = x.float()
        t = t * torch.rsqrt(torch.mean(t**2, dim=-1, keepdim=True) + self.config.rms_norm_eps)
        return (t * scale.float()).to(x.dtype)

    def rope(self, positions):
        c = self.config
        d_half = c.head_dim // 2
        freq = c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim)
        if c.rope_scaling_factor > 1.0:
            concentration = 0.1 * math.log(c.rope_scaling_factor) + 1.0
            low, high = yarn_correction_range(c)
            interpolation = 1.0 / (c.rope_scaling_factor * freq)
            extrapolation = 1.0 / freq
            ramp = (torch.arange(d_half, dtype=torch.float32) - low) / (high - low)
            mask = 1 - ramp.clamp(0, 1)
            inv_freq = interpolation * (1 - mask) + extrapolation * mask
        else:
            concentration, inv_freq = 1.0, 1.0 / freq
        freqs = torch.einsum("i,j->ij", positions.float(), inv_freq)
        return freqs.cos() * concentration, freqs.sin() * concentration

    @staticmethod
    def apply_rope(x, cos, sin):
        cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
        x1, x2 = torch.chunk(x, 2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    # -------------------------------------------------------------------------- blocks
    def attention_block(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x [tokens, embed] bf16 at positions 0..tokens-1 -> x + attention(x)."""
        c = self.config
        a = f"blocks/{layer}/attn/"
        n, kv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        t = self.rms_norm(x, self.p(a + "norm/scale"))
        wqkv = torch.cat([self.p(a + w).reshape(-1, c.hidden_size) for w in ("wq", "wk", "wv")])
        bqkv = torch.cat([self.p(a + b).reshape(-1) for b in ("bq", "bk", "bv")])
        qkv = torch.nn.functional.linear(t, wqkv, bqkv)
        q, k, v = qkv.split([n * hd, kv * hd, kv * hd], dim=-1)
        tokens = x.shape[0]
        cos, sin = self.rope(torch.arange(tokens))
        q = self.apply_rope(q.reshape(tokens, n, hd), cos, sin).reshape(tokens, kv, n // kv, hd)
        k = self.apply_rope(k.reshape(tokens, kv, hd), cos, sin)
        v = v.reshape(tokens, kv, hd)
        window = c.sliding_window if c.is_sliding(layer) else 0
        out = self.sdpa(q, k, v, self.p(a + "sinks"), 1 / math.sqrt(hd), window)
        wo = self.p(a + "wo").reshape(c.hidden_size, -1)
        return x + torch.nn.functional.linear(out, wo, self.p(a + "bo"))

    @staticmethod
    def sdpa(q, k, v, sinks, sm_scale: float, window: int):
        tokens, heads, q_mult, _ = q.shape
        k = k[:, :, None, :].expand(-1, -1, q_mult, -1)
        v = v[:, :, None, :].expand(-1, -1, q_mult, -1)
        s = sinks.reshape(heads, q_mult, 1, 1).expand(-1, -1, tokens, -1)
        mask = torch.triu(q.new_full((tokens, tokens), -float("inf")), diagonal=1)
        if window > 0:
            mask += torch.tril(mask.new_full((tokens, tokens), -float("inf")), diagonal=-window)
        qk = torch.einsum("qhmd,khmd->hmqk", q, k)
        qk *= sm_scale
        qk += mask[None, None, :, :]
        qk = torch.cat([qk, s], dim=-1)
        w = torch.softmax(qk, dim=-1)[..., :-1]
        return torch.einsum("hmqk,khmd->qhmd", w, v).reshape(tokens, -1)

    def moe_block(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x [tokens, embed] bf16 -> x + MoE(x)."""
        c = self.config
        m = f"blocks/{layer}/mlp/"
        t = self.rms_norm(x, self.p(m + "norm/scale"))
        g = torch.nn.functional.linear(t, self.p(m + "router_w"), self.p(m + "router_b"))
        top = torch.topk(g, k=c.experts_per_token, dim=-1, sorted=True)
        weights = torch.nn.functional.softmax(top.values, dim=1)
        index = top.indices
        t = torch.einsum("beck,bk->bec", self.experts(layer, "mlp1")[index], t) + self.p(m + "mlp1_bias")[index]
        t = self.swiglu(t)
        t = torch.einsum("beck,bek->bec", self.experts(layer, "mlp2")[index], t)
        t += self.p(m + "mlp2_bias")[index]
        return x + torch.einsum("bec,be->bc", t, weights)

    def swiglu(self, x):
        c = self.config
        x_glu, x_linear = x[..., ::2], x[..., 1::2]
        x_glu = x_glu.clamp(min=None, max=c.swiglu_limit)
        x_linear = x_linear.clamp(min=-c.swiglu_limit, max=c.swiglu_limit)
        return x_glu * torch.sigmoid(c.swiglu_alpha * x_glu) * (x_linear + 1)

    def embed(self, tokens) -> torch.Tensor:
        return self.p("embedding")[torch.as_tensor(np.asarray(tokens), dtype=torch.long)]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(self.rms_norm(x, self.p("norm/scale")), self.p("unembedding"))
