"""Distillation study, regime 2: pretrained students distilled on a task, as
the ToDi paper does (there: instruction data, ROUGE-L of sampled responses).
Offline and reproducible on this machine, with no downloads.

    .venv/bin/python examples/distill_study_task.py            # the full run (under an hour on 2 cores)
    .venv/bin/python examples/distill_study_task.py --quick    # minutes
    .venv/bin/python examples/distill_study_task.py --smoke    # seconds: the test suite's end-to-end check

1. Corpus: the Python standard library's sources, split into train and
   held-out by file (as in regime 1, examples/distill_study.py), and a
   byte-level BPE tokenizer trained on the train files.
2. Task: every function with a docstring. Prompt: its signature and
   docstring; response: its body. Train pairs from the train files,
   held-out pairs from the held-out files (functions never seen in training),
   of the whole library (pretraining reads only its first few MB).
3. Teacher: a Llama pretrained on the corpus (next-token prediction), then
   fine-tuned on the task's train pairs (loss on the responses only).
4. Students: a smaller Llama pretrained on the corpus once (hard labels; one
   shared checkpoint), then, from that checkpoint, trained on the task's
   train pairs with each divergence through DistillationTrainer, at the
   paper's objective (0.5 cross-entropy + 0.5 divergence, T = 2; prompt
   positions ignored), and with the hard labels alone (plain fine-tuning).
   Seeds change the order of the task batches and the sampling.
5. Held-out metrics: ROUGE-L (F1 over words) of the greedy response and of
   sampled responses (T = 1, several per prompt, fixed seeds) against the
   reference body; the task loss on the responses; KL(teacher || student)
   and KL(student || teacher) per response token. Mean +- std over seeds,
   and for the best method, its paired per-seed differences against the
   others, with whether they exceed the seed noise.

Writes examples/results/study-task[-quick].md and .json with the run time.
"""

import ast
import copy
import json
import os
import random
import re
import shutil
import statistics
import sys
import textwrap
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from distill_study import corpus, llama, progress, rouge_l, sequences, study_args, train_teacher  # noqa: E402

BUDGETS = {
    # corpus chars (pretraining), task chars (the files the task's pairs come from; None: the whole library), vocab,
    # pretraining seq len, teacher (hidden, layers, pretraining steps, task steps), student (hidden, layers,
    # pretraining steps), task steps per student, batch, seeds, held-out prompts, samples per prompt, longest
    # prompt and response (tokens)
    "full": dict(chars=6_000_000, task_chars=None, vocab=2048, seq=128, teacher=(256, 4, 600, 300),
                 student=(128, 2, 800), task_steps=150, batch=16, seeds=3, prompts=96, samples=4, max_prompt=96,
                 max_response=48),
    "quick": dict(chars=1_500_000, task_chars=None, vocab=1024, seq=96, teacher=(192, 3, 300, 150),
                  student=(96, 2, 300), task_steps=80, batch=16, seeds=2, prompts=32, samples=2, max_prompt=80,
                  max_response=40),
    "smoke": dict(chars=400_000, task_chars=400_000, vocab=512, seq=48, teacher=(64, 2, 20, 5), student=(32, 2, 20),
                  task_steps=3, batch=4, seeds=1, prompts=4, samples=2, max_prompt=64, max_response=24),
}
DIVERGENCES = ["todi", "fkl", "rkl", "akl", "js", "tvd", "skl", "srkl", "gjsd"]
GJSD_BETA = 0.1  # as regime 1: at its default 0.5 gjsd would repeat js
# The paper's objective (its released scripts): 0.5 CE + 0.5 divergence at T = 2.
TEMPERATURE, HARD_LABEL_WEIGHT, SOFT_LABEL_WEIGHT = 2.0, 0.5, 0.5
TASK_LR, PRETRAIN_LR = 1e-3, 3e-3
END, PAD = "<|end|>", "<|pad|>"
# Two-sided 95% critical values of Student's t by degrees of freedom (paired seeds - 1).
T_CRITICAL = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


# ------------------------------------------------------------------- data
def train_tokenizer(texts, vocab):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, show_progress=False, special_tokens=[END, PAD],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def functions_with_docstrings(text):
    """(signature + docstring, body) of every function in a module's source, dedented together."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return
    lines = text.splitlines(keepends=True)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
            continue
        first = node.body[0]
        if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)):
            continue
        source = textwrap.dedent("".join(lines[node.lineno - 1:node.end_lineno]))
        split = first.end_lineno - node.lineno + 1
        source_lines = source.splitlines(keepends=True)
        yield "".join(source_lines[:split]), "".join(source_lines[split:])


def task_pairs(tok, texts, max_prompt, max_response):
    """Token ids of (prompt, response + END) for the functions that fit the budget."""
    end = tok.token_to_id(END)
    pairs = []
    for text in texts:
        for prompt, body in functions_with_docstrings(text):
            p, r = tok.encode(prompt).ids, tok.encode(body).ids + [end]
            if 1 <= len(p) <= max_prompt and 4 <= len(r) <= max_response:
                pairs.append((p, r))
    return pairs


class TaskPairs(torch.utils.data.Dataset):
    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        return self.pairs[i]


def collate(pad):
    """Right-padded batches; labels only on the responses (prompt and padding: -100)."""
    def batch(pairs):
        width = max(len(p) + len(r) for p, r in pairs)
        ids = torch.full((len(pairs), width), pad, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for i, (p, r) in enumerate(pairs):
            ids[i, :len(p) + len(r)] = torch.tensor(p + r)
            labels[i, len(p):len(p) + len(r)] = torch.tensor(r)
            mask[i, :len(p) + len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return batch


# --------------------------------------------------------------- training
def train_on_task(student, teacher, pairs, method, steps, batch, seed, pad, out_dir):
    """Fine-tunes (method "hard labels") or distils (a divergence) on the task's train pairs."""
    from transformers import Trainer, TrainingArguments

    from todi_ext.integrations.transformers import DistillationTrainer

    args = TrainingArguments(output_dir=out_dir, use_cpu=True, report_to=[], per_device_train_batch_size=batch,
                             learning_rate=TASK_LR, weight_decay=0.01, lr_scheduler_type="cosine",
                             warmup_steps=max(1, steps // 10), max_steps=steps, save_strategy="no",
                             logging_strategy="no", seed=seed, data_seed=seed, dataloader_num_workers=0,
                             disable_tqdm=True, max_grad_norm=1.0, remove_unused_columns=False)
    common = dict(model=student, args=args, train_dataset=TaskPairs(pairs), data_collator=collate(pad))
    if method == "hard labels":
        trainer = Trainer(**common)
    else:
        extra = {"jsd_beta": GJSD_BETA} if method == "gjsd" else {}
        trainer = DistillationTrainer(teacher_model=teacher, divergence=method, temperature=TEMPERATURE,
                                      hard_label_weight=HARD_LABEL_WEIGHT, soft_label_weight=SOFT_LABEL_WEIGHT,
                                      fused_linear=True, **common, **extra)
    trainer.train()
    return student.eval()


# ---------------------------------------------------------------- metrics
def words(text):
    return re.findall(r"\w+|[^\w\s]", text)


def responses(model, prompts, pad, end, max_new, samples=0, seed=0):
    """Greedy responses (samples=0) or `samples` sampled ones per prompt (T = 1, seeded), as token lists."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    kwargs = dict(do_sample=False) if samples == 0 else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                                            num_return_sequences=samples)
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=end,
                         pad_token_id=pad, **kwargs)[:, width:].tolist()
    return [r[:r.index(end)] if end in r else r for r in out]


@torch.no_grad()
def evaluate(model, teacher, tok, held, pad, end, max_new, samples, seed):
    ce, fkl, rkl, count = 0.0, 0.0, 0.0, 0
    batch = collate(pad)
    for i in range(0, len(held), 16):
        b = batch(held[i:i + 16])
        counted = b["labels"][:, 1:] != -100
        ls = F.log_softmax(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].double(), -1)
        lt = F.log_softmax(teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].double(), -1)
        target = b["labels"][:, 1:].clamp(min=0)
        ce += float(-(ls.gather(-1, target.unsqueeze(-1)).squeeze(-1) * counted).sum())
        fkl += float(((lt.exp() * (lt - ls)).sum(-1) * counted).sum())
        rkl += float(((ls.exp() * (ls - lt)).sum(-1) * counted).sum())
        count += int(counted.sum())
    prompts = [p for p, _ in held]
    references = [words(tok.decode(r[:-1])) for _, r in held]  # without END
    greedy = responses(model, prompts, pad, end, max_new)
    sampled = responses(model, prompts, pad, end, max_new, samples=samples, seed=seed)
    score = lambda ids, ref: rouge_l(words(tok.decode(ids)), ref)  # noqa: E731
    return {
        "rouge_l_greedy": 100 * statistics.mean(score(g, r) for g, r in zip(greedy, references)),
        "rouge_l_sampled": 100 * statistics.mean(score(s, references[k // samples]) for k, s in enumerate(sampled)),
        "task_loss": ce / count,
        "kl_teacher_student": fkl / count,
        "kl_student_teacher": rkl / count,
    }


KEYS = ["rouge_l_sampled", "rouge_l_greedy", "task_loss", "kl_teacher_student", "kl_student_teacher"]
HIGHER_IS_BETTER = {"rouge_l_sampled": True, "rouge_l_greedy": True, "task_loss": False,
                    "kl_teacher_student": False, "kl_student_teacher": False}


def paired(per_method, best, other, key):
    """Mean and std of best - other over seeds, t statistic, and whether it exceeds the seed noise."""
    diffs = [a[key] - b[key] for a, b in zip(per_method[best], per_method[other])]
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return mean, float("nan"), float("nan"), None
    std = statistics.stdev(diffs)
    t = mean / (std / len(diffs) ** 0.5) if std > 0 else float("inf")
    return mean, std, t, abs(t) > T_CRITICAL[len(diffs) - 1]


# ------------------------------------------------------------------- main
def main():
    args, name, b = study_args(__doc__, BUDGETS, DIVERGENCES)
    started = time.time()

    train_texts, held_texts = corpus(b["chars"])
    tok = train_tokenizer(train_texts, b["vocab"])
    vocab, end, pad = tok.get_vocab_size(), tok.token_to_id(END), tok.token_to_id(PAD)
    lm_data = sequences(tok, train_texts, b["seq"])
    # The task takes its pairs from more files than pretraining reads (the same train / held-out split):
    # with the pretraining corpus's alone, the teacher overfits them (quick budget: 258 pairs, the fine-tuned
    # teacher's held-out task loss above the students').
    task_train_texts, task_held_texts = corpus(b["task_chars"] or float("inf"))
    train_pairs = task_pairs(tok, task_train_texts, b["max_prompt"], b["max_response"])
    held_pairs = task_pairs(tok, task_held_texts, b["max_prompt"], b["max_response"])
    held = random.Random(0).sample(held_pairs, min(b["prompts"], len(held_pairs)))
    positions = b["max_prompt"] + b["max_response"]
    print(f"corpus: {len(train_texts)} train files, {len(held_texts)} held-out files; vocab {vocab}; "
          f"task: {len(train_pairs)} train pairs, {len(held_pairs)} held-out pairs ({len(held)} evaluated)",
          flush=True)

    th, tl, t_pretrain, t_task = b["teacher"]
    teacher = train_teacher(llama(vocab, th, tl, positions, seed=1234), lm_data, t_pretrain, b["batch"], 1234, started)
    tmp = os.path.join(args.out, f".study-task-{name}-tmp")
    teacher = train_on_task(teacher.train(), None, train_pairs, "hard labels", t_task, b["batch"], 1234, pad, tmp)
    teacher.requires_grad_(False)
    sh, sl, s_pretrain = b["student"]
    pretrained = train_teacher(llama(vocab, sh, sl, positions, seed=0), lm_data, s_pretrain, b["batch"], 0, started)
    pretrain_time = time.time() - started

    eval_args = (tok, held, pad, end, b["max_response"], b["samples"])
    results = {"teacher": evaluate(teacher, teacher, *eval_args, seed=0),
               "student, pretrained only": evaluate(pretrained, teacher, *eval_args, seed=0)}
    methods = ["hard labels"] + args.divergences
    runs = [(m, seed) for seed in range(b["seeds"]) for m in methods]
    per_method = {m: [] for m in methods}
    for i, (method, seed) in enumerate(runs):
        progress(i, len(runs), f"student: {method}, seed {seed}", started)
        student = copy.deepcopy(pretrained).train()  # the one shared checkpoint
        train_on_task(student, teacher, train_pairs, method, b["task_steps"], b["batch"], seed, pad, tmp)
        per_method[method].append(evaluate(student, teacher, *eval_args, seed=1000 + seed))
    progress(len(runs), len(runs), "done", started)
    shutil.rmtree(tmp, ignore_errors=True)  # the Trainer's output_dir: nothing is saved there
    elapsed = time.time() - started
    write_report(args.out, name, b, results, per_method, methods, vocab, len(train_pairs), len(held_pairs),
                 len(held), teacher, pretrained, elapsed, pretrain_time)


def write_report(out, name, b, results, per_method, methods, vocab, n_train, n_held, n_eval, teacher, student,
                 elapsed, pretrain_time):
    summary = {m: {k: (statistics.mean(r[k] for r in rs), statistics.stdev(r[k] for r in rs) if len(rs) > 1 else 0.0)
                   for k in KEYS} for m, rs in per_method.items()}
    best = max(methods, key=lambda m: summary[m]["rouge_l_sampled"][0])
    count = lambda model: sum(p.numel() for p in model.parameters()) / 1e6  # noqa: E731
    th, tl, t_pretrain, t_task = b["teacher"]
    sh, sl, s_pretrain = b["student"]
    lines = [
        f"# Distillation study, regime 2 ({name}): pretrained students on a task, {len(methods) - 1} divergences + "
        f"fine-tuning on hard labels, {b['seeds']} seed(s)", "",
        f"Task: Python standard library functions (Python {sys.version.split()[0]}), signature + docstring -> body; "
        f"{n_train} train pairs, {n_held} held-out pairs from other files ({n_eval} evaluated), prompts <= "
        f"{b['max_prompt']} and responses <= {b['max_response']} tokens, vocab {vocab}. Teacher: Llama, hidden {th}, "
        f"{tl} layers, {count(teacher):.2f} M parameters, pretrained {t_pretrain} steps on the corpus, fine-tuned "
        f"{t_task} steps on the task. Students: hidden {sh}, {sl} layers, {count(student):.2f} M parameters, "
        f"pretrained {s_pretrain} steps on the corpus (one shared checkpoint), then {b['task_steps']} task steps each, "
        f"batch {b['batch']}, AdamW {TASK_LR:g} cosine: divergences at the paper's objective ({HARD_LABEL_WEIGHT} CE + "
        f"{SOFT_LABEL_WEIGHT} divergence, T = {TEMPERATURE:g}; gjsd at jsd_beta {GJSD_BETA}), fused-linear path, prompt "
        f"positions ignored. ROUGE-L: F1 over words against the reference body, greedy and {b['samples']} samples per "
        f"prompt at T = 1 (seeded). KL per response token at T = 1. Total run time {elapsed / 60:.1f} min "
        f"({pretrain_time / 60:.1f} min of it pretraining and fine-tuning the teacher and pretraining the student) "
        f"on {os.cpu_count()} CPU cores, torch {torch.__version__}.", "",
        "| method | ROUGE-L sampled | ROUGE-L greedy | held-out task loss | KL(teacher ‖ student) | KL(student ‖ teacher) |",
        "|---|---|---|---|---|---|",
    ]
    for who in ("teacher", "student, pretrained only"):
        r = results[who]
        lines.append(f"| {who} | {r['rouge_l_sampled']:.1f} | {r['rouge_l_greedy']:.1f} | {r['task_loss']:.3f} | "
                     f"{r['kl_teacher_student']:.3f} | {r['kl_student_teacher']:.3f} |")
    for m in methods:
        cells = [f"{summary[m][k][0]:.1f} ± {summary[m][k][1]:.1f}" if "rouge" in k
                 else f"{summary[m][k][0]:.3f} ± {summary[m][k][1]:.3f}" for k in KEYS]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", f"Best student by sampled ROUGE-L: **{best}**. Its paired per-seed differences (best - other, "
              "mean ± std over seeds; t: paired t statistic; beyond noise: |t| above the two-sided 95% critical value):", "",
              "| other | Δ ROUGE-L sampled | t | beyond noise | Δ ROUGE-L greedy | t | beyond noise |", "|---|---|---|---|---|---|---|"]
    verdicts = {}
    for other in methods:
        if other == best:
            continue
        cells = []
        for key in ("rouge_l_sampled", "rouge_l_greedy"):
            mean, std, t, beyond = paired(per_method, best, other, key)
            verdicts.setdefault(other, {})[key] = dict(mean=mean, std=std, t=t, beyond_noise=beyond)
            cells += [f"{mean:+.1f} ± {std:.1f}", f"{t:.1f}", "n/a" if beyond is None else "yes" if beyond else "no"]
        lines.append(f"| {other} | " + " | ".join(cells) + " |")
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, "study-task" if name == "full" else f"study-task-{name}")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(stem + ".json", "w") as f:
        json.dump({"budget": b, "elapsed_s": elapsed, "objective": dict(temperature=TEMPERATURE,
                   hard_label_weight=HARD_LABEL_WEIGHT, soft_label_weight=SOFT_LABEL_WEIGHT, gjsd_beta=GJSD_BETA),
                   "reference_rows": results, "runs": per_method, "best": best, "paired": verdicts}, f, indent=1)
    print("\n".join(lines))
    print(f"[study-task] wrote {stem}.md and .json; total {elapsed / 60:.1f} min")


if __name__ == "__main__":
    main()
