"""How fast the built-in harm judge is on this CPU: N answers from a harm label file, judged end to end
(keyword refusal gate + SmolLM2-135M-Instruct features up to its deepest layer + logistic regression), side by
side with the keyword judge alone and with features from a full forward pass (what the early stop saves).

    python benchmarks/harm_judge_speed.py ../shared/data/judge_labels/JAILJUDGEmini.csv --rows 1000

Issue 18's target: 1,000 answers in at most 10 minutes on 2 cores. Answers are cut to the judge's 192 tokens,
so long answers (JAILJUDGEmini's) are the slow case; evaluation answers of 64 new tokens are faster.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine

from jailbreak_antidote.eval.harm_judge import HarmJudge, answer_features
from jailbreak_antidote.eval.harm_labels import read_harm_labels
from jailbreak_antidote.eval.judges import is_refusal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labels", type=Path, help="a harm label CSV (question, answer, label)")
    parser.add_argument("--rows", type=int, default=1000, help="answers to judge")
    parser.add_argument("--full-rows", type=int, default=100, help="answers for the full-forward comparison")
    args = parser.parse_args()
    rows = read_harm_labels(args.labels)[: args.rows]
    questions, answers = [r.question for r in rows], [r.answer for r in rows]
    judge = HarmJudge.load("builtin")
    model, tokenizer = judge.model()  # loaded before timing: a run loads it once
    print(machine())

    start = time.perf_counter()
    refused = [is_refusal(a) for a in answers]
    keyword_s = time.perf_counter() - start
    start = time.perf_counter()
    judge.verdicts(questions, answers)
    judge_s = time.perf_counter() - start
    print(f"keyword judge: {len(rows)} answers in {keyword_s:.3f} s")
    print(f"harm judge:    {len(rows)} answers in {judge_s:.1f} s = {judge_s / 60 / len(rows) * 1000:.2f} min per "
          f"1,000 ({len(rows) / judge_s:.2f} answers/s; {sum(refused)} keyword refusals skip the model)")  # fmt: skip

    # The early stop, side by side on the same non-refused answers: blocks up to the deepest layer vs all.
    open_rows = [i for i, r in enumerate(refused) if not r][: args.full_rows]
    sample_q, sample_a = [questions[i] for i in open_rows], [answers[i] for i in open_rows]
    layers = judge.classifier.layers
    depth = model.config.num_hidden_layers
    timings = {}
    for name, chosen in (("up to the deepest layer", layers), ("full forward", (*layers, depth))):
        start = time.perf_counter()
        answer_features(model, tokenizer, sample_q, sample_a, chosen, max_tokens=judge.classifier.max_tokens)
        timings[name] = time.perf_counter() - start
    print(f"features for {len(open_rows)} answers: {timings['up to the deepest layer']:.1f} s up to block "
          f"{max(layers)} of {depth}, {timings['full forward']:.1f} s for all blocks "
          f"(ratio {timings['full forward'] / timings['up to the deepest layer']:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
