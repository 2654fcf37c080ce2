"""A Hugging Face Trainer that distils a student from a teacher with any of
todi_ext's divergences, from hidden states and lm_head weights (the logits
are never materialised) or from logits.

    from todi_ext.integrations.transformers import DistillationTrainer
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=TrainingArguments(...),
                                  train_dataset=..., divergence="todi", temperature=2.0,
                                  hard_label_weight=0.5, soft_label_weight=0.5, fused_linear=True)
    trainer.train()

Needs `transformers` (pip install todi_ext[transformers]); importing
todi_ext itself never does.
"""

import warnings
from typing import Optional

import torch
import torch.nn.functional as F

try:
    from transformers import Trainer
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "todi_ext.integrations.transformers needs Hugging Face transformers: pip install 'todi_ext[transformers]'"
    ) from e

from .. import _validation
from ..fused_linear import fused_linear_distill_loss
from ..loss import distill_loss


def _unwrap(model):
    while hasattr(model, "module"):  # DDP, DataParallel
        model = model.module
    return model


def _vocab_size(model):
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return head.weight.shape[0]
    return model.config.vocab_size


class _LmHeadInput:
    """Runs a causal LM and returns the hidden states its lm_head receives,
    while the lm_head itself computes logits for one position only (a
    forward pre-hook hands it the last position): the full logits are never
    formed. The hook goes through the model's own forward (and so through a
    DDP wrapper's gradient hooks)."""

    def __init__(self, model):
        self.head = _unwrap(model).get_output_embeddings()
        self.captured = None

    def __call__(self, model, inputs):
        def hook(_module, args):
            self.captured = args[0]
            return (args[0][..., -1:, :],)

        handle = self.head.register_forward_pre_hook(hook)
        try:
            outputs = model(**inputs)
        finally:
            handle.remove()
        hidden, self.captured = self.captured, None
        return hidden, outputs.logits[..., -1, :]


class DistillationTrainer(Trainer):
    """transformers.Trainer whose loss is hard_label_weight * CE + soft_label_weight * divergence(student || teacher).

    Labels follow the Hugging Face convention (unshifted, -100 ignored): the
    trainer shifts them, position t predicting labels[t + 1]. The loss is
    normalised by the counted tokens of the whole accumulated batch
    (num_items_in_batch), so gradient accumulation gives the big batch's
    update. The teacher is put in eval mode with requires_grad False, moved
    to the student's device (its dtype is left as given: a bf16 teacher stays
    bf16), run under torch.no_grad(), and never saved by the trainer.

    fused_linear=True runs both decoders without forming logits and calls
    fused_linear_distill_loss with their lm_head weights; a model whose
    logits are not a plain linear map of what its lm_head receives (logit
    soft-capping, scaling, no linear output layer) falls back to the logits
    path, with a warning, once. Both paths give the same loss.
    """

    loss_is_scaled_for_ga = True  # normalised by num_items_in_batch in compute_loss

    def __init__(self, model=None, teacher_model=None, args=None, *, divergence: str = "todi",
                 temperature: float = 2.0, beta: float = 1.0, skew_lambda: float = 0.1, akl_mu: float = 0.5,
                 jsd_beta: float = 0.5, hard_label_weight: float = 0.5, soft_label_weight: float = 0.5,
                 fused_linear: bool = True, **kwargs):
        if teacher_model is None:
            raise ValueError("DistillationTrainer needs teacher_model")
        _validation.check_scalars(beta, temperature, -100)
        _validation.check_divergence(divergence, beta=beta, skew_lambda=skew_lambda, akl_mu=akl_mu, jsd_beta=jsd_beta)
        _validation.check_label_weights(soft_label_weight, hard_label_weight, with_labels=False)
        super().__init__(model=model, args=args, **kwargs)
        student_vocab, teacher_vocab = _vocab_size(_unwrap(self.model)), _vocab_size(teacher_model)
        if student_vocab != teacher_vocab:
            raise ValueError(
                f"the teacher's vocabulary size ({teacher_vocab}) differs from the student's ({student_vocab}); "
                "distillation needs one vocabulary (the same tokenizer)"
            )
        self.teacher_model = teacher_model.eval().requires_grad_(False).to(self.args.device)
        self.loss_params = dict(divergence=divergence, temperature=temperature, beta=beta, skew_lambda=skew_lambda,
                                akl_mu=akl_mu, jsd_beta=jsd_beta, hard_label_weight=hard_label_weight,
                                soft_label_weight=soft_label_weight)
        self.fused_linear = fused_linear
        self._fused_checked = False
        # The Trainer counts num_items_in_batch (labels[..., 1:] != -100 over
        # the accumulated batch) only for models that take loss kwargs.
        self.model_accepts_loss_kwargs = True

    def _model_inputs(self, inputs):
        return {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}

    def _fused_inputs(self, model, inputs):
        """Hidden states and lm_head parameters of student and teacher, or None when the logits path must be used."""
        student_in, teacher_in = _LmHeadInput(model), _LmHeadInput(self.teacher_model)
        if not isinstance(student_in.head, torch.nn.Linear) or not isinstance(teacher_in.head, torch.nn.Linear):
            return None
        model_inputs = self._model_inputs(inputs)
        h_s, last_s = student_in(model, model_inputs)
        with torch.no_grad():
            h_t, last_t = teacher_in(self.teacher_model, model_inputs)
        if not self._fused_checked:
            # Once: the model's own last-position logits must be lm_head(hidden); a soft-cap or a
            # scale after the lm_head would make the fused loss differ from the logits path.
            for who, h, last, head in (("student", h_s, last_s, student_in.head),
                                       ("teacher", h_t, last_t, teacher_in.head)):
                with torch.no_grad():
                    expected = F.linear(h[..., -1, :], head.weight, head.bias).float()
                if not torch.allclose(expected, last.float(), rtol=1e-3, atol=1e-3):
                    warnings.warn(f"DistillationTrainer: the {who}'s logits are not a plain linear map of its "
                                  "lm_head input; using the logits path (fused_linear=False)")
                    self.fused_linear = False
                    return None
            self._fused_checked = True
        return h_s, student_in.head, h_t, teacher_in.head

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        shifted = labels[..., 1:]
        reduction = "sum" if num_items_in_batch is not None else "mean"
        fused = self._fused_inputs(model, inputs) if self.fused_linear else None
        if fused is not None:
            h_s, head_s, h_t, head_t = fused
            loss = fused_linear_distill_loss(
                h_s[..., :-1, :], head_s.weight, h_t[..., :-1, :].to(h_s.dtype), head_t.weight.to(h_s.dtype),
                shifted, student_bias=head_s.bias,
                teacher_bias=None if head_t.bias is None else head_t.bias.to(h_s.dtype),
                reduction=reduction, **self.loss_params)
            outputs = None
        else:
            model_inputs = self._model_inputs(inputs)
            outputs = model(**model_inputs)
            with torch.no_grad():
                teacher_logits = self.teacher_model(**model_inputs).logits
            loss = distill_loss(outputs.logits[..., :-1, :], teacher_logits[..., :-1, :], shifted,
                                reduction=reduction, **self.loss_params)
        if num_items_in_batch is not None:
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices:
                # num_items_in_batch counts every process's tokens and DDP averages the
                # gradients: undo the average, as Trainer.compute_loss does.
                tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
                loss = loss * (self.accelerator.num_processes // tp if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, outputs) if return_outputs else loss
