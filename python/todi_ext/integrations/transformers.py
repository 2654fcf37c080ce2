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


# Config fields through which Hugging Face models post-process the lm_head's
# output (Gemma 2/3, Cohere, Granite, ...): with any of them set, the logits
# are not the lm_head's linear map and the fused path would be wrong.
_LOGIT_POSTPROCESSING = {
    "final_logit_softcapping": lambda v: v is not None and v != 0,
    "logit_softcapping": lambda v: v is not None and v != 0,
    "logit_scale": lambda v: v is not None and v != 1,
    "logits_scaling": lambda v: v is not None and v != 1,
    "output_multiplier_scale": lambda v: v is not None and v != 1,
}

# The probe's logits reach this magnitude: a soft-cap (Gemma 2: 30) or a
# clamp then shows, where logits of a freshly initialised model (|x| < 1 or
# so) pass through 30 tanh(x / 30) unchanged to 1e-4.
_PROBE_LOGIT_MAGNITUDE = 1000.0


def _logit_postprocessing(model):
    """The config fields that say model post-processes its logits, as 'name=value'."""
    config = getattr(_unwrap(model), "config", None)
    return [f"{name}={getattr(config, name)}" for name, applies in _LOGIT_POSTPROCESSING.items()
            if hasattr(config, name) and applies(getattr(config, name))]


class _LmHeadInput:
    """Runs a causal LM and returns the hidden states its lm_head receives,
    while the lm_head itself computes logits for one position only (a
    forward pre-hook hands it the last position): the full logits are never
    formed. The hook goes through the model's own forward (and so through a
    DDP wrapper's gradient hooks).

    probe=True: the lm_head gets, instead of the last position, a fixed
    random vector scaled so that its logits reach _PROBE_LOGIT_MAGNITUDE;
    the model's output for it is returned with the logits the lm_head alone
    gives, so that any post-processing shows (the last position's logits
    are not part of the loss)."""

    def __init__(self, model):
        self.head = _unwrap(model).get_output_embeddings()
        self.captured = None
        self.probe_logits = None

    def __call__(self, model, inputs, probe=False):
        def hook(module, args):
            self.captured = args[0]
            last = args[0][..., -1:, :]
            if not probe:
                return (last,)
            with torch.no_grad():
                g = torch.Generator(device="cpu").manual_seed(0)
                direction = torch.randn(last.shape, generator=g, dtype=torch.float32).to(last.device)
                unit = F.linear(direction.to(last.dtype), module.weight).float().abs().max().clamp(min=1e-30)
                vector = (direction * (_PROBE_LOGIT_MAGNITUDE / unit)).to(last.dtype)
                self.probe_logits = F.linear(vector, module.weight, module.bias)[..., 0, :].float()
            return (vector,)

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
    logits are not a plain linear map of what its lm_head receives falls
    back to the logits path, with a warning, once. Such a model is found by
    its config (final_logit_softcapping, logit_scale, logits_scaling, ...),
    by its output layer (not a Linear), or by a probe on the first batch:
    the lm_head gets a vector whose logits reach 1000 in magnitude, where a
    soft-cap or a scale cannot hide. Both paths give the same loss.

    Evaluation: a loss-only prediction_step (evaluate() without
    compute_metrics) takes the fused path too; when predictions are wanted
    (predict(), compute_metrics) the loss comes from the logits path, which
    has the logits to return. TrainingArguments.label_smoothing_factor e
    smooths the hard-label term as Hugging Face defines it,
    (1 - e) CE + e mean_v(-log q_v) (it needs hard_label_weight > 0).
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
        self._logits_wanted = True  # False inside a loss-only prediction_step
        if self.args.label_smoothing_factor != 0 and hard_label_weight == 0:
            raise ValueError(
                f"label_smoothing_factor={self.args.label_smoothing_factor} smooths the hard-label cross-entropy, "
                "but hard_label_weight is 0: set hard_label_weight > 0, or label_smoothing_factor to 0"
            )
        # The Trainer counts num_items_in_batch (labels[..., 1:] != -100 over
        # the accumulated batch) only for models that take loss kwargs.
        self.model_accepts_loss_kwargs = True

    def _model_inputs(self, inputs):
        return {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}

    def _use_logits_path(self, who, why):
        warnings.warn(f"DistillationTrainer: the {who}'s logits are not a plain linear map of its lm_head input "
                      f"({why}); using the logits path (fused_linear=False)")
        self.fused_linear = False

    def _fused_inputs(self, model, inputs):
        """Hidden states and lm_head parameters of student and teacher, or None when the logits path must be used."""
        student_in, teacher_in = _LmHeadInput(model), _LmHeadInput(self.teacher_model)
        for who, runner, owner in (("student", student_in, model), ("teacher", teacher_in, self.teacher_model)):
            if not isinstance(runner.head, torch.nn.Linear):
                self._use_logits_path(who, f"its output layer is a {type(runner.head).__name__}, not a Linear")
                return None
            fields = _logit_postprocessing(owner)
            if fields:
                self._use_logits_path(who, "its config post-processes them: " + ", ".join(fields))
                return None
        probe = not self._fused_checked
        model_inputs = self._model_inputs(inputs)
        h_s, last_s = student_in(model, model_inputs, probe=probe)
        with torch.no_grad():
            h_t, last_t = teacher_in(self.teacher_model, model_inputs, probe=probe)
        if probe:
            # Once: the model's logits for large lm_head outputs must be those outputs; a soft-cap,
            # a clamp or a scale after the lm_head would make the fused loss differ from the logits path.
            for who, runner, last in (("student", student_in, last_s), ("teacher", teacher_in, last_t)):
                expected = runner.probe_logits
                tolerance = 1e-2 * float(expected.abs().max())
                if not torch.allclose(expected, last.detach().float(), rtol=0, atol=tolerance):
                    self._use_logits_path(who, "a probe with logits of magnitude "
                                               f"{_PROBE_LOGIT_MAGNITUDE:g} came back changed")
                    return None
            self._fused_checked = True
        return h_s, student_in.head, h_t, teacher_in.head

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Only the loss is wanted (evaluate() without compute_metrics): compute_loss may take the fused
        # path, which forms no logits to return.
        self._logits_wanted = not prediction_loss_only
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        finally:
            self._logits_wanted = True

    def _label_smoothing(self, label_logit, mean_logit, shifted, reduction):
        """hard_label_weight * e * (z_label - mean_v z_v), reduced like the loss: added to the
        hard-label CE it gives Hugging Face's smoothed CE, (1 - e) CE + e mean_v(-log q_v)."""
        keep = shifted != -100
        per_position = torch.where(keep, label_logit - mean_logit, torch.zeros_like(label_logit))
        total = per_position.sum()
        if reduction == "mean":
            total = total / keep.sum().clamp(min=1)
        return self.loss_params["hard_label_weight"] * self.args.label_smoothing_factor * total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        shifted = labels[..., 1:]
        safe_labels = shifted.clamp(min=0).unsqueeze(-1)  # ignored positions read entry 0, masked later
        reduction = "sum" if num_items_in_batch is not None else "mean"
        smoothing = self.args.label_smoothing_factor != 0
        use_fused = self.fused_linear and not (return_outputs and self._logits_wanted)
        fused = self._fused_inputs(model, inputs) if use_fused else None
        if fused is not None:
            h_s, head_s, h_t, head_t = fused
            hidden = h_s[..., :-1, :]
            loss = fused_linear_distill_loss(
                hidden, head_s.weight, h_t[..., :-1, :].to(h_s.dtype), head_t.weight.to(h_s.dtype),
                shifted, student_bias=head_s.bias,
                teacher_bias=None if head_t.bias is None else head_t.bias.to(h_s.dtype),
                reduction=reduction, **self.loss_params)
            if smoothing:  # z is linear in the hidden state: z_label and mean_v z_v without the logits
                weight, bias = head_s.weight.float(), head_s.bias
                label_logit = (hidden.float() * weight[safe_labels.squeeze(-1)]).sum(-1)
                mean_logit = hidden.float() @ weight.mean(0)
                if bias is not None:
                    label_logit = label_logit + bias.float()[safe_labels.squeeze(-1)]
                    mean_logit = mean_logit + bias.float().mean()
                loss = loss + self._label_smoothing(label_logit, mean_logit, shifted, reduction)
            outputs = {"loss": loss}  # no logits: prediction_step asked for the loss only
        else:
            model_inputs = self._model_inputs(inputs)
            outputs = model(**model_inputs)
            with torch.no_grad():
                teacher_logits = self.teacher_model(**model_inputs).logits
            student_logits = outputs.logits[..., :-1, :]
            loss = distill_loss(student_logits, teacher_logits[..., :-1, :], shifted,
                                reduction=reduction, **self.loss_params)
            if smoothing:
                label_logit = student_logits.gather(-1, safe_labels).squeeze(-1).float()
                mean_logit = student_logits.mean(-1, dtype=torch.float32)
                loss = loss + self._label_smoothing(label_logit, mean_logit, shifted, reduction)
        if num_items_in_batch is not None:
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices:
                # num_items_in_batch counts every process's tokens and DDP averages the
                # gradients: undo the average, as Trainer.compute_loss does.
                tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
                loss = loss * (self.accelerator.num_processes // tp if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, outputs) if return_outputs else loss
