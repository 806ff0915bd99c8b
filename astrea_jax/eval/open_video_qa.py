"""Open-ended video QA scored by a GPT judge (`judge.Judge`): MSVD-QA and ActivityNet-QA (paper Table 2, OE-VQA).

Without a judge the evaluators load their questions, but `score` refuses (there is no offline stand-in for GPT-3.5).
Scores (lmms-eval `activitynetqa_aggregate_accuracy` / `activitynetqa_aggregate_score`, Video-LLaVA's
`eval_video_qa.py`): `accuracy`, the share of questions the judge says yes to (a fraction; lmms-eval prints
percent), and `score`, the mean of the judge's 0-5 scores over all questions.

- `activitynet_qa` (lmms-eval task `activitynetqa`, `lmms_eval/tasks/activitynetqa/utils.py`): lmms-lab/ActivityNetQA,
  split `test` (`data/test-*.parquet`), columns `question_id`, `video_name`, `question`, `answer`, `type`; clips
  `all_test/v_<video_name>.mp4` (else .webm, .mkv), unpacked from the repo's `videos_chunked_*.zip`. Prompt: the
  question capitalised (`str.capitalize`, which also lower-cases the rest), "?", then " Answer the question using a
  single word or phrase.". Up to 64 new tokens. The judge gets the question as the dataset has it.
- `msvd_qa` (no lmms-eval task; Video-LLaVA's `videollava/eval/video/run_inference_video_qa.py` and the layout of
  its `GPT_Zero_Shot_QA/MSVD_Zero_Shot_QA` folder): `test_q.json`, a JSON list of {video_name, question_id,
  question}, and `test_a.json`, the answers {answer, ...} in the same order (Video-LLaVA pairs them by position; a
  `question_id` in an answer must agree); clips `videos/<video_name>` + .mp4, .avi, .mov or .mkv (MSVD's are .avi).
  Prompt: the question as it is. Up to 1024 new tokens (Video-LLaVA's).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

from astrea_jax.eval import judge as judge_lib
from astrea_jax.eval.evaluator import Evaluator, Example, VideoRef, mean

SHORT_ANSWER_SPACED = ' Answer the question using a single word or phrase.'
MSVD_QUESTIONS, MSVD_ANSWERS = 'test_q.json', 'test_a.json'
MSVD_EXTENSIONS = ('.mp4', '.avi', '.mov', '.mkv')


class JudgedEvaluator(Evaluator):
  """An open-ended video QA benchmark scored by a GPT judge (`judge.Judge`); without one `score` refuses."""
  headline = 'accuracy'
  image_columns = ()

  def __init__(self, split: str | None = None, judge: judge_lib.Judge | None = None):
    super().__init__(split)
    self.judge = judge

  @classmethod
  def from_config(cls, config: Any) -> JudgedEvaluator:
    """The evaluator with the judge `config.eval.judge` names (`judge.load_judge`; '' = none)."""
    spec = config.eval.get('judge', '')
    return cls(judge=judge_lib.load_judge(spec) if spec else None)

  def score(self, examples: Sequence[Example], predictions: Sequence[str]) -> tuple[dict[str, Any],
                                                                                    list[dict[str, Any]]]:
    """The judge's verdicts (module doc); refuses without a judge."""
    if self.judge is None:
      raise ValueError(f'{self.name} is scored by a GPT judge (gpt-3.5 says whether each prediction matches the '
                       'answer, and scores it 0-5), which this evaluator does not imitate: give it one, a callable '
                       '(question, answer, prediction) -> (yes, score): launch.evaluate '
                       '--config.eval.judge=my_module:my_judge (config.eval.judge), or '
                       f'registry.get_evaluator({self.name!r}, judge=my_judge)')
    return super().score(examples, predictions)

  def score_example(self, example: Example, prediction: str) -> dict[str, Any]:
    yes, score = judge_lib.judged(self.judge, example.meta['question'], str(example.answer), prediction,
                                  example.question_id)
    return {'score': float(yes), 'judge_yes': yes, 'judge_score': score}

  def aggregate(self, examples: Sequence[Example], per_example: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {'accuracy': mean([p['score'] for p in per_example]),
            'score': mean([p['judge_score'] for p in per_example]), 'num_questions': len(per_example)}


class ActivityNetQA(JudgedEvaluator):
  """ActivityNet-QA, judged (module doc)."""
  name = 'activitynet_qa'
  max_new_tokens = 64
  default_split = 'test'
  columns = ('question_id', 'video_name', 'question', 'answer')
  optional_columns = ('type',)
  video_folder = 'all_test'

  def from_row(self, row: Mapping[str, Any], question_id: str) -> Example:
    name = f'v_{row["video_name"]}'
    video = VideoRef(f'{name}.mp4', question_id, alternatives=(f'{name}.webm', f'{name}.mkv'))
    return Example(question_id, (), f'{row["question"].capitalize()}?{SHORT_ANSWER_SPACED}', row['answer'],
                   {'question': row['question'], **self.optional_meta(row)}, video)


class MSVDQA(JudgedEvaluator):
  """MSVD-QA, judged (module doc)."""
  name = 'msvd_qa'
  max_new_tokens = 1024
  default_split = 'test'
  video_folder = 'videos'

  def shards(self, path: str) -> list[str]:
    """The question file `test_q.json` in the folder `path`."""
    questions = os.path.join(path, MSVD_QUESTIONS)
    if not os.path.isfile(questions):
      raise FileNotFoundError(f'{path}: no {MSVD_QUESTIONS}; expected the MSVD_Zero_Shot_QA folder of Video-LLaVA\'s '
                              f'evaluation data ({MSVD_QUESTIONS}, {MSVD_ANSWERS}, videos/)')
    return [questions]

  def read_rows(self, shards: Sequence[str]) -> list[dict[str, Any]]:
    """The questions of test_q.json, each with the answer at its position in test_a.json next to it."""
    (questions_path,) = shards
    answers_path = os.path.join(os.path.dirname(questions_path), MSVD_ANSWERS)
    questions, answers = _json_list(questions_path), _json_list(answers_path)
    if len(questions) != len(answers):
      raise ValueError(f'{questions_path} has {len(questions)} questions and {answers_path} {len(answers)} answers; '
                       'expected one answer per question, in the same order')
    rows = []
    for k, (question, answer) in enumerate(zip(questions, answers)):
      where = f'{questions_path} item {k}'
      missing = [f for f in ('video_name', 'question_id', 'question') if f not in question]
      if missing or 'answer' not in answer:
        raise ValueError(f'{where}: missing {missing or ["answer (in " + answers_path + ")"]}; expected a question '
                         '{video_name, question_id, question} and an answer {answer}')
      if 'question_id' in answer and str(answer['question_id']) != str(question['question_id']):
        raise ValueError(f'{where}: question_id {question["question_id"]!r}, but answer {k} of {answers_path} is for '
                         f'{answer["question_id"]!r}; expected the answers in the order of the questions')
      rows.append({**question, 'answer': answer['answer']})
    return rows

  def from_row(self, row: Mapping[str, Any], question_id: str) -> Example:
    names = [f'{row["video_name"]}{extension}' for extension in MSVD_EXTENSIONS]
    return Example(question_id, (), row['question'], row['answer'], {'question': row['question']},
                   VideoRef(names[0], question_id, alternatives=tuple(names[1:])))


def _json_list(path: str) -> list[dict[str, Any]]:
  """A JSON file holding a list of objects."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file')
  with open(path, encoding='utf-8') as f:
    document = json.load(f)
  if not isinstance(document, list) or not all(isinstance(item, dict) for item in document):
    raise ValueError(f'{path}: expected a JSON list of objects')
  return document
