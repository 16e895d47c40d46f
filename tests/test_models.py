"""Models: building, loading, pairing teacher and student, and scoring completion positions."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY, make_model
from torch import nn

from gkd.data import collate, tokenize_records
from gkd.errors import ModelError
from gkd.models import (
    Scorer,
    apply_lora,
    build_model,
    causal_inputs,
    check_teacher_student,
    disable_dropout,
    eval_mode,
    fused_head_supported,
    is_seq2seq,
    load_model,
    load_tokenizer,
    output_rows,
    score_positions,
    unwrap,
)


def _batch(tokenizer, records, n=4):
    data = tokenize_records(records[:n], tokenizer, max_prompt_length=64, max_completion_length=16)
    return collate(data.examples, tokenizer.pad_token_id)


def _reference_logits(model, batch):
    """Logits predicting each valid completion token from a plain forward of each unpadded row (row-major)."""
    rows = []
    for i in range(batch.size):
        prompt = batch.prompt_ids[i][batch.prompt_mask[i]]
        completion = batch.completion_ids[i][batch.completion_mask[i]]
        if is_seq2seq(model):
            rows.append(model(input_ids=prompt[None], labels=completion[None]).logits[0])
        else:
            logits = model(torch.cat([prompt, completion])[None]).logits[0]
            # the output at position t predicts token t + 1
            rows.append(logits[len(prompt) - 1 : len(prompt) - 1 + len(completion)])
    return torch.cat(rows)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------
# building and pairing
# ---------------------------------------------------------------------------------------------------------------
def test_build_model_is_deterministic_per_seed(tokenizer):
    a, b = make_model("llama_student", tokenizer, seed=3), make_model("llama_student", tokenizer, seed=3)
    c = make_model("llama_student", tokenizer, seed=4)
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    cfg = a.config
    assert cfg.vocab_size == len(tokenizer) and cfg.hidden_size == TINY["llama_student"]["hidden_size"]
    assert (cfg.pad_token_id, cfg.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)


def test_build_model_kinds_and_vocab_rows(tokenizer):
    llama = make_model("llama_student", tokenizer)
    t5 = make_model("t5", tokenizer)
    assert not is_seq2seq(llama) and is_seq2seq(t5)
    assert t5.config.decoder_start_token_id == tokenizer.pad_token_id
    assert output_rows(llama) == output_rows(t5) == len(tokenizer)
    padded = build_model({**TINY["llama_student"], "vocab_size": len(tokenizer) + 8}, tokenizer, seed=0)
    assert output_rows(padded) == len(tokenizer) + 8


def test_check_teacher_student_accepts_padded_output_layers(tokenizer, llama_pair):
    student, teacher = llama_pair
    assert check_teacher_student(student, teacher, tokenizer, tokenizer) == len(tokenizer)
    padded = build_model({**TINY["llama_teacher"], "vocab_size": len(tokenizer) + 8}, tokenizer, seed=0)
    # extra rows beyond the tokenizer are padding: compared over the tokenizer's real length
    assert check_teacher_student(student, padded, tokenizer, None) == len(tokenizer)


def test_check_teacher_student_errors(tokenizer, llama_pair):
    from gkd.tasks import get_task

    student, teacher = llama_pair
    with pytest.raises(ModelError, match=r"teacher and student tokenizers differ"):
        check_teacher_student(student, teacher, tokenizer, get_task("arithmetic").build_tokenizer())
    other_eos = copy.deepcopy(tokenizer)
    other_eos.eos_token = "<unk>"
    with pytest.raises(ModelError, match=r"different EOS ids \(2 vs 1\)"):
        check_teacher_student(student, teacher, tokenizer, other_eos)
    short = build_model({**TINY["llama_teacher"], "vocab_size": len(tokenizer) - 4}, tokenizer, seed=0)
    with pytest.raises(
        ModelError, match=f"the teacher's output layer has {len(tokenizer) - 4} rows but the tokenizer"
    ):
        check_teacher_student(student, short, tokenizer, tokenizer)
    with pytest.raises(ModelError, match="the student's output layer"):
        check_teacher_student(short, teacher, tokenizer, tokenizer)
    t5 = make_model("t5", tokenizer)
    with pytest.raises(
        ModelError, match=r"the teacher is seq2seq \(encoder-decoder\) but the student is causal"
    ):
        check_teacher_student(student, t5, tokenizer, tokenizer)
    with pytest.raises(
        ModelError, match=r"the teacher is causal \(decoder-only\) but the student is seq2seq"
    ):
        check_teacher_student(t5, teacher, tokenizer, tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------------------------
def test_causal_inputs_drop_the_last_completion_column_and_count_positions_from_the_first_token():
    prompt_ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    prompt_mask = prompt_ids != 0
    completion_ids = torch.tensor([[3, 1, 0], [4, 4, 1]])
    completion_mask = torch.tensor([[True, True, False], [True, True, True]])
    ids, mask, positions = causal_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask)
    assert ids.tolist() == [[0, 5, 6, 3, 1], [7, 8, 9, 4, 4]]
    assert mask.tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert positions.tolist() == [[0, 0, 1, 2, 3], [0, 1, 2, 3, 4]]


def test_fused_scoring_equals_a_plain_forward_at_completion_positions(tokenizer, records, llama_pair):
    _, model = llama_pair
    model.eval()
    batch = _batch(tokenizer, records)
    assert fused_head_supported(model)
    with torch.no_grad():
        out = score_positions(
            model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask
        )
        ref = _reference_logits(model, batch)
    assert out.logits is None and out.head is not None
    assert out.hidden.shape == (batch.num_tokens(), TINY["llama_teacher"]["hidden_size"])
    torch.testing.assert_close(out.head.logits(out.hidden), ref, atol=1e-5, rtol=1e-4)
    # the plain path gives the same logits directly
    with torch.no_grad():
        plain = score_positions(
            model,
            batch.prompt_ids,
            batch.prompt_mask,
            batch.completion_ids,
            batch.completion_mask,
            fused=False,
        )
    assert plain.hidden is None and plain.head is None
    torch.testing.assert_close(plain.logits, ref, atol=1e-5, rtol=1e-4)


def test_scoring_a_padded_head_keeps_the_tokenizer_entries(tokenizer, records):
    vocab = len(tokenizer)
    model = build_model({**TINY["llama_student"], "vocab_size": vocab + 8}, tokenizer, seed=0).eval()
    batch = _batch(tokenizer, records, n=2)
    args = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    with torch.no_grad():
        ref = _reference_logits(model, batch)[:, :vocab]
        fused = score_positions(model, *args, vocab=vocab)
        plain = score_positions(model, *args, vocab=vocab, fused=False)
    assert fused.head.size == vocab
    torch.testing.assert_close(fused.head.logits(fused.hidden), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(plain.logits, ref, atol=1e-5, rtol=1e-4)


def test_seq2seq_scoring_equals_a_plain_forward(tokenizer, records):
    model = make_model("t5", tokenizer).eval()
    batch = _batch(tokenizer, records)
    assert not fused_head_supported(model)
    with torch.no_grad():
        out = score_positions(
            model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask
        )
        ref = _reference_logits(model, batch)
    assert out.hidden is None and out.logits.shape == (batch.num_tokens(), len(tokenizer))
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-4)


def test_logit_transforms_use_the_plain_path(tokenizer):
    model = make_model("llama_student", tokenizer)
    assert fused_head_supported(model)
    model.config.final_logit_softcapping = 30.0
    assert not fused_head_supported(model)


def test_scorer_module_matches_score_positions_and_carries_gradients(tokenizer, records, llama_pair):
    student, _ = llama_pair
    batch = _batch(tokenizer, records, n=3)
    args = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    scorer = Scorer(student, vocab=len(tokenizer))
    out = scorer(*args)
    assert dict(scorer.named_children()) == {"model": student}  # wrappers (DDP) see the model's parameters
    torch.testing.assert_close(out.hidden, score_positions(student, *args, vocab=len(tokenizer)).hidden)
    out.head.logits(out.hidden).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in student.parameters())
    plain = Scorer(student, vocab=len(tokenizer), fused=False)(*args)
    assert plain.hidden is None and plain.logits.shape == (batch.num_tokens(), len(tokenizer))


# ---------------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------------
def test_load_model_and_tokenizer_round_trip(tokenizer, tmp_path):
    model = make_model("llama_student", tokenizer, seed=5)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"), what="student")
    assert type(loaded) is type(model)
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    assert (
        next(load_model(str(tmp_path / "m"), what="student", dtype="bfloat16").parameters()).dtype
        == torch.bfloat16
    )
    tok = load_tokenizer(str(tmp_path / "m"))
    assert tok.get_vocab() == tokenizer.get_vocab()
    assert (tok.pad_token_id, tok.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    text = "a b c"
    assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]

    t5 = make_model("t5", tokenizer)
    t5.save_pretrained(tmp_path / "t5")
    assert is_seq2seq(load_model(str(tmp_path / "t5"), what="teacher"))


def test_load_tokenizer_uses_eos_as_pad_when_there_is_none(tokenizer, tmp_path):
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tok.pad_token_id == tok.eos_token_id == tokenizer.eos_token_id


def test_loading_a_missing_path_is_one_line(tmp_path):
    missing = str(tmp_path / "missing")
    for load in (lambda p: load_model(p, what="teacher"), lambda p: load_tokenizer(p, what="teacher")):
        with pytest.raises(ModelError) as e:
            load(missing)
        msg = str(e.value)
        assert msg.startswith(f"teacher '{missing}' is not a local folder") and "\n" not in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="could not be loaded: ") as e:
        load_model(str(tmp_path / "empty"), what="student")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# LoRA, dropout, wrappers
# ---------------------------------------------------------------------------------------------------------------
def test_apply_lora_trains_only_adapter_weights(tokenizer, records):
    model = make_model("llama_student", tokenizer).eval()
    batch = _batch(tokenizer, records, n=2)
    args = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    with torch.no_grad():
        before = score_positions(model, *args, fused=False).logits
    peft_model = apply_lora(model, r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("lora_" in n for n, p in peft_model.named_parameters())
    assert unwrap(peft_model) is model
    # the adapter starts as the identity (B = 0), so scores are unchanged
    with torch.no_grad():
        after = score_positions(peft_model, *args, fused=False).logits
    torch.testing.assert_close(after, before)
    with pytest.raises(ModelError, match=r"LoRA could not be applied: .*check lora\.target_modules"):
        apply_lora(make_model("llama_student", tokenizer), r=2, alpha=4, dropout=0.0, target_modules=["nope"])


def _dropout_t5(tokenizer):
    model = build_model({**TINY["t5"], "dropout_rate": 0.5}, tokenizer, seed=0).train()
    ids, labels = torch.tensor([[3, 4, 5, 6, 1]]), torch.tensor([[7, 8, 1]])
    return model, lambda: model(input_ids=ids, labels=labels).logits


def test_disable_dropout_zeroes_every_dropout_module(tokenizer):
    model, forward = _dropout_t5(tokenizer)
    torch.manual_seed(0)
    assert not torch.equal(forward(), forward())
    modules = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert modules and all(m.p == 0.5 for m in modules)
    disable_dropout(model)
    assert all(m.p == 0.0 for m in modules)
    assert model.training  # only dropout changes, not the mode


def test_disable_dropout_makes_training_forwards_deterministic(tokenizer):
    # T5 applies attention dropout from a float attribute, Llama from `attention_dropout`: both must go too
    llama = build_model({**TINY["llama_student"], "attention_dropout": 0.5}, tokenizer, seed=0).train()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    for model, forward in (_dropout_t5(tokenizer), (llama, lambda: llama(input_ids=ids).logits)):
        torch.manual_seed(0)
        assert not torch.equal(forward(), forward())
        disable_dropout(model)
        torch.testing.assert_close(forward(), forward(), atol=0, rtol=0)


def test_unwrap_and_eval_mode(tokenizer):
    model = make_model("llama_student", tokenizer).train()

    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert unwrap(Wrapper(Wrapper(model))) is model
    with eval_mode(model):
        assert not model.training
    assert model.training
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError
    assert model.training  # restored on error too


# ---------------------------------------------------------------------------------------------------------------
# context length and configs, read without loading weights
# ---------------------------------------------------------------------------------------------------------------
def test_context_length_of_tiny_configs():
    from transformers import GPT2Config, LlamaConfig, Qwen2Config, T5Config

    from gkd.models import context_length

    assert context_length(LlamaConfig(max_position_embeddings=64)) == 64
    assert context_length(Qwen2Config(max_position_embeddings=128)) == 128
    assert context_length(GPT2Config(n_positions=32)) == 32
    assert context_length(T5Config()) is None  # relative attention: no hard limit
    assert context_length(T5Config(n_positions=512)) is None  # old T5 configs carry an unused n_positions
    from transformers import PretrainedConfig

    assert context_length(PretrainedConfig()) is None
    assert context_length(PretrainedConfig(max_sequence_length=48)) == 48
    assert context_length(PretrainedConfig(seq_length=40)) == 40


def test_load_config_reads_a_folder_without_loading_weights(tokenizer, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from gkd.models import context_length, load_config

    make_model("llama_student", tokenizer).save_pretrained(tmp_path / "m")

    def no_weights(*a, **k):
        raise AssertionError("load_config must not load weights")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    cfg = load_config(str(tmp_path / "m"), "student")
    assert (
        cfg.model_type == "llama" and context_length(cfg) == TINY["llama_student"]["max_position_embeddings"]
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="student") as e:
        load_config(str(tmp_path / "empty"), "student")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# LoRA results: adapter folders load (merged) from anywhere; merged folders load with from_pretrained
# ---------------------------------------------------------------------------------------------------------------
def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def lora_run(tokenizer, tmp_path, monkeypatch):
    """A LoRA student trained from the RELATIVE path ``models/base`` and saved as an adapter checkpoint."""
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    base = make_model("llama_student", tokenizer, seed=3)
    base.save_pretrained(work / "models" / "base")
    tokenizer.save_pretrained(work / "models" / "base")
    monkeypatch.chdir(work)
    student = load_model("models/base", what="student")
    peft_model = apply_lora(student, r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(0)
    with torch.no_grad():  # B = 0 at init: make the adapter matter
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    peft_model.eval()
    ckpt = work / "runs" / "lora" / "checkpoint-5"
    peft_model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    return peft_model, work, ckpt


def test_apply_lora_records_an_absolute_base_path(lora_run):
    import json

    _, work, ckpt = lora_run
    saved = json.loads((ckpt / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(work / "models" / "base")
    assert not (ckpt / "config.json").exists()


def test_an_adapter_folder_loads_merged_from_another_cwd(lora_run, tmp_path, monkeypatch, tokenizer):
    from peft import PeftModel

    from gkd.models import load_config

    peft_model, work, ckpt = lora_run
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9]])
    expected = _logits(peft_model, ids)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    merged = load_model(str(ckpt), what="model")
    assert not isinstance(merged, PeftModel) and not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, ids), expected)
    assert not torch.allclose(_logits(load_model(str(work / "models" / "base"), what="m"), ids), expected)
    # relative to the new cwd too
    monkeypatch.chdir(work / "runs")
    torch.testing.assert_close(_logits(load_model("lora/checkpoint-5", what="model"), ids), expected)
    # unmerged, with a trainable adapter (resuming a LoRA student)
    unmerged = load_model("lora/checkpoint-5", what="student", merge=False)
    assert isinstance(unmerged, PeftModel)
    trainable = [n for n, p in unmerged.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    torch.testing.assert_close(_logits(unmerged.eval(), ids), expected)
    # its tokenizer and config (the base model's)
    assert load_tokenizer("lora/checkpoint-5").get_vocab() == tokenizer.get_vocab()
    assert load_config("lora/checkpoint-5", "model").model_type == "llama"


def test_an_adapter_saved_with_a_relative_base_path_is_found_from_a_parent_folder(
    lora_run, tmp_path, monkeypatch
):
    import json

    peft_model, _, ckpt = lora_run
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = (
        "models/base"  # as older checkpoints recorded it: relative to the run's cwd
    )
    (ckpt / "adapter_config.json").write_text(json.dumps(cfg))
    monkeypatch.chdir(tmp_path)
    ids = torch.tensor([[3, 4, 5, 6]])
    torch.testing.assert_close(_logits(load_model(str(ckpt), what="m"), ids), _logits(peft_model, ids))


def test_an_adapter_whose_base_is_missing_is_one_line(lora_run, tmp_path, monkeypatch):
    import json

    _, _, ckpt = lora_run
    for base in ("models/gone", str(tmp_path / "gone")):
        cfg = json.loads((ckpt / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = base
        (ckpt / "adapter_config.json").write_text(json.dumps(cfg))
        with pytest.raises(ModelError) as e:
            load_model(str(ckpt), what="teacher")
        msg = str(e.value)
        assert "\n" not in msg and str(ckpt) in msg and base in msg and "base_model_name_or_path" in msg


def test_save_merged_writes_a_plain_transformers_folder(lora_run, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gkd.models import save_merged

    peft_model, _, _ = lora_run
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9]])
    expected = _logits(peft_model, ids)
    before = _state(peft_model)
    save_merged(peft_model, tokenizer, tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").exists()
    assert list((tmp_path / "merged").glob("*.safetensors"))
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    torch.testing.assert_close(_logits(plain, ids), expected)
    assert AutoTokenizer.from_pretrained(str(tmp_path / "merged")).get_vocab() == tokenizer.get_vocab()
    # the training model is untouched: same adapter modules, same weights, same outputs
    after = peft_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(_logits(peft_model, ids), expected, atol=0, rtol=0)
    # a plain model is saved as is
    save_merged(unwrap(make_model("llama_student", tokenizer)), None, tmp_path / "plain")
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain")) is not None


# ---------------------------------------------------------------------------------------------------------------
# mistyped local paths never go to the hub
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def no_hub(monkeypatch):
    """Every transformers loader raises if called: nothing may reach ``from_pretrained`` (or the hub)."""
    import huggingface_hub
    import transformers

    calls = []

    def boom(*a, **k):
        calls.append(a)
        raise AssertionError(f"the hub must not be queried: {a}")

    for cls in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM", "AutoModelForSeq2SeqLM"):
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", boom)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", boom)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", boom)
    return calls


@pytest.mark.parametrize(
    "path", ["runs/nope", "./nope", "../nope", "a/b/c", "~/gkd-surely-absent-xyz", "/gkd-nope"]
)
def test_a_mistyped_local_path_fails_at_once_without_the_hub(path, tmp_path, monkeypatch, no_hub):
    import time

    from gkd.errors import GKDError
    from gkd.models import load_config

    work = tmp_path / "work"
    (work / "runs").mkdir(parents=True)
    monkeypatch.chdir(work)
    loaders = {
        "model": lambda p: load_model(p, what="model"),
        "tokenizer": lambda p: load_tokenizer(p, "tokenizer"),
        "config": lambda p: load_config(p, "model"),
    }
    for name, load in loaders.items():
        start = time.perf_counter()
        with pytest.raises(GKDError) as e:
            load(path)
        assert time.perf_counter() - start < 0.5, name
        msg = str(e.value)
        assert "\n" not in msg and f"'{path}'" in msg and "does not exist; check the path" in msg, msg
    assert no_hub == []


def test_a_hub_id_still_goes_to_the_hub(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)  # no 'org' folder here: 'org/name' can only be a hub id
    with pytest.raises(AssertionError, match="hub must not be queried"):
        load_model("org/name", what="model")
    assert no_hub


def test_an_adapter_folder_without_tokenizer_files_gives_the_base_tokenizer(lora_run, tokenizer):
    peft_model, work, _ = lora_run
    bare = work / "bare-adapter"
    peft_model.save_pretrained(bare)
    assert load_tokenizer(str(bare)).get_vocab() == tokenizer.get_vocab()


def test_an_adapter_whose_base_is_itself_is_one_line(lora_run):
    import json

    _, _, ckpt = lora_run
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(ckpt)
    (ckpt / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="is itself") as e:
        load_model(str(ckpt), what="model")
    assert "\n" not in str(e.value)
