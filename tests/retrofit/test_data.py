"""Offline retrofit data: stdlib documents, synthetic tasks with exact answers, packing."""

import json
import random

import pytest

from dms_runtime.retrofit.data import (batches, pack, passkey_task, stdlib_documents, synthetic_documents,
                                       text_documents, variable_tracking_task)


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 251 for c in text]}


def test_stdlib_documents_exist_offline():
    docs = list(stdlib_documents(limit=3))
    assert len(docs) == 3 and all("def " in d or "import" in d for d in docs)


def test_synthetic_tasks_hold_their_answers():
    rng = random.Random(0)
    q, a = passkey_task(200, rng)
    assert a.strip() in q and q.endswith("The pass key is")
    q, a = variable_tracking_task(200, 3, rng)
    assert a.strip() in q and q.count("VAR ") >= 4
    assert len(list(synthetic_documents(4, 50))) == 4


def test_pack_and_batch():
    seqs = list(pack(["abcdef", "ghij", "klmnopqrs"], CharTokenizer(), 5, eos_id=0))
    assert all(len(s) == 5 for s in seqs) and len(seqs) == 4  # 6+1 + 4+1 + 9+1 = 22 tokens -> 4 x 5
    b = list(batches(seqs, 3))
    assert len(b) == 1 and tuple(b[0].shape) == (3, 5)
    with pytest.raises(ValueError, match="seq_len"):
        list(pack(["x"], CharTokenizer(), 1))


def test_text_and_jsonl_readers(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert list(text_documents([tmp_path / "a.txt", tmp_path / "b.jsonl"])) == ["hello", "one", "two"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="no 'text' field"):
        list(text_documents([tmp_path / "c.jsonl"]))
    with pytest.raises(FileNotFoundError, match="data:"):
        list(text_documents([tmp_path / "missing.txt"]))


def test_self_distillation_is_generated_once_and_cached(tiny_with_tokenizer, tmp_path):
    import dms_runtime as dr
    from dms_runtime.retrofit.data import self_distillation_documents, self_distillation_prompts

    assert self_distillation_prompts(5, seed=1) == self_distillation_prompts(5, seed=1)
    assert len(set(self_distillation_prompts(20, seed=1))) > 10
    lm = dr.load(tiny_with_tokenizer)
    docs = self_distillation_documents(lm, 3, seed=2, max_new_tokens=6, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.jsonl"))
    assert len(docs) == 3 and len(files) == 1 and "<|im_start|>assistant" in docs[0]
    again = self_distillation_documents(lm, 3, seed=2, max_new_tokens=6, cache_dir=tmp_path)
    assert again == docs  # read back from the cache
