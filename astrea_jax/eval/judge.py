"""The GPT judge of open-ended video QA (MSVD-QA, ActivityNet-QA: `open_video_qa`), supplied by the caller.

The paper (§4.2) scores open-ended video answers with GPT-3.5: for each question the judge is shown the question,
the correct answer and the prediction and says whether they match (yes/no) and how well (an integer 0-5). That is
Video-ChatGPT's evaluation, which lmms-eval runs as `gpt_eval` (`lmms_eval/tasks/activitynetqa/utils.py`: `get_eval`
with Video-ChatGPT's prompt, then `parse_score`) and Video-LLaVA as `videollava/eval/video/eval_video_qa.py`. We have
no network and do not imitate the judge: a `Judge` is the caller's callable (one that calls an API, or a stand-in),
named as 'module:callable' (`load_judge`: `config.eval.judge`, `launch.evaluate --config.eval.judge=my_module:my_judge`)
or passed to the evaluator (`registry.get_evaluator('msvd_qa', judge=my_judge)`).

lmms-eval's `parse_score` makes the reply's score an int (`int(score)`): a judge that parses a GPT reply does the
same. A judge that fails raises; no question is counted 'no' / 0 for a failed request, as lmms-eval does.
"""

from __future__ import annotations

import importlib
import numbers
from typing import Any, Protocol

SCORE_RANGE = (0.0, 5.0)


class Judge(Protocol):
  """Video-ChatGPT's judge: (question, correct answer, prediction) -> (whether they match, a score 0-5)."""

  def __call__(self, question: str, answer: str, prediction: str) -> tuple[bool, float]:
    ...


def load_judge(spec: str) -> Judge:
  """The callable that 'module:callable' names (a dotted module path importable from sys.path, and an attribute of
  it, itself dotted if need be). ValueError naming the spec when it cannot be imported or is not callable."""
  module_name, sep, attribute = spec.partition(':')
  if not sep or not module_name or not attribute:
    raise ValueError(f'judge {spec!r}: expected "module:callable", e.g. my_package.judges:gpt35_judge')
  try:
    target: Any = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f'judge {spec!r}: cannot import module {module_name!r} ({e})') from None
  for part in attribute.split('.'):
    if not hasattr(target, part):
      raise ValueError(f'judge {spec!r}: module {module_name!r} has no attribute {attribute!r}')
    target = getattr(target, part)
  if not callable(target):
    raise ValueError(f'judge {spec!r}: {attribute!r} is a {type(target).__name__}, not a callable '
                     '(question, answer, prediction) -> (yes, score)')
  return target


def judged(judge: Judge, question: str, answer: str, prediction: str, question_id: str) -> tuple[bool, float]:
  """The judge's (yes, score) for one question, checked: a bool-like verdict and a number in 0-5."""
  verdict = judge(question, answer, prediction)
  if not (isinstance(verdict, (tuple, list)) and len(verdict) == 2):
    raise TypeError(f'question {question_id}: the judge returned {verdict!r}; expected a tuple (yes: bool, '
                    'score: float)')
  yes, score = verdict
  if isinstance(score, bool) or not isinstance(score, numbers.Real) or not SCORE_RANGE[0] <= score <= SCORE_RANGE[1]:
    raise ValueError(f'question {question_id}: the judge scored {score!r}; expected a number in {SCORE_RANGE}')
  return bool(yes), float(score)
