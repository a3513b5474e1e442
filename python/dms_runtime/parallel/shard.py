"""Which part of each weight a rank holds, and loading only that part.

Rank ``r`` of ``N`` owns KV heads ``[r * Hkv/N, (r + 1) * Hkv/N)`` and their query groups
(query heads ``[r * Hq/N, (r + 1) * Hq/N)``, contiguous because group ``g`` is query heads
``[g * G, (g + 1) * G)``):

| weight                               | shape (full)      | rank r holds                       |
| ------------------------------------ | ----------------- | ---------------------------------- |
| q_proj.weight / .bias                | [Hq*D, H] / [Hq*D]  | rows of its query heads (column-parallel) |
| k_proj, v_proj .weight / .bias       | [Hkv*D, H]        | rows of its KV heads               |
| o_proj.weight                        | [H, Hq*D]         | columns of its query heads (row-parallel, one all-reduce) |
| o_proj.bias                          | [H]               | all, added once after the all-reduce |
| gate_proj, up_proj .weight / .bias   | [I, H]            | rows ``[r*I/N, (r+1)*I/N)``        |
| down_proj.weight                     | [H, I]            | the same columns (row-parallel, one all-reduce) |
| down_proj.bias                       | [H]               | all, added once after the all-reduce |
| dms_proj_alpha.weight / .bias        | [Hkv, H]          | rows of its KV heads (the adapter's logits of its heads) |
| <proj>.dms_lora_a (LoRA, [r, in])    |                   | as the weight's columns: o/down's slice, all of it for the others |
| <proj>.dms_lora_b (LoRA, [out, r])   |                   | as the weight's rows: q/k/v/gate/up's slice, all of it for o/down |
| q_norm, k_norm, dms_proj_alpha_norm, layer norms, embed_tokens, lm_head | | all (replicated) |

The model a rank builds is an ordinary :class:`DecoderLM` of the *local* config (``Hq/N``,
``Hkv/N``, ``I/N``), so its attention, DMS logits and paged cache need no change: the borrowed
channel of a KV head lives in the first query head of its group, which the same rank owns. Only
``o_proj`` and ``down_proj`` become :class:`RowParallelLinear` (same parameter names).

A LoRA retrofit's update ``B A`` splits with its weight: a rank's slice of ``B A`` is its rows of
``B`` times ``A`` (column-parallel) or ``B`` times its columns of ``A`` (row-parallel), so each rank
can merge its own slice; a row-parallel update's partial sums join the weight's in the one all-reduce.

Embedding and LM head are replicated: for the vocabularies of the supported models (49K-152K)
that costs ``V * H`` per rank but no communication, whereas a vocabulary-parallel head needs an
all-gather of the logits every step so that rank 0 can sample once from the full distribution.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..models.decoder import DecoderLM
from ..models.loading import _materialise_rest, open_safetensors, read_config, read_state, resolve_dms, weight_files
from ..models.lora import LoRALinear, refuse_merged
from ..models.registry import model_config_from_hf
from .group import TPGroup


@dataclasses.dataclass(slots=True)
class TPShard:
    """What a sharded model knows about its place: the group and the unsplit config."""

    tp: TPGroup
    full_config: ModelConfig
    driver: object = None  # the cache stand-in of the engine rank 0 drives now (one at a time)

    @property
    def rank(self) -> int:
        return self.tp.rank

    @property
    def size(self) -> int:
        return self.tp.size


def check_divisible(cfg: ModelConfig, n: int, where: str = "model") -> None:
    """A config tensor parallelism of ``n`` can split, or a ValueError naming the numbers."""
    problems = []
    if cfg.num_kv_heads % n:
        problems.append(f"num_key_value_heads={cfg.num_kv_heads} is not divisible by {n}")
    if cfg.num_heads % n:
        problems.append(f"num_attention_heads={cfg.num_heads} is not divisible by {n}")
    if cfg.intermediate_size % n:
        problems.append(f"intermediate_size={cfg.intermediate_size} is not divisible by {n}")
    if cfg.dms_active and cfg.dms.alpha_per == "layer" and n > 1:
        problems.append("dms_alpha_per='layer' (KV head 0 decides for every head, which would need its logits on "
                        "every rank) is not supported")
    if problems:
        raise ValueError(f"tensor_parallel={n}: cannot split {where}: " + "; ".join(problems))


def local_config(cfg: ModelConfig, n: int) -> ModelConfig:
    """The config of one rank's part: ``Hq/N`` query heads, ``Hkv/N`` KV heads, ``I/N`` MLP width."""
    check_divisible(cfg, n)
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // n, num_kv_heads=cfg.num_kv_heads // n,
                               intermediate_size=cfg.intermediate_size // n)


def kv_heads_of(rank: int, cfg: ModelConfig, n: int) -> range:
    """The global KV-head indices rank ``rank`` owns."""
    h = cfg.num_kv_heads // n
    return range(rank * h, (rank + 1) * h)


class RowParallelLinear(nn.Linear):
    """``y = all_reduce(x_r @ W_r^T) + b``: each rank holds the input columns of its heads (or of
    its MLP slice); the bias is added once, after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group):
        super().__init__(in_features, out_features, bias=bias)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


class RowParallelLoRALinear(LoRALinear):
    """:class:`RowParallelLinear` with a LoRA update: the rank's partial sum (its columns of the
    weight and of ``A``, merged or not) is all-reduced once, then biased."""

    def __init__(self, cfg: ModelConfig, in_features: int, out_features: int, bias: bool, seed: int, group):
        super().__init__(cfg, in_features, out_features, bias, seed)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(x, None)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


def row_parallel(lin: nn.Linear, group) -> nn.Linear:
    """The row-parallel twin of a projection (same parameter names, same LoRA settings)."""
    if isinstance(lin, LoRALinear):
        return RowParallelLoRALinear(lin.cfg, lin.in_features, lin.out_features, lin.bias is not None,
                                     lin.lora_seed, group)
    return RowParallelLinear(lin.in_features, lin.out_features, lin.bias is not None, group)


def shard_rule(name: str, full: ModelConfig, n: int, rank: int) -> tuple[int, int, int] | None:
    """``(dim, start, stop)`` of the slice rank ``rank`` holds of weight ``name``; None: all of it."""
    d = full.head_dim
    q, kv, ff = full.num_heads // n, full.num_kv_heads // n, full.intermediate_size // n
    leaf = name.rsplit(".", 2)
    mod, kind = (leaf[-2], leaf[-1]) if len(leaf) >= 2 else ("", name)
    if kind == "dms_lora_a":  # [r, in]: split where the weight's columns are (row-parallel), else whole
        return shard_rule(name[: -len(kind)] + "weight", full, n, rank) if mod in ("o_proj", "down_proj") else None
    # dms_lora_b [out, r] falls through: rows where the weight's rows split, whole for o/down (as their bias)
    if mod == "q_proj":
        return 0, rank * q * d, (rank + 1) * q * d
    if mod in ("k_proj", "v_proj"):
        return 0, rank * kv * d, (rank + 1) * kv * d
    if mod == "o_proj" and kind == "weight":
        return 1, rank * q * d, (rank + 1) * q * d
    if mod in ("gate_proj", "up_proj"):
        return 0, rank * ff, (rank + 1) * ff
    if mod == "down_proj" and kind == "weight":
        return 1, rank * ff, (rank + 1) * ff
    if mod == "dms_proj_alpha":
        return 0, rank * kv, (rank + 1) * kv
    return None


def _read(f, name: str, rule) -> torch.Tensor:
    """One weight, or only this rank's rows/columns of it, read from an open safetensors file."""
    if rule is None:
        return f.get_tensor(name)
    dim, a, b = rule
    part = f.get_slice(name)
    return part[a:b] if dim == 0 else part[:, a:b]


def build_local_model(full: ModelConfig, tp: TPGroup) -> DecoderLM:
    """An empty (meta) DecoderLM of the local config with row-parallel o_proj / down_proj."""
    cfg = local_config(full, tp.size)
    with torch.device("meta"):
        model = DecoderLM(cfg)
        for layer in model.model.layers:
            layer.self_attn.o_proj = row_parallel(layer.self_attn.o_proj, tp.group)
            layer.mlp.down_proj = row_parallel(layer.mlp.down_proj, tp.group)
    model.tp = TPShard(tp, full)
    return model


def load_model_sharded(folder: str | Path, tp: TPGroup, *, dtype: torch.dtype, device, dms=None) -> DecoderLM:
    """This rank's part of a checkpoint: every tensor is read through ``get_slice``, so no rank
    ever holds the whole model (replicated tensors are read whole)."""
    folder = Path(folder)
    raw = read_config(folder)
    full = model_config_from_hf(raw, resolve_dms(raw, dms), where=str(folder / "config.json"))
    check_divisible(full, tp.size, where=str(folder))
    model = build_local_model(full, tp)
    state = read_state(weight_files(folder), model,
                       lambda f, path, name: _read(f, name, shard_rule(name, full, tp.size, tp.rank)), full.arch,
                       dtype=dtype, device=device, whose=f"rank {tp.rank} of {tp.size}'s part of the config")
    model.load_state_dict(state, strict=False, assign=True)
    _materialise_rest(model, model.config, state, dtype, device)
    model.eval()
    return model


def load_named_weights_sharded(model: DecoderLM, path: str | Path, what: str = "weights") -> None:
    """:func:`load_named_weights` for a sharded model: each rank copies only its slice."""
    shard: TPShard = model.tp
    refuse_merged(model, what, "load weights into it")
    params = dict(model.named_parameters())
    with open_safetensors(Path(path)) as f:
        unknown = [n for n in f.keys() if n not in params]
        if unknown:
            raise ValueError(f"{what}: {Path(path).name} holds weights this model does not have: {unknown[:4]}")
        with torch.no_grad():
            for n in f.keys():
                t = _read(f, n, shard_rule(n, shard.full_config, shard.size, shard.rank))
                if tuple(t.shape) != tuple(params[n].shape):
                    raise ValueError(f"{what}: {Path(path).name}: {n!r} has shape {tuple(t.shape)} on rank "
                                     f"{shard.rank}, expected {tuple(params[n].shape)}")
                params[n].copy_(t.to(params[n].dtype))
