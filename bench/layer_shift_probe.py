"""Probe: would a DMS model do better with its KV memory spread differently across layers?

Adds a constant to every eviction logit of a layer (positive: evict more), teacher-forced on
held-out text, and prints KL, greedy agreement and the mean live fraction at the end. A uniform
shift (every layer the same) traces the model's own KL-memory curve; a split shift treats the
"local" layers (those whose live fraction, unshifted, is under ``--local-below``: little beyond
the window) and the others differently. A split point below the uniform curve at the same memory
would mean the learnt allocation across layers is not the best one these decisions allow.

    .venv/bin/python bench/layer_shift_probe.py -m smollm2-135m-instruct-dms-cr8 --length 2048 \
        --uniform -5 -2 2 --split -5 2 --split 0 -1 --split 5 -1 --json bench/results/....jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dms_kernels import reference as ref
from dms_runtime import load
from dms_runtime.validation import add_dms_overrides, dms_overrides
from dms_runtime.models.full_sequence import FullSequenceAttention
from dms_runtime.retrofit.evaluate import forward_ids, heldout_sequences, vanilla_logits
from dms_runtime.retrofit.losses import distillation_kl


class ShiftedAttention(FullSequenceAttention):
    """The reference attention with layer ``l``'s eviction logits shifted by ``shift[l]``."""

    def __init__(self, window: int, shift: list[float]):
        super().__init__(window, record=True)
        self.shift = shift

    def attend(self, layer, q, k, v, logits):
        return super().attend(layer, q, k, v, logits + self.shift[layer])


def measure(lm, seqs, vanilla, shift: list[float]) -> dict:
    w, nl = lm.config.dms.window_size, lm.config.num_layers
    kl = agree = 0.0
    live = torch.zeros(nl, dtype=torch.float64)
    for s, van in zip(seqs, vanilla):
        backend = ShiftedAttention(w, shift)
        out = forward_ids(lm.model, s, backend)
        kl += distillation_kl(out, van).item() / len(seqs)
        agree += (out.argmax(-1) == van.argmax(-1)).float().mean().item() / len(seqs)
        for layer in range(nl):
            d = backend.decisions[layer]
            live[layer] += ref.live_tokens(d, w, len(s) - 1).double().mean().item() / len(s) / len(seqs)
    return {"kl": kl, "agreement": agree, "live": float(live.mean()), "live_per_layer": live.tolist()}


@torch.inference_mode()
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--sequences", type=int, default=1)
    p.add_argument("--uniform", type=float, nargs="*", default=[-2.0, 2.0], help="shifts for every layer")
    p.add_argument("--split", type=float, nargs=2, action="append", default=[], metavar=("LOCAL", "OTHER"),
                   help="a shift for the local layers and one for the others (repeat for more points)")
    add_dms_overrides(p)
    p.add_argument("--local-below", type=float, default=0.08, help="live fraction under which a layer is local")
    p.add_argument("--json", type=Path, help="also write one JSON line per point here")
    a = p.parse_args(argv)
    lm = load(a.model, dms=dms_overrides(a) or None)
    nl = lm.config.num_layers
    seqs = heldout_sequences(lm, a.length, a.sequences)
    vanilla = vanilla_logits(lm, seqs)
    base = measure(lm, seqs, vanilla, [0.0] * nl)
    local = [x < a.local_below for x in base["live_per_layer"]]
    rows = [{"shift": "none", "local_layers": [i for i, x in enumerate(local) if x], **base}]
    rows += [{"shift": "uniform", "local": d, "other": d, **measure(lm, seqs, vanilla, [d] * nl)} for d in a.uniform]
    rows += [{"shift": "split", "local": lo, "other": ot,
              **measure(lm, seqs, vanilla, [lo if x else ot for x in local])} for lo, ot in a.split]
    print(f"{a.model} at {a.length}, {a.sequences} text(s); local layers {rows[0]['local_layers']}")
    print("| shift | local | other | live | KL | agreement |\n| --- | --- | --- | --- | --- | --- |")
    for r in sorted(rows, key=lambda r: r["live"]):
        print(f"| {r['shift']} | {r.get('local', 0):g} | {r.get('other', 0):g} | {r['live']:.3f} | {r['kl']:.4f} | "
              f"{r['agreement']:.1%} |")
    if a.json:
        a.json.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
