"""MMLU k-shot accuracy of one served model: prompts, answer extraction, scoring, concurrent runs.

The prompt is the original one (hendrycks/test ``evaluate.py``/``evaluate_flan.py``, commit
9a2de4fa): a header "The following are multiple choice questions (with answers) about {subject}.",
then the first k ``dev`` examples, each ``question\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: X\\n\\n``,
then the test question ending in ``Answer:``. (The original ``format_subject`` prefixes every word
with a space, giving "about  machine learning."; we join with single spaces as lm-evaluation-harness
does.) When a tokenizer is at hand, shots are dropped one at a time until the prompt fits
``max_prompt_tokens`` (2048 in the original), exactly as ``evaluate.py`` does.

The original compares the logits of the four letter tokens; through Triton we only see text, so the
model answers greedily with one token and the letter is read from it. A reply that is not a letter
counts as wrong (and is reported as ``invalid``). Greedy Medusa decoding is exact, so a Medusa engine
must give the same letter as its base on every question; ``eval report`` checks that.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from medusa_forge.errors import ForgeError
from medusa_forge.eval.cache import ResultCache
from medusa_forge.eval.mmlu_data import LETTERS, Question

_LETTER = re.compile(r"^\s*\(?([ABCD])(?![A-Za-z0-9])")


def format_subject(subject: str) -> str:
    return " ".join(subject.split("_"))


def format_question(q: Question, with_answer: bool) -> str:
    text = q.question + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices)) + "\nAnswer:"
    return text + f" {q.answer}\n\n" if with_answer else text


def build_prompt(subject: str, shots: list[Question], q: Question) -> str:
    header = f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"
    return header + "".join(format_question(s, True) for s in shots) + format_question(q, False)


def fit_prompt(
    subject: str, shots: list[Question], q: Question, count_tokens: Callable[[str], int] | None, max_prompt_tokens: int
) -> tuple[str, int]:
    """The prompt with as many of ``shots`` as fit (original: drop the last shot until <= 2048 tokens)."""
    k = len(shots)
    prompt = build_prompt(subject, shots, q)
    while count_tokens is not None and k > 0 and count_tokens(prompt) > max_prompt_tokens:
        k -= 1
        prompt = build_prompt(subject, shots[:k], q)
    return prompt, k


def extract_letter(text: str) -> str | None:
    """The answer letter at the start of the reply (" B", "B.", "(C)"), or None."""
    m = _LETTER.match(text)
    return m.group(1) if m else None


@dataclass(frozen=True)
class Item:
    """One test question, ready to send."""

    id: str  # "{subject}/{index}", stable across runs
    question: Question
    prompt: str
    shots: int


def make_items(
    test: dict[str, list[Question]],
    dev: dict[str, list[Question]] | None,
    shots: int,
    limit: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
    max_prompt_tokens: int = 2048,
) -> list[Item]:
    """Prompts for the first ``limit`` test questions of each subject, with ``shots`` dev examples."""
    items = []
    for subject, questions in test.items():
        examples = (dev or {}).get(subject, [])
        if shots and len(examples) < shots:
            raise ForgeError(f"subject {subject}: {shots}-shot needs {shots} dev examples, found {len(examples)}")
        for i, q in enumerate(questions[:limit] if limit else questions):
            prompt, k = fit_prompt(subject, examples[:shots], q, count_tokens, max_prompt_tokens)
            items.append(Item(f"{subject}/{i}", q, prompt, k))
    return items


def answer_record(item: Item, reply: str) -> dict[str, Any]:
    predicted = extract_letter(reply)
    return {
        "id": item.id,
        "subject": item.question.subject,
        "answer": item.question.answer,
        "predicted": predicted,
        "reply": reply,
        "correct": predicted == item.question.answer,
        "shots": item.shots,
    }


def run_items(
    items: list[Item], ask: Callable[[str], str], cache: ResultCache, concurrency: int = 4, progress: bool = True
) -> list[dict[str, Any]]:
    """Ask every item not already in ``cache`` (up to ``concurrency`` in flight); records in item order.

    Each answer is cached as soon as it arrives. On the first failure no new request is started,
    the answers so far are flushed, and the error propagates with the count kept for resuming.
    """
    todo = [it for it in items if it.id not in cache]
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="mmlu", unit="q", disable=not progress)
    stop = threading.Event()

    def one(it: Item) -> None:
        if stop.is_set():
            return
        cache.put(it.id, answer_record(it, ask(it.prompt)))

    try:
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            pending: set[Future] = set()
            queue = iter(todo)
            for it in queue:  # keep at most `concurrency` requests in flight
                pending.add(pool.submit(one, it))
                if len(pending) >= concurrency:
                    pending = _drain(pending, bar, stop, return_when=FIRST_COMPLETED)
            _drain(pending, bar, stop)
    except BaseException as e:
        stop.set()
        cache.flush()
        if isinstance(e, ForgeError):
            raise ForgeError(
                f"{e} ({len(cache.results)} of {len(items)} answers kept in {cache.path}; "
                "rerun the same command to resume)"
            ) from None
        raise
    finally:
        bar.close()
    cache.flush()
    return [cache.get(it.id) for it in items]


def _drain(pending: set[Future], bar: tqdm, stop: threading.Event, return_when: str = "ALL_COMPLETED") -> set[Future]:
    done, rest = wait(pending, return_when=return_when)
    for f in done:
        if f.exception() is not None:
            stop.set()
            for r in rest:
                r.cancel()
            raise f.exception()  # type: ignore[misc]
        bar.update(1)
    return rest


def score(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-subject accuracy, macro (mean over subjects) and micro (over all questions, the original's
    "Average accuracy") as fractions in [0, 1]."""
    per: dict[str, dict[str, Any]] = {}
    for r in records:
        s = per.setdefault(r["subject"], {"correct": 0, "total": 0, "invalid": 0})
        s["total"] += 1
        s["correct"] += bool(r["correct"])
        s["invalid"] += r["predicted"] is None
    for s in per.values():
        s["accuracy"] = s["correct"] / s["total"]
    total = sum(s["total"] for s in per.values())
    return {
        "subjects": dict(sorted(per.items())),
        "macro_accuracy": sum(s["accuracy"] for s in per.values()) / len(per) if per else 0.0,
        "micro_accuracy": sum(s["correct"] for s in per.values()) / total if total else 0.0,
        "num_questions": total,
        "invalid_answers": sum(s["invalid"] for s in per.values()),
    }
