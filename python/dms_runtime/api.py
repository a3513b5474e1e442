"""The user-facing entry points: ``load()`` and ``generate()``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .config import DMSConfig, ModelConfig
from .hub import EmbeddedModel, resolve, shipped_retrofit
from .models.decoder import DecoderLM
from . import validation as V
from .models.loading import load_model, load_named_weights, read_json
from .models.lora import merge_lora as merge_lora_updates
from .outputs import RequestOutput
from .paged.cache import PagedConfig
from .engine.generate import generate_paged
from .oracle.generate import generate_oracle
from .sampling import SamplingParams
from .stats import GenerationStats

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass(slots=True)
class LoadedModel:
    """A model ready to generate: the network, its tokenizer (or None) and where it came from."""

    model: DecoderLM
    tokenizer: Any
    name: str
    path: Path
    embedded: EmbeddedModel | None = None

    @property
    def config(self) -> ModelConfig:
        shard = getattr(self.model, "tp", None)  # a tensor-parallel rank's model has the local head counts
        return shard.full_config if shard is not None else self.model.config

    @property
    def eos_ids(self) -> set[int]:
        ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"dtype: expected a floating dtype, got {dtype}")
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype: expected one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}")


def _device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise V.SettingTypeError(f"device: expected 'cpu', 'cuda', 'cuda:N', 'auto' or a torch.device, got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise V.UserError(f"device: expected 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise V.UserError(f"device: expected 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but no CUDA device is available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise V.UserError(f"device: {device!r} requested but there are {torch.cuda.device_count()} CUDA devices")
    return dev


def load(
    name_or_path: str | Path,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = "cpu",
    dms: DMSConfig | dict[str, Any] | None = None,
    tensor_parallel: int = 1,
    merge_lora: bool = True,
) -> LoadedModel:
    """Load a model by embedded name (``"smollm2-135m-instruct"``, or its shipped DMS retrofits
    ``"smollm2-135m-instruct-dms-cr2"`` / ``"-cr4"`` / ``"-cr8"``), local folder, retrofit folder or ``.gguf`` file.

    ``dms`` gives or overrides the DMS settings (a :class:`DMSConfig`, or a dict with keys
    like ``{"dms_window_size": 256}``); a checkpoint without ``dms_*`` keys loads as vanilla.

    ``tensor_parallel=N`` (N processes, e.g. ``torchrun --nproc_per_node N``): each rank reads only
    its shard (KV heads ``Hkv/N`` with their query groups, ``1/N`` of the MLP); see
    :mod:`dms_runtime.parallel`.

    ``merge_lora`` (a LoRA retrofit, ``dms_lora_rank > 0``): fold the low-rank update into the base
    weights so that a projection is one matmul while eviction is on (the default, for inference).
    Eviction off then subtracts the update back, which equals the base up to the merge's rounding;
    ``merge_lora=False`` keeps the update apart (exact base; needed to train or to load more weights).
    """
    if not isinstance(name_or_path, (str, Path)):
        raise V.SettingTypeError(f"name_or_path: expected a model name, folder or .gguf path, got {name_or_path!r}")
    _dtype(dtype), _device(device)  # fail on bad settings before anything is read or converted
    if isinstance(tensor_parallel, bool) or not isinstance(tensor_parallel, int) or tensor_parallel < 1:
        raise ValueError(f"tensor_parallel: expected an int >= 1, got {tensor_parallel!r}")
    if not isinstance(merge_lora, bool):
        raise V.SettingTypeError(f"merge_lora: expected True or False, got {merge_lora!r}")
    tp = None
    if tensor_parallel > 1:
        from .parallel import init_tensor_parallel

        tp = init_tensor_parallel(tensor_parallel, _device(device))
        device = tp.device
    shipped = shipped_retrofit(str(name_or_path))
    if shipped is not None:
        lm = _load_adapter(shipped, dtype=dtype, device=device, dms=dms, tensor_parallel=tensor_parallel,
                           merge_lora=merge_lora)
        lm.name = str(name_or_path)
        return lm
    adapter = Path(str(name_or_path)).expanduser()
    if (adapter / "dms_config.json").is_file() and not (adapter / "config.json").is_file():
        return _load_adapter(adapter, dtype=dtype, device=device, dms=dms, tensor_parallel=tensor_parallel,
                             merge_lora=merge_lora)
    if tp is None:
        path, embedded = resolve(str(name_or_path))
        model, _ = load_model(path, dtype=_dtype(dtype), device=_device(device), dms=dms)
    else:
        from .parallel import load_model_sharded, rank_zero_first

        with rank_zero_first(tp):  # one rank converts an embedded GGUF file into the cache
            path, embedded = resolve(str(name_or_path))
        model = load_model_sharded(path, tp, dtype=_dtype(dtype), device=device, dms=dms)
    if merge_lora:
        merge_lora_updates(model)  # under tensor parallelism a rank merges its own slice
    tokenizer = None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except Exception as e:  # the tokenizers library raises plain Exceptions for a broken file
            text = " ".join(str(e).split())
            raise V.UserError(f"{path}: the tokenizer cannot be loaded ({type(e).__name__}: {text})") from None
    return LoadedModel(model=model, tokenizer=tokenizer, name=str(name_or_path), path=path, embedded=embedded)


def _load_adapter(folder: Path, *, dtype, device, dms, tensor_parallel: int = 1, merge_lora: bool = True) -> LoadedModel:
    """A retrofit saved as DMS weights + settings on top of a base model named in dms_config.json."""

    raw = read_json(folder / "dms_config.json")
    base = raw.get("base_model")
    if not base:
        raise ValueError(f"model: {folder}/dms_config.json names no base_model")
    settings = {k: v for k, v in raw.items() if k.startswith("dms_")}
    DMSConfig.from_hf_dict(settings, where=str(folder / "dms_config.json"))  # the file's own values
    if dms is not None and not isinstance(dms, dict):
        raise ValueError("dms: give a dict of dms_* keys to override a retrofit's settings")
    settings.update(dms or {})
    lm = load(base, dtype=dtype, device=device, dms=settings, tensor_parallel=tensor_parallel, merge_lora=False)
    if tensor_parallel > 1:
        from .parallel import load_named_weights_sharded

        load_named_weights_sharded(lm.model, folder / "dms_weights.safetensors", what="model")
    else:
        load_named_weights(lm.model, folder / "dms_weights.safetensors", what="model")
    if merge_lora:
        merge_lora_updates(lm.model)  # a rank merges its own slice of the update
    lm.name, lm.path = str(folder), folder
    return lm


@dataclass(slots=True)
class GenerationResult:
    outputs: list[RequestOutput]
    stats: GenerationStats
    texts: list[str | None] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "texts": self.texts,
            "token_ids": self.token_ids,
            "finish_reasons": [o.finish_reason for o in self.outputs],
            "stats": self.stats.to_dict(),
        }


def encode_prompts(lm: LoadedModel, prompts, chat: bool | None) -> list[list[int]]:
    """Strings (optionally through the chat template) or lists of token ids -> token id lists."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts: expected a non-empty list of strings or of token-id lists")
    out: list[list[int]] = []
    vocab = lm.config.vocab_size
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if lm.tokenizer is None:
                raise ValueError(f"prompts[{i}]: text needs a tokenizer, and {lm.name!r} has none; pass token ids")
            use_chat = chat if chat is not None else bool(lm.tokenizer.chat_template)
            if use_chat:
                if not lm.tokenizer.chat_template:
                    raise ValueError(f"chat: {lm.name!r} has no chat template")
                text = lm.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
                )
                ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                ids = lm.tokenizer(p)["input_ids"]
        elif isinstance(p, Sequence) and not isinstance(p, bytes):
            ids = V.token_ids(f"prompts[{i}]", p, vocab, empty_ok=True)
        else:
            raise ValueError(f"prompts[{i}]: expected a string or a list of ints, got {type(p).__name__}")
        if not ids:
            raise ValueError(f"prompts[{i}]: the prompt is empty after tokenization")
        out.append(ids)
    return out


def generate(
    model: LoadedModel,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    *,
    chat: bool | None = None,
    backend: str = "paged",
    n: int = 1,
    paged: PagedConfig | None = None,
    tensor_parallel: int | None = None,
    **sampling: Any,
) -> GenerationResult:
    """Generate for a batch of prompts.

    ``prompts``: strings (wrapped in the chat template when the model has one, unless
    ``chat=False``) or token-id lists. Sampling settings come as a :class:`SamplingParams`
    or as keywords (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``,
    ``stop``, ``stop_token_ids``, ``ignore_eos``).

    ``backend``: ``"paged"`` (default: the serving engine over the paged DMS cache) or
    ``"oracle"`` (dense cache + the reference definition). ``n`` samples per prompt
    (paged only) share the prompt's pages; outputs are then prompt-major. ``paged`` sizes the pool
    (of each rank, with tensor parallelism).

    A model loaded with ``tensor_parallel=N``: every rank calls ``generate()``; rank 0 encodes,
    schedules and samples, the others run their shards, and all return rank 0's result.
    ``tensor_parallel``, when given, must match the model's.
    """
    if not isinstance(model, LoadedModel):
        raise ValueError(f"model: expected what dms_runtime.load() returns, got {type(model).__name__}")
    shard = getattr(model.model, "tp", None)
    if tensor_parallel is not None and tensor_parallel != (shard.size if shard is not None else 1):
        raise ValueError(f"tensor_parallel={tensor_parallel}: the model was loaded with "
                         f"tensor_parallel={shard.size if shard is not None else 1}; give it to load()")
    if shard is not None:
        from . import parallel

        if shard.rank != 0:
            return parallel.run_follower(model, until_result=True)
        try:
            result = _generate(model, prompts, params, chat=chat, backend=backend, n=n, paged=paged, **sampling)
        except BaseException as exc:
            parallel.end_call(model, error=exc)
            raise
        parallel.end_call(model, result)
        return result
    return _generate(model, prompts, params, chat=chat, backend=backend, n=n, paged=paged, **sampling)


def _generate(model: LoadedModel, prompts, params, *, chat, backend, n, paged, **sampling) -> GenerationResult:
    if params is None:
        params = SamplingParams(**sampling)
    elif sampling:
        raise ValueError(f"pass sampling settings either as params or as keywords, not both: {sorted(sampling)}")
    elif not isinstance(params, SamplingParams):
        raise V.SettingTypeError(f"params: expected a SamplingParams (or sampling keywords), got {type(params).__name__}")
    params.validate()  # also when a field was changed after creation
    if model.config.dms is not None:
        model.config.dms.validate()  # the DMS settings, too (both backends read them)
    n = V.integer("n", n, 1, V.MAX_SAMPLES)
    if paged is not None and not isinstance(paged, PagedConfig):
        raise V.SettingTypeError(f"paged: expected a PagedConfig, got {type(paged).__name__}")
    if chat is not None:
        V.boolean("chat", chat)
    if backend not in ("paged", "oracle"):
        raise ValueError(f"backend: expected 'paged' or 'oracle', got {backend!r}")
    if backend == "oracle" and (n != 1 or paged is not None):
        raise ValueError("n / paged: only the paged backend takes them")
    if backend == "oracle" and getattr(model.model, "tp", None) is not None:
        raise ValueError("backend: the oracle runtime runs on one process; tensor parallelism needs 'paged'")
    ids = encode_prompts(model, prompts, chat)
    ctx = model.config.max_position_embeddings
    for i, p in enumerate(ids):
        if len(p) + params.max_new_tokens > ctx:
            raise ValueError(
                f"prompts[{i}]: {len(p)} prompt tokens + max_new_tokens={params.max_new_tokens} exceed the model's "
                f"context of {ctx} tokens"
            )
    if backend == "paged":
        outputs, stats = generate_paged(model.model, ids, params, eos_ids=model.eos_ids, tokenizer=model.tokenizer,
                                        n=n, config=paged)
    else:
        outputs, stats = generate_oracle(model.model, ids, params, eos_ids=model.eos_ids,
                                            tokenizer=model.tokenizer)
    return GenerationResult(
        outputs=outputs,
        stats=stats,
        texts=[o.text for o in outputs],
        token_ids=[o.token_ids for o in outputs],
    )
