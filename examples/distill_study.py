"""What each divergence does to a real (small) student: an offline, reproducible
distillation study on this machine, with no downloads.

    .venv/bin/python examples/distill_study.py            # the full study (see --help for its budget)
    .venv/bin/python examples/distill_study.py --quick    # a few minutes
    .venv/bin/python examples/distill_study.py --smoke    # seconds: the test suite's end-to-end check

1. Corpus: the Python standard library's own source files (on every machine
   with Python), split into train and held-out by file.
2. A byte-level BPE tokenizer (`tokenizers`) trained on the train split.
3. A teacher (a small Llama config) trained on next-token prediction for a
   fixed number of steps.
4. Students (a smaller Llama config), all from the same initialisation and
   the same batches, distilled with each divergence through
   todi_ext.integrations.transformers.DistillationTrainer (fused-linear path,
   soft loss only), plus one trained on the hard labels alone.
5. Held-out metrics: the student's next-token loss, KL(teacher || student)
   and KL(student || teacher) per token, and ROUGE-L of greedy continuations
   of held-out prompts against the teacher's continuations and against the
   reference text. Several seeds; the table gives mean +- std over them.

Writes examples/results/study[-quick].md and .json and a plot, and states
the total run time.
"""

import argparse
import glob
import hashlib
import json
import math
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))

BUDGETS = {
    # corpus chars, vocab, seq len, teacher (hidden, layers, steps), student (hidden, layers, steps), batch, seeds,
    # prompts for ROUGE-L, held-out sequences
    "full": dict(chars=6_000_000, vocab=2048, seq=128, teacher=(256, 4, 1000), student=(128, 2, 300), batch=16,
                 seeds=3, prompts=48, eval_seqs=256),
    "quick": dict(chars=1_500_000, vocab=1024, seq=96, teacher=(192, 3, 400), student=(96, 2, 150), batch=16,
                  seeds=2, prompts=24, eval_seqs=96),
    "smoke": dict(chars=200_000, vocab=512, seq=48, teacher=(64, 2, 20), student=(32, 2, 6), batch=8,
                  seeds=1, prompts=4, eval_seqs=16),
}
DIVERGENCES = ["todi", "fkl", "rkl", "akl", "js", "tvd", "skl", "srkl", "gjsd"]
PROMPT_TOKENS, CONTINUATION_TOKENS = 32, 24
GJSD_BETA = 0.1


def progress(i, n, what, started):
    width = 30
    done = int(width * i / max(n, 1))
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {what:<40} {time.time() - started:6.0f} s")
    sys.stderr.flush()
    if i == n:
        sys.stderr.write("\n")


# ------------------------------------------------------------------- data
def corpus(max_chars):
    """Standard library sources, split into train / held-out by a hash of the file name."""
    lib = os.path.dirname(os.__file__)
    files = sorted(glob.glob(os.path.join(lib, "*.py")) + glob.glob(os.path.join(lib, "*", "*.py")))
    files = [f for f in files if "test" not in os.path.relpath(f, lib).lower() and "site-packages" not in f]
    train, held_out, total = [], [], 0
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        name = os.path.relpath(path, lib)
        (held_out if int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10 == 0 else train).append(text)
        total += len(text)
        if total >= max_chars:
            break
    return train, held_out


def train_tokenizer(texts, vocab):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def sequences(tok, texts, seq):
    ids = []
    for t in texts:
        ids.extend(tok.encode(t).ids)
    n = len(ids) // seq
    return torch.tensor(ids[: n * seq], dtype=torch.long).view(n, seq)


class Sequences(torch.utils.data.Dataset):
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return self.data.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "attention_mask": torch.ones_like(self.data[i]), "labels": self.data[i]}


# ----------------------------------------------------------------- models
def llama(vocab, hidden, layers, seq, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                                        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32),
                                        num_key_value_heads=max(1, hidden // 64), max_position_embeddings=seq,
                                        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                                        pad_token_id=None))


def train_teacher(model, data, steps, batch, seed, started):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, data.shape[0], (batch,), generator=g)
        x = data[idx]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 20 == 0 or step == steps - 1:
            progress(step + 1, steps, f"teacher, loss {loss.item():.3f}", started)
    return model.eval()


def train_student(student, teacher, data, method, steps, batch, seed, out_dir):
    from transformers import Trainer, TrainingArguments

    from todi_ext.integrations.transformers import DistillationTrainer

    args = TrainingArguments(output_dir=out_dir, use_cpu=True, report_to=[], per_device_train_batch_size=batch,
                             learning_rate=3e-3, weight_decay=0.01, lr_scheduler_type="cosine", warmup_steps=steps // 10,
                             max_steps=steps, save_strategy="no", logging_strategy="no", seed=seed,
                             data_seed=seed, dataloader_num_workers=0, disable_tqdm=True, max_grad_norm=1.0)
    dataset = Sequences(data)
    if method == "hard labels":
        trainer = Trainer(model=student, args=args, train_dataset=dataset)
    else:
        # gjsd at its default jsd_beta = 0.5 is js: the study runs it at 0.1.
        extra = {"jsd_beta": GJSD_BETA} if method == "gjsd" else {}
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                      divergence=method, temperature=1.0, hard_label_weight=0.0,
                                      soft_label_weight=1.0, fused_linear=True, **extra)
    trainer.train()
    return student.eval()


# ---------------------------------------------------------------- metrics
def lcs(a, b):
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate, reference):
    """ROUGE-L F1 over tokens."""
    if not candidate or not reference:
        return 0.0
    common = lcs(candidate, reference)
    if common == 0:
        return 0.0
    p, r = common / len(candidate), common / len(reference)
    return 2 * p * r / (p + r)


@torch.no_grad()
def greedy(model, prompts, n):
    x = prompts
    for _ in range(n):
        nxt = model(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)
        x = torch.cat([x, nxt], dim=1)
    return x[:, prompts.shape[1]:]


@torch.no_grad()
def evaluate(student, teacher, held_out, prompts, teacher_continuations, references):
    ce_sum, fkl_sum, rkl_sum, count = 0.0, 0.0, 0.0, 0
    for i in range(0, held_out.shape[0], 16):
        x = held_out[i:i + 16]
        ls = F.log_softmax(student(input_ids=x).logits[:, :-1].double(), -1)
        lt = F.log_softmax(teacher(input_ids=x).logits[:, :-1].double(), -1)
        y = x[:, 1:]
        ce_sum += float(-ls.gather(-1, y.unsqueeze(-1)).sum())
        fkl_sum += float((lt.exp() * (lt - ls)).sum())
        rkl_sum += float((ls.exp() * (ls - lt)).sum())
        count += y.numel()
    continuations = greedy(student, prompts, CONTINUATION_TOKENS).tolist()
    return {
        "held_out_loss": ce_sum / count,
        "kl_teacher_student": fkl_sum / count,
        "kl_student_teacher": rkl_sum / count,
        "rouge_l_vs_teacher": 100 * statistics.mean(rouge_l(c, t) for c, t in zip(continuations, teacher_continuations)),
        "rouge_l_vs_reference": 100 * statistics.mean(rouge_l(c, r) for c, r in zip(continuations, references)),
    }


# ------------------------------------------------------------------- main
def study_args(doc, budgets, divergences):
    """The studies' command line: (args, budget name, budget); uses every core."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a smaller budget: minutes")
    mode.add_argument("--smoke", action="store_true", help="tiny: an end-to-end check in seconds")
    p.add_argument("--divergences", nargs="+", default=divergences)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    torch.set_num_threads(os.cpu_count() or 1)
    return args, name, budgets[name]


def main():
    args, name, b = study_args(__doc__, BUDGETS, DIVERGENCES)
    started = time.time()

    train_texts, held_texts = corpus(b["chars"])
    tok = train_tokenizer(train_texts, b["vocab"])
    vocab = tok.get_vocab_size()
    train = sequences(tok, train_texts, b["seq"])
    held = sequences(tok, held_texts, b["seq"])[: b["eval_seqs"]]
    rng = random.Random(0)
    picked = rng.sample(range(held.shape[0]), min(b["prompts"], held.shape[0]))
    prompts = held[picked, :PROMPT_TOKENS]
    references = held[picked, PROMPT_TOKENS:PROMPT_TOKENS + CONTINUATION_TOKENS].tolist()
    print(f"corpus: {len(train_texts)} train files, {len(held_texts)} held-out files; vocab {vocab}; "
          f"{train.shape[0]} train and {held.shape[0]} held-out sequences of {b['seq']} tokens", flush=True)

    th, tl, tsteps = b["teacher"]
    teacher = train_teacher(llama(vocab, th, tl, b["seq"], seed=1234), train, tsteps, b["batch"], 1234, started)
    teacher.requires_grad_(False)
    teacher_continuations = greedy(teacher, prompts, CONTINUATION_TOKENS).tolist()
    methods = ["hard labels"] + args.divergences
    sh, sl, ssteps = b["student"]
    runs = [(m, seed) for seed in range(b["seeds"]) for m in methods]
    results = {"teacher": evaluate(teacher, teacher, held, prompts, teacher_continuations, references)}
    per_method = {m: [] for m in methods}
    tmp = os.path.join(args.out, f".study-{name}-tmp")
    for i, (method, seed) in enumerate(runs):
        progress(i, len(runs), f"student: {method}, seed {seed}", started)
        student = llama(vocab, sh, sl, b["seq"], seed=seed)  # same init for every method of a seed
        train_student(student, teacher, train, method, ssteps, b["batch"], seed, tmp)
        per_method[method].append(evaluate(student, teacher, held, prompts, teacher_continuations, references))
    progress(len(runs), len(runs), "done", started)
    elapsed = time.time() - started

    keys = ["held_out_loss", "kl_teacher_student", "kl_student_teacher", "rouge_l_vs_teacher", "rouge_l_vs_reference"]
    summary = {}
    for m, rs in per_method.items():
        summary[m] = {k: (statistics.mean(r[k] for r in rs), statistics.stdev(r[k] for r in rs) if len(rs) > 1 else 0.0)
                      for k in keys}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "study" if name == "full" else f"study-{name}")
    teacher_params = sum(p.numel() for p in teacher.parameters())
    student_params = sum(p.numel() for p in llama(vocab, sh, sl, b["seq"], seed=0).parameters())
    lines = [
        f"# Distillation study ({name}): {len(methods) - 1} divergences + hard labels, {b['seeds']} seed(s)", "",
        f"Teacher: Llama, hidden {th}, {tl} layers, {teacher_params / 1e6:.2f} M parameters, {tsteps} steps. "
        f"Students: hidden {sh}, {sl} layers, {student_params / 1e6:.2f} M parameters, {ssteps} steps each, "
        f"batch {b['batch']} x {b['seq']} tokens, AdamW 3e-3 cosine; distillation at T = 1, soft loss only "
        f"(hard_label_weight 0), fused-linear path; gjsd at jsd_beta {GJSD_BETA}. Corpus: Python {sys.version.split()[0]} standard library "
        f"sources, vocab {vocab}. Held-out: {held.shape[0]} sequences; ROUGE-L of {len(picked)} greedy "
        f"continuations ({CONTINUATION_TOKENS} tokens after {PROMPT_TOKENS}). Total run time "
        f"{elapsed / 60:.1f} min on {os.cpu_count()} CPU cores, torch {torch.__version__}.", "",
        "| method | held-out loss | KL(teacher ‖ student) | KL(student ‖ teacher) | ROUGE-L vs teacher | ROUGE-L vs reference |",
        "|---|---|---|---|---|---|",
        "| teacher | {:.3f} | - | - | 100 | {:.1f} |".format(results["teacher"]["held_out_loss"],
                                                              results["teacher"]["rouge_l_vs_reference"]),
    ]
    for m in methods:
        cells = [f"{summary[m][k][0]:.3f} ± {summary[m][k][1]:.3f}" if "rouge" not in k
                 else f"{summary[m][k][0]:.1f} ± {summary[m][k][1]:.1f}" for k in keys]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(stem + ".json", "w") as f:
        json.dump({"budget": b, "elapsed_s": elapsed, "teacher": results["teacher"], "runs": per_method}, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for ax, k in zip(axes, ["held_out_loss", "kl_teacher_student", "rouge_l_vs_teacher"]):
            means = [summary[m][k][0] for m in methods]
            errs = [summary[m][k][1] for m in methods]
            ax.bar(range(len(methods)), means, yerr=errs, color=["grey"] + ["C0"] * (len(methods) - 1))
            ax.set_xticks(range(len(methods)))
            ax.set_xticklabels(methods, rotation=45, ha="right")
            ax.set_title(k.replace("_", " "))
            lo = min(m - e for m, e in zip(means, errs))
            ax.set_ylim(bottom=max(0, lo - 0.1 * abs(lo)))
        fig.tight_layout()
        fig.savefig(stem + ".png", dpi=110)
    except ImportError:
        print("plot skipped: install matplotlib")
    print("\n".join(lines))
    print(f"[study] wrote {stem}.md, .json, .png; total {elapsed / 60:.1f} min")


if __name__ == "__main__":
    main()
