"""``dms retrofit``: retrofit a model with DMS on offline data; resumable; data parallel under torchrun."""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

from ..validation import (MAX_SEED, MAX_SEQS, MAX_TOKENS, MAX_WINDOW, UserError, add_dms_overrides, cli_float,
                          cli_int, dms_overrides)

# what a retrofit writes into --out; --overwrite removes these (and nothing else) first
OUTPUT_FILES = ("dms_weights.safetensors", "dms_config.json", "trainer_state.safetensors", "trainer_state.json",
                "trainer_state.pt", "log.jsonl", "warm_start.json")


def init_lora_settings(init_from: str) -> dict:
    """The ``dms_lora_*`` settings of the ``--init-from`` retrofit (empty: none, or no such folder yet;
    the trainer names a missing one)."""
    from ..hub import retrofit_folder
    from ..models.loading import read_json

    path = retrofit_folder(init_from) / "dms_config.json"
    if not path.is_file():
        return {}
    raw = read_json(path)
    return {k: v for k, v in raw.items() if k.startswith("dms_lora_")} if raw.get("dms_lora_rank") else {}


def prepare_out(out: Path, resume: bool, overwrite: bool, rank: int = 0) -> None:
    """Refuse to train over an earlier retrofit unless told to continue it or replace it."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {str(out)!r} exists and is not a folder")
    from .trainer import has_state

    if out.is_dir() and any(out.iterdir()) and not (resume or overwrite):
        raise UserError(f"--out: {str(out)!r} exists and is not empty; pass --resume to continue its run or "
                        f"--overwrite to replace it")
    if resume and out.is_dir() and any(out.iterdir()) and not has_state(out):
        raise UserError(f"--resume: {str(out)!r} holds no trainer state (trainer_state.json) to continue; pass "
                        f"--overwrite to replace it, or start a new --out with --init-from {str(out)!r}")
    if overwrite and rank == 0 and out.is_dir():
        for name in OUTPUT_FILES:
            (out / name).unlink(missing_ok=True)


def add_parser(sub) -> None:
    p = sub.add_parser("retrofit", help="retrofit a model with DMS (distillation + compression loss)")
    p.add_argument("--model", "-m", default="smollm2-135m-instruct", help="embedded name, folder or .gguf (the base)")
    p.add_argument("--out", required=True, help="output folder: DMS weights + settings (+ trainer state)")
    p.add_argument("--cr", type=cli_float(1), default=8.0, help="final compression ratio")
    p.add_argument("--steps", type=cli_int(0), default=1000, help="optimisation steps (0: only --warm-start)")
    p.add_argument("--steps-per-cr", type=cli_int(1), default=100)
    p.add_argument("--init-from", default=None,
                   help="start from the DMS weights of this retrofit folder or shipped retrofit (fresh optimizer), "
                        "e.g. CR 8 from CR 4")
    p.add_argument("--cr-start", type=cli_float(1), default=1.0, help="CR where the anneal starts (the --init-from CR)")
    p.add_argument("--warm-start", type=cli_int(0), default=0, metavar="SEQUENCES",
                   help="before the first step, fit each layer's adapter from this many --seq-len sequences (one "
                        "forward of the frozen base, no backpropagation) to mark the keys later queries attend "
                        "least, calibrated to --cr; then --cr-start may be --cr (warm_start.json: the fit)")
    p.add_argument("--window", type=cli_int(1, MAX_WINDOW), default=256)
    p.add_argument("--tau", type=cli_float(0, lo_open=True), default=0.1)
    p.add_argument("--sinks", type=cli_int(0, MAX_WINDOW), default=0, metavar="N",
                   help="the first N keys of every sequence are never evicted, in training and in the "
                        "retrofit's dms_config.json (dms_sink_tokens; 0: plain DMS)")
    p.add_argument("--lora-rank", type=cli_int(0, 4096), default=None, metavar="R",
                   help="also train a rank-R update of the base projections (dms_lora_rank), applied only while "
                        "eviction is on, so the teacher and the eval's vanilla stay the base; saved with the adapter "
                        "(0: the adapter alone; default: the --init-from retrofit's, else 0)")
    p.add_argument("--lora-alpha", type=cli_float(0, lo_open=True), default=None,
                   help="the update is scaled by alpha / R (dms_lora_alpha; default: the --init-from retrofit's, else 16)")
    p.add_argument("--lora-targets", nargs="+", default=None, metavar="PROJ",
                   help="the projections updated (default: the --init-from retrofit's, else all: q_proj k_proj "
                        "v_proj o_proj gate_proj up_proj down_proj)")
    p.add_argument("--lora-lr", type=cli_float(0, lo_open=True), default=1e-4,
                   help="AdamW learning rate of the LoRA update (warmed up with --warmup)")
    p.add_argument("--variant", choices=["adapter", "borrowed"], default="adapter")
    p.add_argument("--trainable", choices=["dms", "all"], default="dms")
    p.add_argument("--lr", type=cli_float(0, lo_open=True), default=3e-5,
                   help="AdamW learning rate (the logit scale of 100 makes 1e-3 diverge; see the shipped recipes)")
    p.add_argument("--warmup", type=cli_int(0), default=20)
    p.add_argument("--decay", type=cli_int(0), default=0, metavar="STEPS",
                   help="the last STEPS of --steps lower every learning rate linearly toward zero (warm-up, "
                        "stable, decay; 0: constant after the warm-up)")
    p.add_argument("--clip", type=cli_float(0, lo_open=True), default=1.0)
    p.add_argument("--seq-len", type=cli_int(2, MAX_TOKENS), default=1024)
    p.add_argument("--batch", type=cli_int(1, MAX_SEQS), default=4, help="sequences per step and per process")
    p.add_argument("--data", nargs="+", default=["stdlib", "synthetic"],
                   help="'stdlib', 'synthetic', 'selfdistill' (the base model's own answers, cached), or .txt/.jsonl files")
    p.add_argument("--save-every", type=cli_int(1), default=100)
    p.add_argument("--teacher-cache", default=None, metavar="DIR",
                   help="keep the teacher's top-k next-token distributions here, one file per batch, and distil "
                        "from them: a batch met again (a second epoch, a sweep on the same --data and --seed) "
                        "skips the teacher's forward pass")
    p.add_argument("--teacher-top-k", type=cli_int(1), default=64,
                   help="teacher tokens kept per position in --teacher-cache (the rest is one tail bucket)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from --out's trainer state")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the retrofit in an existing --out (its weights, settings, trainer state and log)")
    p.add_argument("--seed", type=cli_int(0, MAX_SEED), default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--autocast-bf16", action="store_true", help="bf16 autocast of the forward passes")
    p.add_argument("--checkpoint-layers", action="store_true",
                   help="activation checkpointing: keep each layer's input only and run the layer again in the "
                        "backward pass (the same step; measured at 2,048 tokens on CPU: 0.38x the peak memory for "
                        "1.20x the time; for 4K-8K sequences)")


def add_eval_parser(sub) -> None:
    from .evaluate import MATCHES
    from .policies import POLICIES
    from .retrieval import CALIBRATION, TASKS

    p = sub.add_parser("eval", help="fidelity to the vanilla model and achieved compression, per length; "
                                    "heuristic eviction policies at the same KV budget")
    p.add_argument("--model", "-m", required=True, nargs="+",
                   help="DMS models: folders, retrofit folders or embedded names (several: one curve each)")
    p.add_argument("--lengths", type=cli_int(1, MAX_TOKENS), nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--sequences", type=cli_int(1), default=2, help="held-out texts per length")
    p.add_argument("--passkey-trials", type=cli_int(0), default=0, help="passkey retrieval trials per length (0: skip)")
    p.add_argument("--vartrack-trials", type=cli_int(0), default=0, help="variable-tracking trials per length (0: skip)")
    p.add_argument("--policy", nargs="+", default=[], choices=POLICIES,
                   help="baselines run at each DMS model's KV budget (--match): streaming (StreamingLLM), tova, h2o, "
                        "quest; their passkey accuracy is teacher-forced, like vanilla's and DMS's next to them")
    p.add_argument("--match", default="held", choices=MATCHES,
                   help="what the policies' budget matches: DMS's peak KV tokens held (held, the default) or its "
                        "KV tokens read by all queries (read: the bytes a decode step moves)")
    p.add_argument("--defer", action="store_true",
                   help="also DMS with its evictions deferred until a pool of the policies' held budget (DMS's "
                        "peak KV tokens held) fills: the row dms-deferred (PagedConfig.defer_budget; by generation "
                        "through the runtime on the --retrieval cases), with its gap to DMS")
    p.add_argument("--retrieval", nargs="+", default=[], choices=TASKS,
                   help="retrieval tasks scored by greedy generation (passkey, multikey, multivalue, vartrack): "
                        "vanilla first; where it scores below --calibration-threshold the task is uninformative "
                        "at that length and skipped; else DMS and each --policy at DMS's budget on the same cases")
    p.add_argument("--retrieval-cases", type=cli_int(1, 10_000), default=20, help="seeded cases per (task, length)")
    p.add_argument("--retrieval-seed", type=cli_int(0, MAX_SEED), default=0)
    p.add_argument("--calibration-threshold", type=cli_float(0.0, 1.0), default=CALIBRATION,
                   help="vanilla accuracy below which a (task, length) is reported as uninformative")
    p.add_argument("--calibrate", action="store_true",
                   help="only vanilla on the --retrieval cases (the model may be a vanilla one); no fidelity, no figure")
    add_dms_overrides(p)
    p.add_argument("--plot", default=None, help="write KL, greedy agreement and retrieval accuracy against "
                                                "KV memory held and KV tokens read to this PNG")
    p.add_argument("--json", action="store_true")


_MARKERS = {"vanilla": "s", "dms": "o", "dms-deferred": "*", "streaming": "v", "tova": "^", "h2o": "D",
            "quest": "P"}
_NAMES = {"vanilla": "vanilla", "dms": "DMS", "dms-deferred": "DMS deferred"}


def plot_pareto(rows, path) -> None:
    """Quality against the two KV budgets (memory held, tokens read). Rows: KL to the vanilla model,
    greedy agreement, and retrieval accuracy (by generation, over the tasks where vanilla is
    informative; teacher-forced passkey accuracy when only that was measured). One curve per method
    and length through its points for each model (CR 2 / 4 / 8 ...: DMS, and the policies at its budget)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc_key = ("retrieval_accuracy" if any(r.retrieval_accuracy is not None for r in rows) else
               "passkey_accuracy" if any(r.passkey_accuracy is not None for r in rows) else None)
    metrics = [("kl_per_token", "KL(method || vanilla) per token"), ("greedy_agreement", "greedy agreement")]
    if acc_key:
        metrics.append((acc_key, "retrieval accuracy (generation)" if acc_key == "retrieval_accuracy"
                        else "passkey accuracy (teacher-forced)"))
    fig, axes = plt.subplots(len(metrics), 2, figsize=(12, 3.6 * len(metrics)), sharex=True, squeeze=False)
    series: dict[tuple, list] = {}
    for r in rows:
        series.setdefault((r.method, r.length), []).append(r)
    methods = list(dict.fromkeys(r.method for r in rows))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    for col, key, title in ((0, "held_fraction", "KV memory held (peak, fraction of dense)"),
                            (1, "read_fraction", "KV tokens read (fraction of dense)")):
        for row, (metric, ylabel) in enumerate(metrics):
            ax = axes[row][col]
            labelled = set()
            for (method, length), rs in series.items():
                rs = sorted((r for r in rs if getattr(r, metric) is not None and getattr(r, key) is not None),
                            key=lambda r: getattr(r, key))
                if not rs:
                    continue
                name = _NAMES.get(method, method)
                xs, ys = [getattr(r, key) for r in rs], [getattr(r, metric) for r in rs]
                ax.plot(xs, ys, marker=_MARKERS.get(method, "x"), color=colors[method],
                        linestyle="-" if method.startswith("dms") else ":",
                        label=None if method in labelled else name)
                labelled.add(method)
                for r, x, y in zip(rs, xs, ys):
                    ax.annotate(f"{r.length // 1024}K" if r.length >= 1024 else str(r.length), (x, y),
                                textcoords="offset points", xytext=(3, 3), fontsize=7)
            ax.set_xlim(0, 1.05)
            ax.grid(alpha=0.3)
            ax.set_ylabel(ylabel)
            if row == len(metrics) - 1:
                ax.set_xlabel(title)
    if any(r.kl_per_token > 0 for r in rows):
        for ax in axes[0]:
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.set_ylim(bottom=0)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Quality vs KV budget (a curve per method and length through the models' budgets; labels: length)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def model_label(name: str, window: int | None = None, sinks: int | None = None, offset: float | None = None) -> str:
    """A model's name in the rows; a window set by --dms-window, sinks set by --dms-sinks and an
    offset set by --dms-offset are part of it (``... w256``, ``... s4``, ``... o7``)."""
    label = Path(name).name if os.sep in name else name
    label = label if window is None else f"{label} w{window}"
    label = label if sinks is None else f"{label} s{sinks}"
    return label if offset is None else f"{label} o{offset:g}"



def _base(lm) -> str:
    """What models sharing vanilla logits and retrieval cases have in common: the base weights."""
    return str(lm.path if lm.embedded is None else lm.embedded.name)


def run_eval(args) -> int:
    import dms_runtime as dr

    from .evaluate import (MethodRow, RetrievalSuite, compare_methods, fidelity, heldout_sequences, matched_fraction,
                           mean_informative, passkey_accuracy, vanilla_logits, vartrack_accuracy)

    if args.calibrate and not args.retrieval:
        raise ValueError("--calibrate: give the tasks with --retrieval")
    if args.retrieval_cases < 1:
        raise ValueError(f"--retrieval-cases: expected >= 1, got {args.retrieval_cases}")
    suite = (RetrievalSuite(args.retrieval, args.retrieval_cases, args.retrieval_seed, args.calibration_threshold)
             if args.retrieval else None)
    fid_rows, method_rows, ret_rows = [], [], []
    vanilla = {}  # (base, length) -> eviction-off logits of the held-out texts, shared by models on one base
    # a LoRA retrofit's update kept apart: its eviction-off logits are then exactly the base's
    models = [(model_label(name, args.dms_window, args.dms_sinks, args.dms_offset),
               dr.load(name, dms=dms_overrides(args) or None, merge_lora=False)) for name in args.model]
    for n in args.lengths:
        for index, (label, lm) in enumerate(models):
            if args.calibrate:
                ret_rows += suite.run(lm, n, label, _base(lm), dms=False)
                continue
            key = (_base(lm), n)
            if key not in vanilla:
                vanilla.clear()  # keep one set: 8K tokens of logits are 1.6 GB
                vanilla[key] = vanilla_logits(lm, heldout_sequences(lm, n, args.sequences))
            if args.policy or args.defer:
                row, rows = compare_methods(lm, n, args.sequences, args.policy, args.passkey_trials, label,
                                            vanilla=vanilla[key], match=args.match, defer=args.defer)
                new_rows = [r for r in rows if r.method != "vanilla" or index == 0]
            else:
                row = fidelity(lm, n, args.sequences, vanilla=vanilla[key])
                new_rows = [MethodRow("vanilla", label, n, None, 0.0, 1.0, 1.0, 1.0),
                            MethodRow("dms", label, n, None, row.kl_per_token, row.greedy_agreement,
                                      row.peak_live_fraction, row.read_fraction)]
                if index:
                    new_rows = new_rows[1:]
            if suite is not None:
                ret_rows += suite.run(lm, n, label, _base(lm), policies=args.policy,
                                      budget_fraction={p: matched_fraction(p, args.match, row, n)
                                                       for p in args.policy},
                                      defer_fraction=row.peak_live_fraction if args.defer else None)
                for r in new_rows:
                    r.retrieval_accuracy = mean_informative(ret_rows, r.method, r.model, n)
            method_rows += new_rows
            if args.passkey_trials and (args.policy or args.defer):  # measured, teacher-forced, next to them
                row.passkey_accuracy_vanilla, row.passkey_accuracy_dms = (r.passkey_accuracy for r in rows[:2])
            elif args.passkey_trials:
                row.passkey_accuracy_dms, row.passkey_accuracy_vanilla = passkey_accuracy(lm, n, args.passkey_trials)
            if args.vartrack_trials:
                row.vartrack_accuracy_dms, row.vartrack_accuracy_vanilla = vartrack_accuracy(lm, n, args.vartrack_trials)
            fid_rows.append({"model": label, **row.to_dict()})
    if args.plot and method_rows:
        plot_pareto(method_rows, args.plot)
    if args.json:
        print(json.dumps({"fidelity": fid_rows, "methods": [r.to_dict() for r in method_rows],
                          "retrieval": [r.to_dict() for r in ret_rows]}, indent=2))
        return 0
    if fid_rows:
        print(f"{'model':>28} | {'length':>6} | {'KL/token':>9} | {'greedy agree':>12} | {'live/total':>10} | "
              f"{'CR':>6} | {'peak held':>9} | {'KV read':>7} | passkey dms / vanilla | vartrack dms / vanilla")
    for r in fid_rows:
        pk = (f"{r['passkey_accuracy_dms']:.2f} / {r['passkey_accuracy_vanilla']:.2f}"
              if r["passkey_accuracy_dms"] is not None else "-")
        vt = (f"{r['vartrack_accuracy_dms']:.2f} / {r['vartrack_accuracy_vanilla']:.2f}"
              if r["vartrack_accuracy_dms"] is not None else "-")
        print(f"{r['model']:>28} | {r['length']:>6} | {r['kl_per_token']:>9.5f} | {r['greedy_agreement']:>12.3f} | "
              f"{r['live_fraction']:>10.3f} | {r['compression_ratio']:>6.2f} | {r['peak_live_fraction']:>9.3f} | "
              f"{r['read_fraction']:>7.3f} | {pk} | {vt}")
    if args.policy or args.defer or (suite is not None and method_rows):
        print()
        print(f"{'method':>10} | {'model':>28} | {'length':>6} | {'budget':>6} | {'KL/token':>9} | {'greedy agree':>12} | "
              f"{'peak held':>9} | {'KV read':>7} | passkey (forced) | retrieval (generation, informative tasks) | "
              f"{'KL - DMS [95%]':>26} | agreement - DMS, points [95%]")
        for r in method_rows:
            acc = "-" if r.passkey_accuracy is None else f"{r.passkey_accuracy:.2f}"
            ret = "-" if r.retrieval_accuracy is None else f"{r.retrieval_accuracy:.2f}"
            kl_gap = "-" if r.kl_gap is None else "{:+.5f} [{:+.5f}, {:+.5f}]".format(*r.kl_gap)
            agree_gap = "-" if r.agreement_gap is None else "{:+.2f} [{:+.2f}, {:+.2f}]".format(
                *(100 * g for g in r.agreement_gap))
            print(f"{r.method:>10} | {r.model:>28} | {r.length:>6} | {r.budget if r.budget else '-':>6} | "
                  f"{r.kl_per_token:>9.5f} | {r.greedy_agreement:>12.3f} | {r.held_fraction:>9.3f} | "
                  f"{r.read_fraction:>7.3f} | {acc:>16} | {ret:>41} | {kl_gap:>26} | {agree_gap}")
    if ret_rows:
        print()
        print(f"retrieval by greedy generation ({args.retrieval_cases} cases per point; uninformative: vanilla "
              f"< {args.calibration_threshold:.0%}, not compared)")
        print(f"{'method':>10} | {'model':>28} | {'task':>10} | {'length':>6} | {'accuracy':>8} | {'vanilla':>7} | "
              f"{'KV budget':>9} | {'KV held':>7} | note")
        for r in ret_rows:
            acc = "-" if r.accuracy is None else f"{r.accuracy:.2f}"
            bud = "-" if r.budget_fraction is None or r.method == "vanilla" else f"{r.budget_fraction:.3f}"
            held = "-" if r.held_fraction is None else f"{r.held_fraction:.3f}"
            note = "" if r.informative else "uninformative"
            print(f"{r.method:>10} | {r.model:>28} | {r.task:>10} | {r.length:>6} | {acc:>8} | "
                  f"{r.vanilla_accuracy:>7.2f} | {bud:>9} | {held:>7} | {note}")
    return 0


def _documents(sources, seed, seq_len, lm=None):
    from . import data

    streams = []
    for src in sources:
        if src == "selfdistill":
            streams.append(iter(data.self_distillation_documents(lm, n=256, seed=seed)))
        elif src == "stdlib":
            streams.append(data.stdlib_documents(seed=seed))
        elif src == "synthetic":
            streams.append(data.synthetic_documents(10**9, n_filler=max(16, seq_len // 2), seed=seed))
        else:
            streams.append(data.text_documents([src]))
    # interleave the sources document by document
    for group in itertools.zip_longest(*streams):
        for doc in group:
            if doc is not None:
                yield doc


def run(args) -> int:
    import torch
    from tqdm import tqdm

    import dms_runtime as dr

    from . import data
    from .trainer import RetrofitConfig, Retrofitter

    from .trainer import has_state

    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if args.cr_start > args.cr:
        raise UserError(f"--cr-start: expected at most --cr={args.cr}, got {args.cr_start}")
    if args.decay > args.steps:
        raise UserError(f"--decay: expected at most --steps={args.steps}, got {args.decay}")
    if args.warm_start and args.init_from is not None:
        raise UserError("--warm-start: the adapter comes from --init-from already; give one of them")
    if args.warm_start and args.variant != "adapter":
        raise UserError("--warm-start: fits the adapter; expected --variant adapter")
    out = Path(args.out)
    prepare_out(out, args.resume, args.overwrite, int(os.environ.get("RANK", "0")))
    if distributed:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1
    device = f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    dms = {"dms_window_size": args.window, "dms_separate_alpha": args.variant == "adapter", "dms_tau": args.tau,
           "dms_cr": args.cr, "dms_sink_tokens": args.sinks}
    lora = init_lora_settings(args.init_from) if args.init_from is not None else {}
    lora_rank = args.lora_rank if args.lora_rank is not None else lora.get("dms_lora_rank", 0)
    if lora_rank:  # an --init-from LoRA retrofit is continued with its update unless the flags say otherwise
        dms.update(dms_lora_rank=lora_rank,
                   dms_lora_alpha=args.lora_alpha if args.lora_alpha is not None else lora.get("dms_lora_alpha", 16.0),
                   dms_lora_targets=args.lora_targets if args.lora_targets is not None else lora.get("dms_lora_targets"))
    elif args.lora_targets is not None or args.lora_alpha is not None:
        raise UserError(f"--lora-{'targets' if args.lora_targets is not None else 'alpha'}: give --lora-rank too "
                        f"(a rank-0 update has none)")
    lm = dr.load(args.model, dtype=args.dtype, device=device, dms=dms, merge_lora=False)
    if lm.tokenizer is None:
        raise ValueError(f"model: {args.model!r} has no tokenizer; the retrofit data needs one")
    cfg = RetrofitConfig(final_cr=args.cr, steps_per_cr=args.steps_per_cr, initial_cr=args.cr_start,
                         init_from=args.init_from, window=args.window, tau=args.tau, lr=args.lr,
                         warmup_steps=args.warmup, clip=args.clip, trainable=args.trainable, seed=args.seed,
                         autocast_bf16=args.autocast_bf16, warm_start=args.warm_start, lora_lr=args.lora_lr,
                         checkpoint_layers=args.checkpoint_layers, decay_steps=args.decay, total_steps=args.steps)
    out.mkdir(parents=True, exist_ok=True)
    cache = None
    if args.teacher_cache is not None:
        from .teacher_cache import CacheKey, TeacherCache

        cache = TeacherCache(args.teacher_cache, CacheKey(base_model=args.model, k=args.teacher_top_k,
                                                          vocab=lm.config.vocab_size, dtype=args.dtype,
                                                          autocast_bf16=args.autocast_bf16))
    trainer = Retrofitter(lm.model, cfg, log_path=out / "log.jsonl", base_model=args.model, teacher_cache=cache)
    if args.resume and has_state(out):
        trainer.resume(out)
    elif args.warm_start:
        from .warm_start import warm_start

        fit = data.pack(_documents(args.data, args.seed + 1, args.seq_len, lm), lm.tokenizer, args.seq_len,
                        eos_id=lm.tokenizer.eos_token_id)
        fit = torch.tensor(list(itertools.islice(fit, args.warm_start)), dtype=torch.int64)
        report = warm_start(lm.model, fit, args.cr, args.window)
        if rank == 0:
            (out / "warm_start.json").write_text(json.dumps({"sequences": args.warm_start, "seq_len": args.seq_len,
                                                             "data": args.data, **report.to_dict()}, indent=1))
            print(f"warm start: {args.warm_start} sequences, marked fraction {sum(report.marked_fraction) / report.layers:.3f} "
                  f"(target {report.target_fraction:.3f}), label agreement "
                  f"{sum(report.label_agreement) / report.layers:.3f}")
    seqs = data.pack(_documents(args.data, args.seed, args.seq_len, lm), lm.tokenizer, args.seq_len,
                     eos_id=lm.tokenizer.eos_token_id)
    stream = data.batches(seqs, args.batch)
    # every rank skips what it (and the others) consumed before a resume, then takes its share
    stream = itertools.islice(stream, trainer.step_count * world + rank, None, world)
    bar = tqdm(total=args.steps, initial=trainer.step_count, disable=rank != 0, desc="retrofit")
    for batch in stream:
        if trainer.step_count >= args.steps:
            break
        rec = trainer.step(batch)
        bar.update(1)
        bar.set_postfix(kl=f"{rec['kl']:.4f}", cr=f"{rec['achieved_cr']:.2f}", target=f"{1 / (1 - rec['target_fraction']):.2f}")
        if rank == 0 and (trainer.step_count % args.save_every == 0 or trainer.step_count == args.steps):
            trainer.save(out)
    bar.close()
    if rank == 0:
        trainer.save(out)
        print(f"saved the retrofit to {out} (step {trainer.step_count}); load it with dms_runtime.load({str(out)!r})")
    if distributed:
        torch.distributed.destroy_process_group()
    return 0
