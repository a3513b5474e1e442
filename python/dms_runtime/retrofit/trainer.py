"""The retrofit training loop: distillation from the same model with eviction off plus the
one-sided compression loss, AdamW with warm-up and clipping, adapter checkpoints, resume."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..models.full_sequence import FullSequenceAttention
from ..models.decoder import DecoderLM
from .. import validation as V
from ..models.loading import load_named_weights, open_safetensors, read_json, read_tensor
from ..models.lora import is_lora_parameter, refuse_merged
from .training_backend import TrainingAttention, eviction_off
from .losses import compression_target, distillation_kl, topk_kl


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
    init_from: str | None = None  # a retrofit folder or shipped retrofit's name: its DMS weights start this run
    warm_start: int = 0  # sequences the adapter was fitted from before the first step (warm_start.py)
    lora_lr: float = 1e-4  # the learning rate of the LoRA updates (dms_lora_rank > 0), warmed up like lr
    checkpoint_layers: bool = False  # activation checkpointing: each layer runs again in the backward pass
    decay_steps: int = 0  # the last decay_steps of total_steps lower every learning rate linearly toward zero
    total_steps: int | None = None  # the run's length in steps (needed by decay_steps)

    def __post_init__(self):
        self.final_cr = V.number("final_cr", self.final_cr, 1)
        self.steps_per_cr = V.integer("steps_per_cr", self.steps_per_cr, 1)
        self.initial_cr = V.number("initial_cr", self.initial_cr, 1)
        self.window = V.integer("window", self.window, 1, V.MAX_WINDOW)
        self.tau = V.number("tau", self.tau, 0, lo_open=True)
        self.lr = V.number("lr", self.lr, 0, lo_open=True)
        self.lora_lr = V.number("lora_lr", self.lora_lr, 0, lo_open=True)
        self.weight_decay = V.number("weight_decay", self.weight_decay, 0)
        self.warmup_steps = V.integer("warmup_steps", self.warmup_steps, 0)
        self.clip = V.number("clip", self.clip, 0, lo_open=True)
        V.choice("trainable", self.trainable, ("dms", "all"))
        self.seed = V.integer("seed", self.seed, 0, V.MAX_SEED)
        self.warm_start = V.integer("warm_start", self.warm_start, 0)
        V.boolean("autocast_bf16", self.autocast_bf16)
        V.boolean("checkpoint_layers", self.checkpoint_layers)
        self.decay_steps = V.integer("decay_steps", self.decay_steps, 0)
        if self.total_steps is not None:
            self.total_steps = V.integer("total_steps", self.total_steps, 0)
        if self.decay_steps and (self.total_steps is None or self.decay_steps > self.total_steps):
            raise ValueError(f"decay_steps: expected at most total_steps={self.total_steps} (the run's length), "
                             f"got {self.decay_steps}")
        if self.init_from is not None and not isinstance(self.init_from, (str, Path)):
            raise V.SettingTypeError(f"init_from: expected a retrofit folder, got {self.init_from!r}")
        if self.init_from is not None:
            self.init_from = str(self.init_from)
        if not self.initial_cr <= self.final_cr:
            raise ValueError(f"initial_cr: expected between 1 and final_cr={self.final_cr}, got {self.initial_cr}")


def dms_parameter_names(model: DecoderLM) -> list[str]:
    """What ``trainable="dms"`` trains: the eviction adapter and, in a LoRA retrofit, the low-rank updates."""
    return [n for n, _ in model.named_parameters() if ".dms_proj_alpha" in n or is_lora_parameter(n)]


class Retrofitter:
    """``step(input_ids, lengths)`` runs one optimisation step and returns its log record."""

    def __init__(self, model: DecoderLM, config: RetrofitConfig, log_path: str | Path | None = None,
                 base_model: str | None = None, teacher_cache=None):
        """teacher_cache: a :class:`.teacher_cache.TeacherCache`; then each step distils from the
        teacher's cached top-k (computed on the first visit of its batch) with :func:`.losses.topk_kl`."""
        dms = model.config.dms
        if dms is None:
            raise ValueError("model: load it with DMS settings (dms={...}) before retrofitting")
        refuse_merged(model, "model", "retrofit it")
        if config.trainable == "dms" and not dms.separate_alpha:
            raise ValueError("trainable: 'dms' trains the adapter only; load with dms_separate_alpha=True "
                             "(the borrowed-neuron variant trains q_proj: use trainable='all')")
        dms.window_size, dms.tau, dms.cr, dms.disable_eviction = config.window, config.tau, config.final_cr, False
        self.model, self.config = model, config
        model.checkpoint_layers = config.checkpoint_layers
        if config.init_from is not None:
            from ..hub import retrofit_folder

            init = retrofit_folder(config.init_from) / "dms_weights.safetensors"
            if not init.is_file():
                raise FileNotFoundError(f"init_from: {str(init)!r} does not exist (expected a retrofit folder "
                                        f"or a shipped retrofit's name)")
            load_named_weights(model, init, what="init_from")
        names = set(dms_parameter_names(model)) if config.trainable == "dms" else None
        self.params, lora = [], []
        for n, p in model.named_parameters():
            p.requires_grad_(names is None or n in names)
            if p.requires_grad:
                (lora if is_lora_parameter(n) else self.params).append(p)
        # two groups when there are LoRA updates: [everything else at lr, the updates at lora_lr]
        groups = [{"params": self.params, "base_lr": config.lr}]
        if lora:
            groups.append({"params": lora, "base_lr": config.lora_lr})
            self.params = self.params + lora
        self.opt = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        # data parallel when a process group is up (torchrun): gradients are averaged over ranks
        self.rank, self.world = 0, 1
        self.student = model
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            self.student = torch.nn.parallel.DistributedDataParallel(model)
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed + self.rank)
        self.base_model = base_model
        self.teacher_cache = teacher_cache
        self.step_count = 0
        self.log_path = Path(log_path) if log_path else None

    def lr_at(self, step: int, base: float | None = None) -> float:
        """The learning rate of step ``step`` (0-based): ``base`` (default ``lr``) after a linear warm-up,
        and over the last ``decay_steps`` of ``total_steps`` falling linearly, to ``base / decay_steps``
        on the last step (warm-up, stable, decay)."""
        cfg = self.config
        base = cfg.lr if base is None else base
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        decay = min(1.0, max(0, cfg.total_steps - step) / cfg.decay_steps) if cfg.decay_steps else 1.0
        return base * warm * decay

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
        cached = self.teacher_cache.get(input_ids, lengths) if self.teacher_cache is not None else None
        hit = cached is not None
        if cached is None:
            with torch.no_grad(), eviction_off(model), autocast:
                teacher = model(input_ids, pos, FullSequenceAttention(lengths=lengths))
            if self.teacher_cache is not None:
                cached = self.teacher_cache.put(input_ids, lengths, teacher)
        backend = TrainingAttention(cfg.window, cfg.tau, self.generator, lengths)
        with autocast:
            student = self.student(input_ids, pos, backend)
        kl = distillation_kl(student, teacher, mask) if cached is None else topk_kl(student, cached.to(dev), mask)
        hard = torch.stack(backend.hard)  # [L, B, Hkv, T]
        frac = hard.sum(dim=(0, 2, 3)) / (hard.shape[0] * hard.shape[2] * lengths.to(dev).clamp(min=1))
        target = compression_target(self.step_count, cfg.final_cr, cfg.steps_per_cr, cfg.initial_cr)
        comp = torch.relu(target - frac).mean()
        loss = kl + comp
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step_count, g["base_lr"])
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
        if self.teacher_cache is not None:
            record["teacher_cached"] = hit
        if self.log_path and self.rank == 0:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        return record

    # ------------------------------------------------------------------ checkpoints

    def save(self, folder: str | Path) -> Path:
        """The trainable weights (safetensors), the DMS settings, and the trainer state for resume:
        its tensors (optimiser moments, RNG state) in safetensors, the rest in JSON; no pickle.
        Every file is written to a temporary name and renamed, and each records the step, so an
        interrupted save is detected on resume instead of mixing two steps."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        step = {"step": str(self.step_count)}
        tensors, optimizer = _flatten_optimizer(self.opt.state_dict())
        tensors["generator"] = self.generator.get_state()
        _atomic(folder / STATE_TENSORS, lambda p: save_file(tensors, str(p), metadata=step))
        state = {"format": STATE_FORMAT, "step": self.step_count, "optimizer": optimizer, "config": asdict(self.config)}
        _atomic(folder / STATE_JSON, lambda p: p.write_text(json.dumps(state, indent=1)))
        names = {id(p) for p in self.params}
        weights = {n: p.detach().contiguous().cpu() for n, p in self.model.named_parameters() if id(p) in names}
        _atomic(folder / WEIGHTS, lambda p: save_file(weights, str(p), metadata=step))
        settings = {**self.model.config.dms.to_hf_dict(), "base_model": self.base_model,
                    "trainable": self.config.trainable, "retrofit": asdict(self.config)}
        _atomic(folder / "dms_config.json", lambda p: p.write_text(json.dumps(settings, indent=2)))
        return folder

    def resume(self, folder: str | Path) -> None:
        """Continue from :meth:`save`'s files. A pickled ``trainer_state.pt`` of older versions is
        refused without being read: unpickling can run code."""
        folder = Path(folder)
        if not (folder / STATE_JSON).is_file() and (folder / LEGACY_STATE).is_file():
            raise V.UserError(f"{folder / LEGACY_STATE}: a trainer state in the old pickle format, not read (unpickling "
                              f"can run code); start again with --overwrite, or from its weights with --init-from")
        state = read_json(folder / STATE_JSON)
        if state.get("format") != STATE_FORMAT:
            raise V.UserError(f"{folder / STATE_JSON}: expected format {STATE_FORMAT!r}, got {state.get('format')!r}")
        step = state.get("step")
        V.integer(f"{folder / STATE_JSON}: step", step, 0)
        with open_safetensors(folder / STATE_TENSORS) as f:
            tensors = {n: read_tensor(f, folder / STATE_TENSORS, n) for n in f.keys()}
            tensor_step = (f.metadata() or {}).get("step")
        with open_safetensors(folder / WEIGHTS) as f:
            weights_step = (f.metadata() or {}).get("step")
        if tensor_step != str(step) or weights_step != str(step):
            raise V.UserError(f"{folder}: {STATE_JSON} is at step {step}, {STATE_TENSORS} at {tensor_step} and {WEIGHTS} "
                              f"at {weights_step}; the checkpoint is inconsistent (an interrupted save?)")
        opt_state = _unflatten_optimizer(state.get("optimizer"), tensors, folder / STATE_JSON)
        groups = self.opt.param_groups
        if [len(g["params"]) for g in opt_state["param_groups"]] != [len(g["params"]) for g in groups]:
            raise V.UserError(f"{folder}: the trainer state was saved for other trainable parameters "
                              f"(trainable={self.config.trainable!r}?)")
        for i, p in enumerate(self.params):
            for k, v in opt_state["state"].get(i, {}).items():
                if torch.is_tensor(v) and v.dim() > 0 and v.shape != p.shape:
                    raise V.UserError(f"{folder / STATE_TENSORS}: optimizer.{i}.{k} has shape {tuple(v.shape)}, "
                                      f"the parameter's is {tuple(p.shape)}")
        generator = tensors.get("generator")
        if generator is None or generator.dtype != torch.uint8:
            raise V.UserError(f"{folder / STATE_TENSORS}: no uint8 'generator' tensor (the RNG state)")
        load_named_weights(self.model, folder / WEIGHTS, what="folder")
        bases = [g["base_lr"] for g in self.opt.param_groups]
        self.opt.load_state_dict(opt_state)
        for g, base in zip(self.opt.param_groups, bases):  # this run's rates (states saved before base_lr lack it)
            g["base_lr"] = base
        try:
            self.generator.set_state(generator)
        except RuntimeError as e:
            raise V.UserError(f"{folder / STATE_TENSORS}: 'generator' is not a CPU RNG state ({e})") from None
        self.step_count = step
        self._trim_log(step)

    def _trim_log(self, step: int) -> None:
        """Drop the log's records of steps after ``step``: a run stopped between two saves logged them,
        and they are trained again from the checkpoint (a half-written last line goes with them)."""
        if not (self.log_path and self.rank == 0 and self.log_path.is_file()):
            return
        kept = []
        for line in self.log_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step:
                kept.append(line + "\n")
        _atomic(self.log_path, lambda p: p.write_text("".join(kept)))


WEIGHTS = "dms_weights.safetensors"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
LEGACY_STATE = "trainer_state.pt"
STATE_FORMAT = "dms-trainer-state/1"


def has_state(folder: str | Path) -> bool:
    """Whether a folder holds a trainer state to resume (a legacy pickled one counts: resume refuses it)."""
    folder = Path(folder)
    return (folder / STATE_JSON).is_file() or (folder / LEGACY_STATE).is_file()


def _atomic(path: Path, write) -> None:
    """``write(tmp)`` then rename over ``path``: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict -> its tensors (``optimizer.<param>.<key>``) and a JSON-able rest."""
    tensors, state = {}, {}
    for pid, entry in sd["state"].items():
        meta = {}
        for k, v in entry.items():
            if torch.is_tensor(v):
                tensors[f"optimizer.{pid}.{k}"] = v.detach().contiguous().cpu()
                meta[k] = {"tensor": f"optimizer.{pid}.{k}"}
            else:
                meta[k] = {"value": v}
        state[str(pid)] = meta
    return tensors, {"state": state, "param_groups": sd["param_groups"]}


def _unflatten_optimizer(meta, tensors: dict[str, torch.Tensor], where: Path) -> dict:
    if not isinstance(meta, dict) or not isinstance(meta.get("param_groups"), list) \
            or not isinstance(meta.get("state"), dict):
        raise V.UserError(f"{where}: 'optimizer' should hold 'state' and 'param_groups'")
    state = {}
    for pid, entry in meta["state"].items():
        if not pid.isdigit() or not isinstance(entry, dict):
            raise V.UserError(f"{where}: optimizer state entry {pid!r} is malformed")
        out = {}
        for k, v in entry.items():
            if isinstance(v, dict) and "tensor" in v:
                if v["tensor"] not in tensors:
                    raise V.UserError(f"{where}: optimizer tensor {v['tensor']!r} is missing from {STATE_TENSORS}")
                out[k] = tensors[v["tensor"]]
            elif isinstance(v, dict) and "value" in v:
                out[k] = v["value"]
            else:
                raise V.UserError(f"{where}: optimizer state {pid}.{k} is malformed")
        state[int(pid)] = out
    groups = []
    for g in meta["param_groups"]:
        if not isinstance(g, dict) or not isinstance(g.get("params"), list):
            raise V.UserError(f"{where}: an optimizer param group is malformed")
        # JSON turned tuples (betas) into lists
        groups.append({k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()})
    return {"state": state, "param_groups": groups}
