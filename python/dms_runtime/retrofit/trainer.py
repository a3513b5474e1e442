"""The retrofit training loop: distillation from the same model with eviction off plus the
one-sided compression loss, AdamW with warm-up and clipping, adapter checkpoints, resume."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..models.full_sequence import FullSequenceAttention
from ..models.decoder import DecoderLM
from ..models.loading import load_named_weights
from .training_backend import TrainingAttention, eviction_off
from .losses import compression_target, distillation_kl


@dataclass(slots=True)
class RetrofitConfig:
    """final_cr: the compression ratio to reach; CR rises by one every ``steps_per_cr`` steps.
    trainable: "dms" (the DMS adapter only, base frozen; needs ``dms_separate_alpha``) or "all"."""

    final_cr: float = 8.0
    steps_per_cr: int = 100
    initial_cr: float = 1.0  # > 1 when continuing an earlier retrofit (``init_from``) at its CR
    window: int = 256
    tau: float = 0.1
    lr: float = 3e-5
    weight_decay: float = 0.0
    warmup_steps: int = 20
    clip: float = 1.0
    trainable: str = "dms"
    seed: int = 0
    autocast_bf16: bool = False  # bf16 autocast of the forward passes (fp32 master weights)
    init_from: str | None = None  # a retrofit folder whose DMS weights start this run (fresh optimizer)

    def __post_init__(self):
        if self.trainable not in ("dms", "all"):
            raise ValueError(f"trainable: expected 'dms' or 'all', got {self.trainable!r}")
        if self.window < 1:
            raise ValueError(f"window: expected >= 1, got {self.window}")
        if not self.tau > 0:
            raise ValueError(f"tau: expected > 0, got {self.tau}")
        if not 1 <= self.initial_cr <= self.final_cr:
            raise ValueError(f"initial_cr: expected between 1 and final_cr={self.final_cr}, got {self.initial_cr}")


def dms_parameter_names(model: DecoderLM) -> list[str]:
    return [n for n, _ in model.named_parameters() if ".dms_proj_alpha" in n]


class Retrofitter:
    """``step(input_ids, lengths)`` runs one optimisation step and returns its log record."""

    def __init__(self, model: DecoderLM, config: RetrofitConfig, log_path: str | Path | None = None,
                 base_model: str | None = None):
        dms = model.config.dms
        if dms is None:
            raise ValueError("model: load it with DMS settings (dms={...}) before retrofitting")
        if config.trainable == "dms" and not dms.separate_alpha:
            raise ValueError("trainable: 'dms' trains the adapter only; load with dms_separate_alpha=True "
                             "(the borrowed-neuron variant trains q_proj: use trainable='all')")
        dms.window_size, dms.tau, dms.cr, dms.disable_eviction = config.window, config.tau, config.final_cr, False
        self.model, self.config = model, config
        if config.init_from is not None:
            init = Path(config.init_from) / "dms_weights.safetensors"
            if not init.is_file():
                raise FileNotFoundError(f"init_from: {str(init)!r} does not exist (expected a retrofit folder)")
            load_named_weights(model, init, what="init_from")
        names = set(dms_parameter_names(model)) if config.trainable == "dms" else None
        self.params = []
        for n, p in model.named_parameters():
            p.requires_grad_(names is None or n in names)
            if p.requires_grad:
                self.params.append(p)
        self.opt = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        # data parallel when a process group is up (torchrun): gradients are averaged over ranks
        self.rank, self.world = 0, 1
        self.student = model
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            self.student = torch.nn.parallel.DistributedDataParallel(model)
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed + self.rank)
        self.base_model = base_model
        self.step_count = 0
        self.log_path = Path(log_path) if log_path else None

    def lr_at(self, step: int) -> float:
        warm = self.config.warmup_steps
        return self.config.lr * min(1.0, (step + 1) / warm) if warm else self.config.lr

    def step(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> dict:
        t0 = time.perf_counter()
        model, cfg = self.model, self.config
        b, t = input_ids.shape
        dev = model.device
        input_ids = input_ids.to(dev)
        lengths = torch.full((b,), t, dtype=torch.int64) if lengths is None else lengths
        pos = torch.arange(t, device=dev).expand(b, t)
        mask = pos < lengths.to(dev)[:, None]
        model.train()
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.autocast_bf16)
        with torch.no_grad(), eviction_off(model), autocast:
            teacher = model(input_ids, pos, FullSequenceAttention(lengths=lengths))
        backend = TrainingAttention(cfg.window, cfg.tau, self.generator, lengths)
        with autocast:
            student = self.student(input_ids, pos, backend)
        kl = distillation_kl(student, teacher, mask)
        hard = torch.stack(backend.hard)  # [L, B, Hkv, T]
        frac = hard.sum(dim=(0, 2, 3)) / (hard.shape[0] * hard.shape[2] * lengths.to(dev).clamp(min=1))
        target = compression_target(self.step_count, cfg.final_cr, cfg.steps_per_cr, cfg.initial_cr)
        comp = torch.relu(target - frac).mean()
        loss = kl + comp
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step_count)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.clip)
        self.opt.step()
        model.eval()
        self.step_count += 1
        record = {
            "step": self.step_count, "loss": loss.item(), "kl": kl.item(), "compression_loss": comp.item(),
            "target_fraction": target, "evicted_fraction": frac.mean().item(),
            "achieved_cr": 1.0 / max(1e-9, 1.0 - frac.mean().item()), "grad_norm": float(grad_norm),
            "lr": self.lr_at(self.step_count - 1), "tokens_per_s": int(mask.sum()) / (time.perf_counter() - t0),
        }
        if self.log_path and self.rank == 0:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        return record

    # ------------------------------------------------------------------ checkpoints

    def save(self, folder: str | Path) -> Path:
        """The trainable weights (safetensors), the DMS settings, and the trainer state for resume."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        names = {id(p) for p in self.params}
        weights = {n: p.detach().contiguous().cpu() for n, p in self.model.named_parameters() if id(p) in names}
        save_file(weights, str(folder / "dms_weights.safetensors"))
        (folder / "dms_config.json").write_text(json.dumps({**self.model.config.dms.to_hf_dict(),
                                                            "base_model": self.base_model,
                                                            "trainable": self.config.trainable,
                                                            "retrofit": asdict(self.config)}, indent=2))
        torch.save({"step": self.step_count, "optimizer": self.opt.state_dict(),
                    "generator": self.generator.get_state()}, folder / "trainer_state.pt")
        return folder

    def resume(self, folder: str | Path) -> None:
        folder = Path(folder)
        load_named_weights(self.model, folder / "dms_weights.safetensors", what="folder")
        state = torch.load(folder / "trainer_state.pt", weights_only=False)
        self.opt.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step_count = state["step"]
