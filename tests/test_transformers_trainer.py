"""todi_ext.integrations.transformers.DistillationTrainer on tiny random
Llama and GPT-2 models built from configs (no hub access)."""

import os
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

import todi_ext  # noqa: E402
from todi_ext import reference  # noqa: E402
from todi_ext.integrations.transformers import DistillationTrainer  # noqa: E402

VOCAB = 211


def llama(hidden, seed, vocab=VOCAB, tied=False):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg)


def gpt2(hidden, seed):
    torch.manual_seed(seed)
    # No dropout: the comparisons call the model more than once.
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                     eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def batch(n=4, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (n, length), generator=g)
    labels = input_ids.clone()
    labels[:, :3] = -100  # a prompt
    labels[0, -4:] = -100  # padding
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


class Rows(torch.utils.data.Dataset):
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return self.data["input_ids"].shape[0]

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.data.items()}


def make_trainer(tmp_path, student, teacher, **kwargs):
    args = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", max_steps=2, save_strategy="no",
                logging_strategy="no", seed=0, dataloader_num_workers=0, disable_tqdm=True)
    args.update(kwargs.pop("args", {}))
    loss_kwargs = dict(divergence="todi", temperature=2.0, hard_label_weight=0.5, soft_label_weight=0.5)
    loss_kwargs.update(kwargs)
    return DistillationTrainer(model=student, teacher_model=teacher, args=TrainingArguments(**args),
                               train_dataset=Rows(batch(8, seed=1)), **loss_kwargs)


def by_hand(student, teacher, inputs, divergence="todi", **kw):
    """hard * CE + soft * divergence on shifted logits, mean over counted tokens (float64)."""
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    s = student(**model_inputs).logits[:, :-1].double()
    with torch.no_grad():
        t = teacher(**model_inputs).logits[:, :-1].double()
    y = inputs["labels"][:, 1:]
    ce = F.cross_entropy(s.flatten(0, 1), y.flatten(), ignore_index=-100)
    kd = reference.distill_loss(s, t, y, divergence=divergence, temperature=2.0, **kw)
    return 0.5 * ce + 0.5 * kd


@pytest.mark.parametrize("fused_linear", [True, False])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compute_loss_is_the_formula_on_shifted_logits(tmp_path, fused_linear, arch):
    make = llama if arch == "llama" else gpt2
    student, teacher = make(32, seed=0), make(48, seed=1)
    trainer = make_trainer(tmp_path, student, teacher, fused_linear=fused_linear)
    inputs = batch()
    expected = by_hand(student, teacher, inputs)
    got = trainer.compute_loss(trainer.model, dict(inputs))
    torch.testing.assert_close(got.double(), expected, rtol=2e-5, atol=1e-6)
    # Normalised by the tokens of the accumulated batch when the Trainer gives their count.
    count = int((inputs["labels"][:, 1:] != -100).sum())
    got_sum = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=torch.tensor(2 * count))
    torch.testing.assert_close(got_sum.double(), expected / 2, rtol=2e-5, atol=1e-6)
    assert trainer.fused_linear == fused_linear


def test_both_paths_give_the_same_gradient(tmp_path):
    grads = []
    for fused_linear in (True, False):
        student, teacher = llama(32, seed=0), llama(48, seed=1)
        trainer = make_trainer(tmp_path, student, teacher, fused_linear=fused_linear, divergence="fkl")
        trainer.compute_loss(trainer.model, batch()).backward()
        grads.append({n: p.grad.clone() for n, p in student.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_a_bf16_model_is_as_accurate_on_the_fused_path_as_on_the_logits_path(tmp_path, device):
    # A bf16 student and teacher (on the GPU when there is one; the GPU round runs this file): both
    # paths against a float64 run of the same (bf16-rounded) weights, held to the accuracy bound of
    # test_accuracy.py. The logits path rounds the logits to bf16, the fused path keeps them in
    # float32, so the fused path may not be the less accurate; then both train.
    inputs = batch()
    student = llama(32, seed=0).to(torch.bfloat16).to(device, torch.float64)
    teacher = llama(48, seed=1).to(torch.bfloat16).to(device, torch.float64)
    loss = by_hand(student, teacher, {k: v.to(device) for k, v in inputs.items()})
    loss.backward()
    exact = {"loss": loss.detach(), **{n: p.grad for n, p in student.named_parameters()}}
    errors = {}
    for fused_linear in (True, False):
        student = llama(32, seed=0).to(device, torch.bfloat16)
        teacher = llama(48, seed=1).to(device, torch.bfloat16)
        trainer = make_trainer(tmp_path, student, teacher, fused_linear=fused_linear,
                               args=dict(use_cpu=device == "cpu"))
        loss = trainer.compute_loss(trainer.model, {k: v.to(device) for k, v in inputs.items()})
        loss.backward()
        assert trainer.fused_linear == fused_linear and loss.device.type == device
        got = {"loss": loss.detach(), **{n: p.grad for n, p in student.named_parameters()}}
        errors[fused_linear] = {n: float((got[n].double() - exact[n]).norm()) for n in exact}
        before = {n: p.detach().clone() for n, p in student.named_parameters()}
        trainer.train()
        assert all(torch.isfinite(p).all() for p in student.parameters())
        assert any(not torch.equal(p, before[n]) for n, p in student.named_parameters())
    for name, exact_value in exact.items():
        scale = float(exact_value.norm())
        fused, logits_path = errors[True][name], errors[False][name]
        assert fused <= 4 * logits_path + 1e-6 * scale, (
            f"{name}: error {fused:.3e} vs the logits path's {logits_path:.3e}")


def test_training_changes_the_student_not_the_teacher(tmp_path):
    student, teacher = llama(32, seed=0), llama(48, seed=1)
    before_s = {n: p.clone() for n, p in student.named_parameters()}
    before_t = {n: p.clone() for n, p in teacher.named_parameters()}
    trainer = make_trainer(tmp_path, student, teacher)
    trainer.train()
    assert any(not torch.equal(p, before_s[n]) for n, p in student.named_parameters())
    assert all(torch.equal(p, before_t[n]) for n, p in teacher.named_parameters())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_gradient_accumulation_gives_the_big_batch_update(tmp_path):
    results = []
    for batch_size, accumulation in ((4, 1), (2, 2), (1, 4)):
        student, teacher = llama(32, seed=0), llama(48, seed=1)
        trainer = make_trainer(tmp_path, student, teacher, args=dict(per_device_train_batch_size=batch_size,
                                                                      gradient_accumulation_steps=accumulation,
                                                                      max_steps=1))
        trainer.train()
        results.append({n: p.detach().clone() for n, p in student.named_parameters()})
    for other in results[1:]:
        for name, p in results[0].items():
            torch.testing.assert_close(other[name], p, rtol=1e-4, atol=1e-6, msg=name)


def test_checkpoint_has_no_teacher_weights(tmp_path):
    student, teacher = llama(32, seed=0), llama(48, seed=1)
    trainer = make_trainer(tmp_path, student, teacher)
    trainer.save_model(str(tmp_path / "saved"))
    from safetensors.torch import load_file

    files = [f for f in os.listdir(tmp_path / "saved") if f.endswith(".safetensors")]
    state = {}
    for f in files:
        state.update(load_file(str(tmp_path / "saved" / f)))
    assert set(state) <= set(student.state_dict())
    assert all(48 not in t.shape for t in state.values())  # nothing of the teacher's width


@pytest.mark.parametrize("fused_linear", [True, False])
def test_a_batch_with_no_counted_token_leaves_the_weights_finite(tmp_path, fused_linear):
    # Once 0 / 0: a NaN gradient in every weight, while the logged loss read 0.
    student, teacher = llama(32, seed=0), llama(48, seed=1)
    trainer = make_trainer(tmp_path, student, teacher, fused_linear=fused_linear, args=dict(max_steps=1))
    inputs = batch(4, seed=3)
    inputs["labels"][:] = -100
    loss = trainer.compute_loss(student, inputs, num_items_in_batch=torch.tensor(0))
    loss.backward()
    assert loss.item() == 0
    assert all(p.grad is None or not p.grad.any() for p in student.parameters())
    student.zero_grad()
    trainer.train_dataset = Rows(inputs)
    trainer.train()
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_setups_that_cannot_work_are_named(tmp_path):
    student, teacher = llama(32, seed=0), llama(48, seed=1)
    with pytest.raises(ValueError, match="teacher_model is the student model itself"):
        make_trainer(tmp_path, student, student)
    with pytest.raises(TypeError, match="fused_linear must be a bool, got str"):
        make_trainer(tmp_path, student, teacher, fused_linear="no")
    with pytest.raises(ValueError, match=r"label_smoothing_factor must be in \[0, 1\], got 1.5"):
        make_trainer(tmp_path, student, teacher, args=dict(label_smoothing_factor=1.5))
    trainer = make_trainer(tmp_path, student, teacher)
    inputs = batch(2)
    del inputs["labels"]
    with pytest.raises(ValueError, match="DistillationTrainer needs labels in every batch"):
        trainer.compute_loss(student, inputs)


def test_the_teacher_runs_in_eval_mode_even_if_switched_back(tmp_path):
    student, teacher = llama(32, seed=0), llama(48, seed=1)
    teacher.config.attention_dropout = 0.5
    for layer in teacher.model.layers:
        layer.self_attn.attention_dropout = 0.5
    trainer = make_trainer(tmp_path, student, teacher)
    teacher.train()  # e.g. a callback that trains it elsewhere
    inputs = batch(2)
    first = trainer.compute_loss(student, inputs).item()
    teacher.train()
    assert trainer.compute_loss(student, inputs).item() == first
    assert not teacher.training


def test_a_teacher_with_another_vocabulary_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"teacher's vocabulary size \(300\) differs from the student's \(211\)"):
        make_trainer(tmp_path, llama(32, seed=0), llama(48, seed=1, vocab=300))


def test_logits_that_are_not_a_plain_linear_map_fall_back_with_a_warning(tmp_path):
    class Scaled(LlamaForCausalLM):  # a logit scale after the lm_head (as some models have)
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    torch.manual_seed(0)
    student = Scaled(llama(32, seed=0).config)
    teacher = llama(48, seed=1)
    trainer = make_trainer(tmp_path, student, teacher)
    inputs = batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = trainer.compute_loss(trainer.model, dict(inputs))
    assert any("logits path" in str(w.message) and "changes its lm_head's output" in str(w.message) for w in caught)
    assert trainer.fused_linear is False
    torch.testing.assert_close(got.double(), by_hand(student, teacher, inputs), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("fused_linear", [True, False])
def test_evaluate_and_predict_work_on_both_paths(tmp_path, fused_linear):
    # Issue 21: with fused_linear=True, evaluate() crashed in prediction_step ((loss, None)[1:]).
    student, teacher = llama(32, seed=0), llama(48, seed=1)
    eval_data = batch(4, seed=5)
    trainer = make_trainer(tmp_path, student, teacher, fused_linear=fused_linear, eval_dataset=Rows(eval_data),
                           args=dict(eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4))
    trainer.train()  # evaluates after each step
    metrics = trainer.evaluate()
    torch.testing.assert_close(torch.tensor(metrics["eval_loss"], dtype=torch.float64),
                               by_hand(student, teacher, eval_data).detach(), rtol=2e-5, atol=1e-6)
    assert trainer.fused_linear == fused_linear
    predictions = trainer.predict(Rows(eval_data))
    assert predictions.predictions.shape == (4, 12, VOCAB)
    torch.testing.assert_close(torch.tensor(predictions.metrics["test_loss"]), torch.tensor(metrics["eval_loss"]),
                               rtol=1e-5, atol=1e-6)


def softcapped_llama(cap, seed):
    class SoftCapped(LlamaForCausalLM):  # a soft-cap its config does not mention
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = cap * torch.tanh(out.logits / cap)
            return out

    torch.manual_seed(seed)
    return SoftCapped(llama(32, seed=seed).config)


def test_a_soft_cap_is_found_while_the_logits_are_still_small(tmp_path):
    # Issue 21: at initialisation 30 tanh(x / 30) ~ x to 1e-4, so comparing the first batch's logits kept the
    # fused path, and once the logits grew the loss was silently wrong. The model returning another tensor than
    # the lm_head's output shows at any logit size.
    student, teacher = softcapped_llama(30.0, seed=0), llama(48, seed=1)
    inputs = batch()
    with torch.no_grad():
        logits = student(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    assert float(logits.abs().max()) < 1  # small: 30 tanh(x / 30) is x to within 1e-4 here
    trainer = make_trainer(tmp_path, student, teacher)
    with pytest.warns(UserWarning, match="changes its lm_head's output before returning it"):
        trainer.compute_loss(trainer.model, dict(inputs))
    assert trainer.fused_linear is False
    # Grown logits (a trained head): the trainer's loss is still that of the model's real logits.
    with torch.no_grad():
        student.lm_head.weight.mul_(300.0)
    got = trainer.compute_loss(trainer.model, dict(inputs))
    torch.testing.assert_close(got.double(), by_hand(student, teacher, inputs), rtol=2e-5, atol=1e-6)


def test_gemma2_with_its_soft_cap_uses_the_logits_path(tmp_path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    def gemma2(hidden, seed):
        torch.manual_seed(seed)
        cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                           final_logit_softcapping=30.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        return Gemma2ForCausalLM(cfg)

    student, teacher = gemma2(32, seed=0), gemma2(48, seed=1)
    with torch.no_grad():  # logits of ~30 and more, where the cap matters
        student.lm_head.weight.mul_(200.0)
    inputs = batch()
    trainer = make_trainer(tmp_path, student, teacher)
    with pytest.warns(UserWarning, match="final_logit_softcapping=30.0"):
        got = trainer.compute_loss(trainer.model, dict(inputs))
    assert trainer.fused_linear is False
    torch.testing.assert_close(got.double(), by_hand(student, teacher, inputs), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("fused_linear", [True, False])
def test_label_smoothing_smooths_the_hard_label_term(tmp_path, fused_linear):
    # Issue 21: label_smoothing_factor was silently ignored. Hugging Face's definition, which
    # F.cross_entropy(label_smoothing=e) shares: (1 - e) CE + e mean_v(-log q_v).
    student, teacher = gpt2(32, seed=0), gpt2(48, seed=1)  # GPT-2's lm_head has no bias; Llama's neither
    trainer = make_trainer(tmp_path, student, teacher, fused_linear=fused_linear,
                           args=dict(label_smoothing_factor=0.2))
    inputs = batch()
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    s = student(**model_inputs).logits[:, :-1].double()
    with torch.no_grad():
        t = teacher(**model_inputs).logits[:, :-1].double()
    y = inputs["labels"][:, 1:]
    ce = F.cross_entropy(s.flatten(0, 1), y.flatten(), ignore_index=-100, label_smoothing=0.2)
    expected = 0.5 * ce + 0.5 * reference.distill_loss(s, t, y, temperature=2.0)
    got = trainer.compute_loss(trainer.model, dict(inputs))
    torch.testing.assert_close(got.double(), expected, rtol=2e-5, atol=1e-6)
    assert trainer.fused_linear == fused_linear
    count = int((y != -100).sum())
    got_sum = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=torch.tensor(count))
    torch.testing.assert_close(got_sum.double(), expected, rtol=2e-5, atol=1e-6)
    with pytest.raises(ValueError, match="label_smoothing_factor=0.2 smooths the hard-label cross-entropy"):
        make_trainer(tmp_path, student, teacher, hard_label_weight=0.0, args=dict(label_smoothing_factor=0.2))


def _run_study(script, out_dir):
    """Runs examples/<script> --smoke into out_dir; returns its Markdown report."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "examples", script), "--smoke", "--out", str(out_dir)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    stem = os.path.splitext(script)[0].replace("distill_study", "study").replace("_", "-")
    report = open(out_dir / f"{stem}-smoke.md").read()
    assert "Total run time" in report and os.path.exists(out_dir / f"{stem}-smoke.json")
    for method in ("hard labels", "todi", "fkl", "rkl", "akl", "js", "tvd", "skl", "srkl", "gjsd"):
        assert f"| {method} |" in report
    return report


@pytest.mark.slow
def test_the_study_runs_end_to_end(tmp_path):
    # examples/distill_study.py --smoke: corpus, tokenizer, teacher, every
    # divergence's student through DistillationTrainer, metrics, report.
    _run_study("distill_study.py", tmp_path)


@pytest.mark.slow
def test_the_task_study_runs_end_to_end(tmp_path):
    # examples/distill_study_task.py --smoke: task pairs, teacher pretrained and
    # fine-tuned, one pretrained student distilled with every divergence and
    # fine-tuned on hard labels, greedy and sampled ROUGE-L, report.
    import json

    report = _run_study("distill_study_task.py", tmp_path)
    assert "| teacher |" in report and "| student, pretrained only |" in report
    assert "Best student by sampled ROUGE-L" in report
    results = json.load(open(tmp_path / "study-task-smoke.json"))
    teacher = results["reference_rows"]["teacher"]
    assert teacher["kl_teacher_student"] == 0 and teacher["kl_student_teacher"] == 0  # the teacher against itself
    for runs in results["runs"].values():
        for r in runs:
            assert 0 <= r["rouge_l_sampled"] <= 100 and 0 <= r["rouge_l_greedy"] <= 100 and r["task_loss"] > 0


def _exit_without_finalizing():
    # A worker that finished its checks leaves without interpreter finalization:
    # there, after destroy_process_group() has returned, a std::thread of the
    # gloo/trainer stack (none of ours) is sometimes still joinable when it is
    # destroyed - "terminate called without an active exception", SIGABRT with
    # no Python frame (1 run in 4 of the FSDP2 test here, 2026-12-06; failed CI).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    student, teacher = llama(32, seed=0), llama(48, seed=1)
    import pathlib

    trainer = make_trainer(pathlib.Path(out_dir), student, teacher,
                           args=dict(per_device_train_batch_size=2, max_steps=1, ddp_backend="gloo"))
    try:
        trainer.train()
        if rank == 0:
            torch.save({n: p.detach() for n, p in student.named_parameters()}, os.path.join(out_dir, "ddp.pt"))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    _exit_without_finalizing()


@pytest.mark.slow
def test_ddp_with_two_gloo_processes_gives_the_single_process_update(tmp_path):
    # 2 processes x 2 sequences against 1 process x 4: the same step (the
    # token count is summed across processes and DDP's average undone).
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, start_method="spawn")
    ddp = torch.load(tmp_path / "ddp.pt")
    student, teacher = llama(32, seed=0), llama(48, seed=1)
    make_trainer(tmp_path, student, teacher, args=dict(per_device_train_batch_size=4, max_steps=1)).train()
    for name, p in student.named_parameters():
        torch.testing.assert_close(ddp[name], p.detach(), rtol=1e-4, atol=1e-6, msg=name)


def _fsdp2_worker(rank, world, init_file, out_dir, layout):
    import pathlib

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        student, teacher = llama(32, seed=0, tied=layout == "tied"), llama(48, seed=1)
        for layer in student.model.layers:
            fully_shard(layer)
        if layout == "own lm_head unit":
            fully_shard(student.lm_head)
        fully_shard(student, reshard_after_forward=True)  # the root reshards too: lm_head.weight is a DTensor
        trainer = make_trainer(pathlib.Path(out_dir) / str(rank), student, teacher)
        inputs = {k: v[2 * rank:2 * rank + 2] for k, v in fsdp2_batch().items()}
        for _ in range(2):  # two steps: the second starts from resharded weights
            loss = trainer.compute_loss(trainer.model, inputs)
            loss.backward()
            with torch.no_grad():
                for p in student.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None
        assert trainer.fused_linear
        assert type(student.lm_head.weight).__name__ == "DTensor"
        # A direct call with the sharded weight: an error that names the fix.
        hidden = torch.randn(3, 32)
        with pytest.raises(TypeError, match="student_weight is a DTensor.*unshard"):
            todi_ext.fused_linear_distill_loss(hidden, student.lm_head.weight, torch.randn(3, 48),
                                               teacher.lm_head.weight)
        full = {n: p.full_tensor() for n, p in student.named_parameters()}
        if rank == 0:
            torch.save(full, os.path.join(out_dir, "fsdp2.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _exit_without_finalizing()


def fsdp2_batch():
    inputs = batch(4, seed=2)
    inputs["labels"] = inputs["input_ids"].clone()
    inputs["labels"][:, :3] = -100  # the same count on every row: the ranks' means average to the whole batch's
    return inputs


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["root reshards after forward", "own lm_head unit", "tied"])
def test_fsdp2_with_two_gloo_processes_gives_the_single_process_update(tmp_path, layout):
    # Issue 21: with lm_head.weight a sharded DTensor outside the forward, the fused path failed ("mixed
    # torch.Tensor and DTensor"). The loss now runs inside the lm_head's forward, where FSDP2 holds it whole.
    import torch.multiprocessing as mp

    mp.start_processes(_fsdp2_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path), layout), nprocs=2,
                       start_method="spawn")
    sharded = torch.load(tmp_path / "fsdp2.pt")
    student, teacher = llama(32, seed=0, tied=layout == "tied"), llama(48, seed=1)
    trainer = make_trainer(tmp_path, student, teacher)
    for _ in range(2):
        trainer.compute_loss(trainer.model, fsdp2_batch()).backward()
        with torch.no_grad():
            for p in student.parameters():
                p -= 0.1 * p.grad
                p.grad = None
    for name, p in student.named_parameters():
        torch.testing.assert_close(sharded[name], p.detach(), rtol=1e-4, atol=1e-6, msg=name)


def test_a_zero3_partitioned_weight_is_named_in_the_error():
    # DeepSpeed does not run on this CPU-only machine: its partitioned parameter (an empty tensor with a ds_id
    # outside the module's forward) is recognised by that attribute.
    hidden, weight = torch.randn(3, 8), torch.nn.Parameter(torch.empty(0))
    weight.ds_id = 7
    with pytest.raises(TypeError, match="student_weight is a DeepSpeed ZeRO-3 partitioned parameter"):
        todi_ext.fused_linear_distill_loss(hidden, weight, torch.randn(3, 8), torch.randn(11, 8))
