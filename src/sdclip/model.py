"""The CLIP text transformer: one implementation for CLIP-L, OpenCLIP-H, OpenCLIP-bigG and B/32, B/16.

x = token_embedding[ids] + position_embedding; pre-LN blocks with causal attention; a final
LayerNorm; pooled output = the final-LN'd last layer at the first EOS; an optional projection.
Every tower Stable Diffusion uses differs only in the numbers of ``TextConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BadInput
from .families import ARCHITECTURES

ACTIVATIONS = ("quick_gelu", "gelu")
KeyValues = tuple[torch.Tensor, torch.Tensor]  # one block's attention keys and values [B, heads, L, head_dim]
POOLING = ("first_eos", "argmax")


@dataclass(frozen=True)
class TextConfig:
    """Architecture of one text tower; ``checkpoint`` infers it from tensor shapes."""

    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    vocab_size: int = 49408
    context_length: int = 77
    activation: str = "quick_gelu"
    projection_dim: int = 0  # 0: the tower has no text projection
    eos_id: int = 49407
    pad_id: int = 49407  # CLIP-L and B pad with EOS; OpenCLIP H and bigG with 0 ("!")
    # where the pooled output is read: the first EOS, or transformers' legacy argmax(ids), which
    # configs with eos_token_id == 2 (many SD repos) select and which differs once textual
    # inversion adds ids above EOS
    pooling: str = "first_eos"

    def __post_init__(self) -> None:
        for name in (
            "width",
            "layers",
            "heads",
            "mlp_width",
            "vocab_size",
            "context_length",
            "projection_dim",
            "eos_id",
            "pad_id",
        ):
            value = getattr(self, name)
            least = 0 if name in ("projection_dim", "eos_id", "pad_id") else 1
            if type(value) is not int or value < least:
                raise BadInput(f"{name} {value!r} is not {'a positive' if least else 'a non-negative'} whole number")
        if self.context_length < 2:
            raise BadInput(f"context length {self.context_length} leaves no room for BOS and EOS")
        for name in ("eos_id", "pad_id"):
            if getattr(self, name) >= self.vocab_size:
                raise BadInput(f"{name} {getattr(self, name)} is not a token of a {self.vocab_size}-token vocabulary")
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
            raise BadInput(f"unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        if not isinstance(self.pooling, str) or self.pooling not in POOLING:
            raise BadInput(f"unknown pooling {self.pooling!r}; choose one of {', '.join(POOLING)}")
        if self.width % self.heads:
            raise BadInput(f"width {self.width} is not divisible by {self.heads} heads")

    @property
    def architecture(self) -> str:
        """The common name of this tower."""
        known = ARCHITECTURES.get(self.width)
        if known is not None and self.layers in known.layers:
            return known.name
        return f"CLIP text tower (width {self.width}, {self.layers} layers)"


class Attention(nn.Module):
    """Multi-head self-attention with one fused q|k|v projection; causal for text, not for images."""

    def __init__(self, width: int, heads: int, causal: bool = True):
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(
        self,
        x: torch.Tensor,
        past: KeyValues | None = None,
        keep: list[KeyValues] | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``past``: keys/values of earlier positions (a shared prefix) that ``x`` follows; ``keep``
        collects this call's keys/values so that ``x`` can serve as such a prefix; ``mask`` [B, 1, n, n]
        (True = may attend) replaces the causal rule."""
        b, n, w = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        if keep is not None:
            keep.append((k, v))
        if mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif past is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:  # query i sits at position p + i: it sees the whole prefix and itself causally
            p = past[0].shape[2]
            k = torch.cat([past[0].expand(b, -1, -1, -1), k], dim=2)
            v = torch.cat([past[1].expand(b, -1, -1, -1), v], dim=2)
            mask = torch.ones(n, p + n, dtype=torch.bool, device=x.device).tril(p)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, n, w))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.fc = nn.Linear(width, hidden)
        self.proj = nn.Linear(hidden, width)
        self.quick = activation == "quick_gelu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h = h * torch.sigmoid(1.702 * h) if self.quick else F.gelu(h)  # exact erf gelu, not tanh
        return self.proj(h)


class Block(nn.Module):
    """Pre-LN residual block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

    ``config`` is a ``TextConfig`` or a ``VisionConfig``: both towers use the same block.
    """

    def __init__(self, config: TextConfig, causal: bool = True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width, eps=1e-5)
        self.attn = Attention(config.width, config.heads, causal)
        self.ln_2 = nn.LayerNorm(config.width, eps=1e-5)
        self.mlp = MLP(config.width, config.mlp_width, config.activation)

    def forward(
        self,
        x: torch.Tensor,
        past: KeyValues | None = None,
        keep: list[KeyValues] | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), past, keep, mask)
        return x + self.mlp(self.ln_2(x))


@dataclass
class TextOutput:
    """What one forward pass returns.

    ``hidden`` is the requested layer [B, L, C]; ``pooled`` [B, C] the final-LN'd last layer at the
    pooling position; ``pooled_projected`` [B, P] when the tower has a projection;
    ``hidden_states`` (on request) every layer before the final LN, index 0 = embeddings.
    """

    hidden: torch.Tensor | None
    pooled: torch.Tensor | None = None
    pooled_projected: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = field(default=None, repr=False)


@dataclass
class Prefix:
    """Keys/values and hidden states of a prompt prefix.  Attention is causal, so positions
    before p depend only on tokens before p: rows sharing a prefix can skip recomputing it."""

    ids: torch.Tensor  # [p]
    kv: list[KeyValues]  # per block, batch 1
    states: list[torch.Tensor]  # hidden states 0..layers at the prefix positions, [1, p, C]

    @property
    def length(self) -> int:
        return self.ids.numel()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.states, *(x for kv in self.kv for x in kv)))


class TextTransformer(nn.Module):
    """One CLIP text tower.  Frozen: its parameters never require grad."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        # an explicit weight skips nn.Embedding's random init (slow, and pointless before loading)
        self.token_embedding = nn.Embedding(
            config.vocab_size, config.width, _weight=torch.empty(config.vocab_size, config.width)
        )
        self.position_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.final_norm = nn.LayerNorm(config.width, eps=1e-5)
        self.projection = nn.Linear(config.width, config.projection_dim, bias=False) if config.projection_dim else None
        self.requires_grad_(False)

    def resolve_layer(self, layer: int) -> int:
        """A Python-style index into the hidden states (0 = embeddings, -1 = last layer) -> 0..layers."""
        n = self.config.layers + 1
        if not -n <= layer < n:
            raise BadInput(
                f"layer {layer} is out of range for a {self.config.layers}-layer model "
                f"(hidden states are indexed {-n}..{n - 1}; 0 = embeddings, -1 = last layer)"
            )
        return layer % n

    def forward(
        self,
        ids: torch.Tensor,
        *,
        layer: int = -1,
        final_norm: bool = True,
        pooled: bool = True,
        pooling: str | None = None,
        token_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        prefix: Prefix | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> TextOutput:
        """Encode [B, L] ids.

        ``layer`` picks the hidden state returned as ``hidden`` (Python-style index, 0 = embeddings);
        ``final_norm`` applies the final LayerNorm to it.  Blocks past ``layer`` run only when the
        pooled output or all hidden states are wanted.  ``token_embeds`` [B, L, C] replaces the
        token-embedding lookup (textual inversion injects its vectors there).  ``pooling`` is
        ``first_eos`` (the first EOS id) or ``argmax`` (transformers' legacy rule: the largest id);
        by default the tower's ``config.pooling``.
        ``prefix``: a ``Prefix`` every row starts with; only the positions after it are computed.
        ``attention_mask`` [B, L] (1 = attend, 0 = hide this position from every query; causal as ever):
        compel's down-weighting encodes prompts with fragments masked out.
        """
        if ids.dim() != 2:
            raise BadInput(f"ids must be [batch, length], got shape {tuple(ids.shape)}")
        length = ids.shape[1]
        if length > self.config.context_length:
            raise BadInput(f"{length} tokens exceed the model's context of {self.config.context_length}")
        pooling = pooling or self.config.pooling
        if pooling not in POOLING:
            raise BadInput(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLING)}")
        stop = self.resolve_layer(layer)
        p = 0 if prefix is None else prefix.length
        if prefix is not None and not torch.equal(ids[:, :p], prefix.ids.expand(len(ids), -1)):
            raise BadInput("the rows do not start with the given prefix")
        x = self.token_embedding(ids[:, p:]) if token_embeds is None else token_embeds[:, p:]
        x = x + self.position_embedding[p:length].to(x.dtype)

        def whole(i: int, x: torch.Tensor) -> torch.Tensor:  # layer i's states at every position
            return x if prefix is None else torch.cat([prefix.states[i].expand(len(x), -1, -1), x], dim=1)

        mask = None
        if attention_mask is not None:
            if prefix is not None:
                raise BadInput("attention_mask and prefix cannot be combined")
            causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
            mask = causal & attention_mask.to(device=ids.device, dtype=torch.bool)[:, None, None, :]
        states = [whole(0, x)] if output_hidden_states else None
        hidden = whole(0, x) if stop == 0 else None
        run = self.config.layers if (pooled or output_hidden_states) else stop
        for i in range(run):
            x = self.blocks[i](x, None if prefix is None else prefix.kv[i], mask=mask)
            if states is not None:
                states.append(whole(i + 1, x))
            if i + 1 == stop:
                hidden = whole(i + 1, x)
        assert hidden is not None
        out = TextOutput(
            self.final_norm(hidden) if final_norm else hidden,
            hidden_states=tuple(states) if states is not None else None,
        )
        if pooled:
            where = ids.argmax(-1) if pooling == "argmax" else (ids == self.config.eos_id).int().argmax(-1)
            last = whole(self.config.layers, x)
            out.pooled = self.final_norm(last[torch.arange(last.shape[0], device=last.device), where])
            if self.projection is not None:
                out.pooled_projected = self.projection(out.pooled)
        return out

    def compute_prefix(self, ids: torch.Tensor, token_embeds: torch.Tensor | None = None) -> Prefix:
        """Run a prompt prefix (1-d ids) once, keeping what rows that start with it need."""
        p = ids.numel()
        x = self.token_embedding(ids[None]) if token_embeds is None else token_embeds[None, :p]
        x = x + self.position_embedding[:p].to(x.dtype)
        kv: list[KeyValues] = []
        states = [x]
        for block in self.blocks:
            x = block(x, keep=kv)
            states.append(x)
        return Prefix(ids.clone(), kv, states)

    def init_weights(self, generator: torch.Generator | None = None) -> TextTransformer:
        """Random weights in CLIP's initialisation scheme (for tests and training from scratch)."""
        w, layers = self.config.width, self.config.layers
        attn_std = w**-0.5
        proj_std = attn_std * (2 * layers) ** -0.5
        with torch.no_grad():
            nn.init.normal_(self.token_embedding.weight, std=0.02, generator=generator)
            nn.init.normal_(self.position_embedding, std=0.01, generator=generator)
            for block in self.blocks:
                for ln in (block.ln_1, block.ln_2):
                    ln.weight.fill_(1.0), ln.bias.zero_()
                nn.init.normal_(block.attn.qkv.weight, std=attn_std, generator=generator)
                nn.init.normal_(block.attn.out.weight, std=proj_std, generator=generator)
                nn.init.normal_(block.mlp.fc.weight, std=(2 * w) ** -0.5, generator=generator)
                nn.init.normal_(block.mlp.proj.weight, std=proj_std, generator=generator)
                for lin in (block.attn.qkv, block.attn.out, block.mlp.fc, block.mlp.proj):
                    lin.bias.zero_()
            self.final_norm.weight.fill_(1.0), self.final_norm.bias.zero_()
            if self.projection is not None:
                nn.init.normal_(self.projection.weight, std=attn_std, generator=generator)
        return self


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
