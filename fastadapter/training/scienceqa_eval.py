"""ScienceQA evaluation: the answer letter of each problem, accuracy overall and by category.

The model's answer is the option whose response (``The answer is (A).``, see
:func:`~fastadapter.training.scienceqa.format_answer`) it finds most likely: the summed log-probability of the
response tokens, EOS included, given the question (and the image). Scoring every option is exact where
generating and parsing a letter depends on the model following the format; the options differ only in the
letter, so this is the answer-letter choice. Every option of every problem is one packed sequence (varlen, no
padding), each with its problem's image through the per-sequence prompts.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..setting_error import SettingError
from .data import IGNORE_INDEX, tokenize_rows
from .image_data import ImageExample, collate_images
from .packing import collate_packed, pack_examples
from .scienceqa import LETTERS, Problem, format_answer, format_question


def option_examples(problems: Sequence[Problem], tokenizer, max_seq_len: int, *, with_images: bool = True
                    ) -> list[tuple[int, int, ImageExample]]:
    """``(problem index, option index, example)`` of every option of every problem.

    Raises:
        ValueError: a problem whose question and answer do not fit in ``max_seq_len`` tokens (its answer would
            be cut).
    """
    out = []
    for pi, problem in enumerate(problems):
        rows = [{"instruction": format_question(problem), "input": "", "output": format_answer(LETTERS[c])}
                for c in range(len(problem.choices))]
        examples = tokenize_rows(rows, tokenizer, max_seq_len)
        if len(examples) != len(rows) or any(e.truncated for e in examples):
            raise SettingError("problem {pid}: the question and its answer need more than {max_seq_len} {length} "
                               "tokens; raise {max_seq_len}", pid=problem.pid, length=max_seq_len)
        image = problem.image if with_images else None
        out.extend((pi, c, ImageExample(e.tokens, e.labels, image=image, key=problem.pid))
                   for c, e in enumerate(examples))
    return out


@torch.no_grad()
def predict(model, problems: Sequence[Problem], tokenizer, *, max_seq_len: int, batch_tokens: int = 4096,
            pixels: Optional[Callable] = None, device=None, progress: Optional[Callable[[int], None]] = None
            ) -> list[int]:
    """The chosen option index of each problem.

    Args:
        model: a :class:`~fastadapter.LlamaModel` or a :class:`~fastadapter.vision.MultimodalLlama` (called
            packed, with ``pixel_values`` and ``image_index`` when ``pixels`` is given).
        pixels: image paths → ``pixel_values [M, 3, H, W]`` (:class:`~fastadapter.training.image_data.PixelCache`);
            None: the problems are scored without their images.
        progress: called with the number of options scored after each packed row.
    """
    options = option_examples(problems, tokenizer, max_seq_len, with_images=pixels is not None)
    if device is None:
        device = next(model.parameters()).device
    scores = torch.empty(len(options), dtype=torch.float64)
    rows = pack_examples([len(e) for _, _, e in options], max(batch_tokens, max(len(e) for *_, e in options)))
    model.eval()
    done = 0
    for row in rows:
        examples = [options[i][2] for i in row]
        batch = (collate_images(examples, pixels) if pixels is not None else collate_packed(examples)).to(device)
        extra = batch.extra_inputs()
        positions = (batch.labels[0] != IGNORE_INDEX).nonzero().squeeze(1)
        logits = model(batch.tokens, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen,
                       logits_positions=positions, **extra)[0]
        logp = F.log_softmax(logits.float(), dim=-1).gather(1, batch.labels[0, positions][:, None]).squeeze(1)
        sequence = torch.searchsorted(batch.cu_seqlens[1:].long(), positions, right=True)
        per_sequence = torch.zeros(len(row), dtype=torch.float64, device=logp.device)
        per_sequence.index_add_(0, sequence, logp.double())
        scores[torch.tensor(row)] = per_sequence.cpu()
        done += len(row)
        if progress is not None:
            progress(done)
    best = [(-float("inf"), 0)] * len(problems)
    for (pi, c, _), score in zip(options, scores.tolist()):
        if score > best[pi][0]:
            best[pi] = (score, c)
    return [c for _, c in best]


def accuracy_report(problems: Sequence[Problem], predictions: Sequence[int]) -> dict:
    """Accuracy overall and by subject, context modality (TXT / IMG / NO) and grade (and G1-6 / G7-12).

    Returns:
        ``{"problems", "correct", "accuracy", "chance", "by_subject": {name: {"count", "correct", "accuracy"}},
        "by_context": ..., "by_grade": ..., "predictions": {pid: letter}}`` (``chance``: the accuracy of guessing,
        the mean of 1 / options).
    """
    if len(problems) != len(predictions) or not problems:
        raise ValueError(f"need one prediction per problem (and at least one problem), got {len(problems)} "
                         f"problems and {len(predictions)} predictions")
    groups: dict[str, dict[str, list[int]]] = {"subject": defaultdict(lambda: [0, 0]),
                                               "context": defaultdict(lambda: [0, 0]),
                                               "grade": defaultdict(lambda: [0, 0])}
    correct = 0
    for problem, choice in zip(problems, predictions):
        hit = int(choice == problem.answer)
        correct += hit
        for kind, names in problem.categories().items():
            for name in names:
                groups[kind][name][0] += 1
                groups[kind][name][1] += hit

    def table(counts):
        return {name: {"count": n, "correct": k, "accuracy": k / n} for name, (n, k) in sorted(counts.items())}

    return {"problems": len(problems), "correct": correct, "accuracy": correct / len(problems),
            "chance": sum(1 / len(p.choices) for p in problems) / len(problems),
            "by_subject": table(groups["subject"]), "by_context": table(groups["context"]),
            "by_grade": table(groups["grade"]),
            "predictions": {p.pid: LETTERS[c] for p, c in zip(problems, predictions)}}
