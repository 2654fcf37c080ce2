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

import torch

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


def _logit_postprocessing(model):
    """The config fields that say model post-processes its logits, as 'name=value'."""
    config = getattr(_unwrap(model), "config", None)
    return [f"{name}={getattr(config, name)}" for name, applies in _LOGIT_POSTPROCESSING.items()
            if hasattr(config, name) and applies(getattr(config, name))]


def _plain_linear(head):
    """Why head is not a plain nn.Linear (its own forward, or another module), or None."""
    if not isinstance(head, torch.nn.Linear):
        return f"its output layer is a {type(head).__name__}, not a Linear"
    if type(head).forward is not torch.nn.Linear.forward:
        return f"its output layer {type(head).__name__} has a forward of its own"
    return None


def _full(t):
    """A DTensor (a teacher sharded by FSDP2, say) as one plain tensor; other tensors as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _run_with_head_replaced(model, head, replacement, inputs):
    """Runs model(**inputs) with head.forward replaced by replacement(hidden).

    The replacement runs where the lm_head would, inside the model's forward:
    FSDP2 (the lm_head its own unit, or a root that reshards after forward)
    holds the weight gathered there and reduces its gradient through its own
    hooks (as DeepSpeed ZeRO-3 would; untested), and DDP sees an ordinary
    forward.
    Returns (result, whether the model returned result itself as its logits):
    any post-processing of the lm_head's output (a soft-cap, a scale) makes a
    new tensor, so the check cannot pass by luck."""
    result = {}

    def forward(hidden, *args, **kwargs):
        result["value"] = replacement(hidden)
        return result["value"]

    own = head.__dict__.get("forward")  # a forward already set on the instance (by a wrapper) is put back
    head.forward = forward
    try:
        outputs = model(**inputs)
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own
    value = result.get("value")
    return value, value is not None and outputs.logits is value


class DistillationTrainer(Trainer):
    """transformers.Trainer whose loss is hard_label_weight * CE + soft_label_weight * divergence(student || teacher).

    Labels follow the Hugging Face convention (unshifted, -100 ignored): the
    trainer shifts them, position t predicting labels[t + 1]. The loss is
    normalised by the counted tokens of the whole accumulated batch
    (num_items_in_batch), so gradient accumulation gives the big batch's
    update. The teacher is put in eval mode with requires_grad False, moved
    to the student's device (its dtype is left as given: a bf16 teacher stays
    bf16), run under torch.no_grad(), and never saved by the trainer.

    fused_linear=True runs both decoders without forming logits: inside
    each model's forward, the lm_head's forward is replaced (for that call)
    by one that computes fused_linear_distill_loss from its input and
    weight, so FSDP2 and ZeRO-3 hold the weight gathered as in any forward
    and reduce its gradient with their own hooks. A model whose logits are
    not a plain linear map of what its lm_head receives falls back to the
    logits path, with a warning, once. Such a model is found by its config
    (final_logit_softcapping, logit_scale, logits_scaling, ...), by its
    output layer (not a plain Linear), or because it returns something
    other than the lm_head's output itself as its logits (a soft-cap or a
    scale makes a new tensor, whatever the logits' size). Both paths give
    the same loss.

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
        if teacher_model is model:
            raise ValueError("teacher_model is the student model itself: the teacher is frozen, so nothing would "
                             "train; pass a separate model (e.g. a copy.deepcopy of it)")
        if not isinstance(fused_linear, bool):
            raise TypeError(f"fused_linear must be a bool, got {type(fused_linear).__name__}")
        _validation.check_module_config(divergence, beta, skew_lambda, akl_mu, jsd_beta, temperature, -100, "mean",
                                        soft_label_weight, hard_label_weight)
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
        self._logits_wanted = True  # False inside a loss-only prediction_step
        if not 0 <= self.args.label_smoothing_factor <= 1:
            raise ValueError(f"label_smoothing_factor must be in [0, 1], got {self.args.label_smoothing_factor}")
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

    def _fused_loss(self, model, inputs, shifted, reduction):
        """The loss from both models' lm_head inputs and weights (no logits formed), or None when the
        logits path must be used."""
        heads = {"student": _unwrap(model).get_output_embeddings(),
                 "teacher": _unwrap(self.teacher_model).get_output_embeddings()}
        for who, owner in (("student", model), ("teacher", self.teacher_model)):
            why = _plain_linear(heads[who])
            fields = _logit_postprocessing(owner)
            if why is None and fields:
                why = "its config post-processes them: " + ", ".join(fields)
            if why is not None:
                self._use_logits_path(who, why)
                return None
        model_inputs = self._model_inputs(inputs)
        student_head, teacher_head = heads["student"], heads["teacher"]

        def keep_teacher_hidden(hidden):
            keep_teacher_hidden.hidden = hidden
            return torch.zeros((), device=hidden.device)  # a float32 stand-in for the logits

        with torch.no_grad():
            _, untouched = _run_with_head_replaced(self.teacher_model, teacher_head, keep_teacher_hidden,
                                                   model_inputs)
        if not untouched:
            self._use_logits_path("teacher", "the model changes its lm_head's output before returning it")
            return None

        def loss_from_hidden(hidden):
            # Here the student's lm_head weight is whole, as in its own forward (FSDP2; ZeRO-3 likewise, untested).
            weight, bias = student_head.weight, student_head.bias
            hidden = hidden[..., :-1, :].to(weight.dtype)
            teacher_bias = None if teacher_head.bias is None else _full(teacher_head.bias).to(weight.dtype)
            loss = fused_linear_distill_loss(
                hidden, weight, keep_teacher_hidden.hidden[..., :-1, :].to(weight.dtype),
                _full(teacher_head.weight).to(weight.dtype), shifted, student_bias=bias, teacher_bias=teacher_bias,
                reduction=reduction, **self.loss_params)
            if self.args.label_smoothing_factor != 0:
                # z is linear in the hidden state: z_label and mean_v z_v without the logits.
                with torch.autocast(hidden.device.type, enabled=False):
                    labels = shifted.clamp(min=0)  # ignored positions read entry 0, masked in _label_smoothing
                    h, w = hidden.float(), weight.float()
                    label_logit = (h * w[labels]).sum(-1)
                    mean_logit = h @ w.mean(0)
                    if bias is not None:
                        label_logit = label_logit + bias.float()[labels]
                        mean_logit = mean_logit + bias.float().mean()
                loss = loss + self._label_smoothing(label_logit, mean_logit, shifted, reduction)
            return loss

        loss, untouched = _run_with_head_replaced(model, student_head, loss_from_hidden, model_inputs)
        if not untouched:
            self._use_logits_path("student", "the model changes its lm_head's output before returning it")
            return None
        return loss

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
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError("DistillationTrainer needs labels in every batch (unshifted, -100 where ignored), "
                             "e.g. from DataCollatorForLanguageModeling(tokenizer, mlm=False)")
        if self.teacher_model.training:  # user code switched it back to train mode (dropout)
            self.teacher_model.eval()
        shifted = labels[..., 1:]
        reduction = "sum" if num_items_in_batch is not None else "mean"
        use_fused = self.fused_linear and not (return_outputs and self._logits_wanted)
        loss = self._fused_loss(model, inputs, shifted, reduction) if use_fused else None
        if loss is not None:
            outputs = {"loss": loss}  # no logits: prediction_step asked for the loss only
        else:
            model_inputs = self._model_inputs(inputs)
            outputs = model(**model_inputs)
            with torch.no_grad():
                teacher_logits = self.teacher_model(**model_inputs).logits
            student_logits = outputs.logits[..., :-1, :]
            loss = distill_loss(student_logits, teacher_logits[..., :-1, :], shifted,
                                reduction=reduction, **self.loss_params)
            if self.args.label_smoothing_factor != 0:
                label_logit = student_logits.gather(-1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1).float()
                mean_logit = student_logits.mean(-1, dtype=torch.float32)
                loss = loss + self._label_smoothing(label_logit, mean_logit, shifted, reduction)
        if num_items_in_batch is not None:
            # A batch with no counted token: a zero loss with a zero gradient
            # (as reduction="mean" gives), not 0 / 0, whose NaN gradient would
            # reach every weight while the logged loss reads 0.
            loss = loss / (num_items_in_batch.clamp(min=1) if isinstance(num_items_in_batch, torch.Tensor)
                           else max(num_items_in_batch, 1))
            if self.args.average_tokens_across_devices:
                # num_items_in_batch counts every process's tokens and DDP averages the
                # gradients: undo the average, as Trainer.compute_loss does.
                tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
                loss = loss * (self.accelerator.num_processes // tp if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, outputs) if return_outputs else loss
