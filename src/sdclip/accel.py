"""Optional speed-ups that trade a stated amount of exactness or start-up time for speed.

* ``quantize_int8``: dynamic int8 quantization of the Linear layers (CPU, fbgemm): weights int8 per
  output channel, activations quantized per call, one row per call (``RowByRowTower``).  The first
  block stays float: it reads the raw token + position embeddings, whose range one activation scale
  per call fits worst (quantizing it too moves the mean per-token cosine to fp32 from 0.9993 to
  0.9985, for 5 % more speed).  About
  1.8x faster on an AVX2 CPU; the conditioning moves (bench/bench_model.py reports the cosine to
  fp32 and the max |Δ|), so it is never on by default.
* ``CudaGraphEncoder``: on a GPU a batch-1 forward is bound by kernel launches; replaying a
  captured CUDA graph for a fixed shape removes them.  Exact: the same kernels run.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .errors import BadInput
from .model import TextOutput, TextTransformer


def quantize_int8(tower: TextTransformer, float_blocks: int = 1) -> TextTransformer:
    """A copy of ``tower`` whose Linear layers run in int8 (CPU only), but those of the first
    ``float_blocks`` blocks (see above)."""
    if tower.token_embedding.weight.device.type != "cpu" or tower.token_embedding.weight.dtype != torch.float32:
        raise BadInput("int8 quantization runs on the CPU from float32 weights")
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch.ao announces its move to torchao; the API still works
        warnings.simplefilter("ignore")
        keep = tuple(f"blocks.{i}." for i in range(float_blocks))
        spec = {
            name: per_channel_dynamic_qconfig
            for name, m in tower.named_modules()
            if isinstance(m, nn.Linear) and not name.startswith(keep)
        }
        quantized = quantize_dynamic(tower, spec, inplace=False)
    quantized.__class__ = RowByRowTower  # the copy's own class: same modules, one row per pass
    return quantized.requires_grad_(False)


class RowByRowTower(TextTransformer):
    """A dynamically quantized tower run one row per forward pass.  Dynamic quantization takes one activation
    scale per call, over every row of the batch: batched, a row's output would depend on the rows beside it
    (by up to 0.2 on the ViT-L shape), breaking exact reuse's same-row-same-answer rule.  Alone, a row's output
    is a function of the row (every pass has the shape [1, length]), so reuse need not pad a lone prompt to a
    full micro-batch either (``rows_independent``)."""

    rows_independent = True

    def forward(self, ids: torch.Tensor, **options: object) -> TextOutput:
        if ids.dim() != 2 or len(ids) <= 1:
            return super().forward(ids, **options)
        rows = [
            super(RowByRowTower, self).forward(
                ids[i : i + 1], **{k: v[i : i + 1] if isinstance(v, torch.Tensor) else v for k, v in options.items()}
            )
            for i in range(len(ids))
        ]
        join = lambda name: None if getattr(rows[0], name) is None else torch.cat([getattr(r, name) for r in rows])
        states = rows[0].hidden_states
        return TextOutput(
            join("hidden"),
            join("pooled"),
            join("pooled_projected"),
            hidden_states=None if states is None else tuple(map(torch.cat, zip(*(r.hidden_states for r in rows)))),
        )


class CudaGraphEncoder:
    """One tower's forward pass captured for a fixed [batch, length] on a CUDA device."""

    def __init__(self, tower: TextTransformer, batch: int, length: int = 77, **forward: object):
        device = tower.token_embedding.weight.device
        if device.type != "cuda":
            raise BadInput("CUDA graphs need the model on a CUDA device")
        self.batch, self.length = batch, length
        self.ids = torch.full((batch, length), tower.config.eos_id, dtype=torch.long, device=device)
        run = lambda: tower(self.ids, **forward)  # type: ignore[arg-type]
        with torch.inference_mode():
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm up (kernel selection, workspaces) off the capture
                for _ in range(3):
                    run()
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out: TextOutput = run()

    def __call__(self, ids: torch.Tensor) -> TextOutput:
        """Outputs for ``ids`` [batch, length]; the tensors are reused by the next call."""
        if tuple(ids.shape) != (self.batch, self.length):
            raise BadInput(
                f"this graph was captured for ids of shape {[self.batch, self.length]}, got {list(ids.shape)}"
            )
        self.ids.copy_(ids)
        self.graph.replay()
        return self.out
