"""Bad input to the reference raises ValueError naming the argument."""

import pytest
import torch

from dms_kernels import reference as ref


def q4(*shape):
    return torch.randn(*shape)


@pytest.mark.parametrize("call,match", [
    (lambda: ref.eviction_logits(q4(2, 8, 3), 2), "q: expected a 4-D"),
    (lambda: ref.eviction_logits(q4(1, 6, 3, 4), 4), "num_kv_heads"),
    (lambda: ref.eviction_logits(torch.ones(1, 2, 3, 4, dtype=torch.int32), 2), "q: expected a floating"),
    (lambda: ref.zero_borrowed_channel(q4(1, 4, 3, 4), 0), "num_kv_heads"),
    (lambda: ref.eviction_decisions(q4(2, 3)), "logits: expected a 3-D"),
    (lambda: ref.visibility_mask(torch.zeros(1, 1, 4), 2), "decisions: expected dtype torch.bool"),
    (lambda: ref.visibility_mask(torch.zeros(1, 1, 4, dtype=torch.bool), 0), "window: expected an int >= 1"),
    (lambda: ref.visibility_mask(torch.zeros(1, 1, 4, dtype=torch.bool), 1.5), "window"),
    (lambda: ref.visibility_mask(torch.zeros(1, 1, 4, dtype=torch.bool), True), "window"),
    (lambda: ref.dms_attention(q4(1, 4, 5, 8), q4(1, 2, 5, 8), q4(1, 2, 5, 4), torch.zeros(1, 2, 5, dtype=torch.bool), 2), "v: expected the shape of k"),
    (lambda: ref.dms_attention(q4(1, 4, 5, 8), q4(1, 3, 5, 8), q4(1, 3, 5, 8), torch.zeros(1, 3, 5, dtype=torch.bool), 2), "k: the number of query heads"),
    (lambda: ref.dms_attention(q4(1, 4, 5, 8), q4(1, 2, 5, 8), q4(1, 2, 5, 8), torch.zeros(1, 2, 4, dtype=torch.bool), 2), "decisions: expected shape"),
    (lambda: ref.dms_attention(q4(1, 4, 5, 8), q4(1, 2, 6, 8), q4(1, 2, 6, 8), torch.zeros(1, 2, 6, dtype=torch.bool), 2), "k: expected 5 positions"),
    (lambda: ref.dms_attention(q4(1, 4, 5, 8), q4(1, 2, 5, 8).to("meta"), q4(1, 2, 5, 8), torch.zeros(1, 2, 5, dtype=torch.bool), 2), "one device"),
    (lambda: ref.dms_attention_cached(q4(1, 4, 1, 8), q4(1, 2, 5, 8), q4(1, 2, 5, 8), torch.zeros(1, 2, 5, dtype=torch.bool), 2, torch.zeros(1, 1), torch.tensor([5])), "q_positions"),
    (lambda: ref.dms_attention_cached(q4(1, 4, 1, 8), q4(1, 2, 5, 8), q4(1, 2, 5, 8), torch.zeros(1, 2, 5, dtype=torch.bool), 2, torch.zeros(1, 1, dtype=torch.long), torch.tensor([6])), "kv_lengths"),
    (lambda: ref.training_bias(q4(1, 2, 5), 2, 0.1, q4(1, 2, 4)), "noise: expected shape"),
    (lambda: ref.training_bias(q4(1, 2, 5), 2, 0.0, q4(1, 2, 5)), "tau"),
    (lambda: ref.live_tokens(torch.zeros(1, 2, 5, dtype=torch.bool), 2, 5), "t: expected an int in"),
    (lambda: ref.compression_loss(q4(2, 3, 4), 0.5), "hard: expected a 4-D"),
    (lambda: ref.compression_loss(q4(1, 2, 3, 4), 1.5), "target"),
    (lambda: ref.adapter_eviction_logits(q4(1, 3, 8), torch.ones(7), q4(2, 8)), "norm_weight"),
    (lambda: ref.adapter_eviction_logits(q4(1, 3, 8), torch.ones(8), q4(2, 7)), "proj_weight"),
    (lambda: ref.adapter_eviction_logits(q4(1, 3, 8), torch.ones(8), q4(2, 8), torch.zeros(3)), "proj_bias"),
    (lambda: ref.sink_mask(torch.arange(4), 2), "positions: expected a 2-D"),
    (lambda: ref.sink_mask(torch.arange(4.0)[None], 2), "positions: expected an integer"),
    (lambda: ref.sink_mask(torch.arange(4)[None], -1), "sink_tokens: expected an int >= 0"),
    (lambda: ref.sink_mask(torch.arange(4)[None], 2.0), "sink_tokens"),
    (lambda: ref.keep_sinks(q4(1, 2, 4), torch.zeros(1, 5, dtype=torch.bool)), "mask: expected shape"),
    (lambda: ref.keep_sinks(q4(1, 2, 4), torch.zeros(1, 4)), "mask: expected dtype torch.bool"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
