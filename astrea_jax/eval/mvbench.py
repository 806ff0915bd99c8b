"""MVBench (lmms-eval group `mvbench`, tasks `mvbench_<task>`, `lmms_eval/tasks/mvbench/utils.py`): 20 temporal
tasks of multiple-choice questions about short clips (200 questions each).

Data: OpenGVLab/MVBench as the Hub ships it: `json/<task>.json`, a JSON list per task of {video, question,
candidates (2-5 option texts), answer (the right candidate's text)}, some with `start`/`end` seconds, which lmms-eval
does not use (the video revision ships those clips cut); the clips under `video/`, unpacked from its zips, each task's
in the folder `TASK_FOLDERS` names (lmms-eval's DATA_LIST as fixed in April 2025 for that revision; a clip is a file,
or a folder of frames). `load` takes the MVBench folder (or its json/ folder) and reads the `tasks` asked for (all 20
by default, in lmms-eval's group order); the default video_root is the `video` folder next to json/. MVBench has no
question ids: an example's is '<task>/<k>', k its position in the task's file.

Prompt (`mvbench_doc_to_text`, post_prompt "Only give the best option.\\n"): "Question:" + the question,
"\\nOption:\\n", a line "(A) text" per candidate, then "Only give the best option.\\n". Up to 16 new tokens.

Score (`mcq_acc`, `mvbench_process_results`, `mvbench_aggregate_results`): prediction and answer letter are both read
by `mvbench_read` and compared. A task's accuracy is right / answered, where a question is answered when its
prediction is not empty (lmms-eval leaves empty predictions out of the count); `accuracy` is the mean of the task
accuracies present (MVBench's average; lmms-eval's group yaml defines no aggregate), `tasks` each task's.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Sequence

from astrea_jax.eval import answers as answers_lib
from astrea_jax.eval.evaluator import Evaluator, Example, VideoRef, mean, means_by

# task -> the folder of its clips under the video root, in the order of lmms-eval's `mvbench` group.
TASK_FOLDERS = {
    'action_sequence': 'star/Charades_segment', 'moving_count': 'clevrer/video_validation',
    'action_prediction': 'star/Charades_segment', 'episodic_reasoning': 'tvqa/video_fps3_hq_segment',
    'action_antonym': 'ssv2_video_mp4', 'action_count': 'perception/videos', 'scene_transition': 'scene_qa/video',
    'object_shuffle': 'perception/videos', 'object_existence': 'clevrer/video_validation',
    'fine_grained_pose': 'nturgbd_convert', 'unexpected_action': 'FunQA_test/test',
    'moving_direction': 'clevrer/video_validation', 'state_change': 'perception/videos',
    'object_interaction': 'star/Charades_segment', 'character_order': 'perception/videos',
    'action_localization': 'sta/sta_video_segment', 'counterfactual_inference': 'clevrer/video_validation',
    'fine_grained_action': 'Moments_in_Time_Raw/videos', 'moving_attribute': 'clevrer/video_validation',
    'egocentric_navigation': 'vlnqa',
}
TASKS = tuple(TASK_FOLDERS)
POST_PROMPT = 'Only give the best option.\n'
FIELDS = ('video', 'question', 'candidates', 'answer')
_OPTION_LINE = re.compile(r'^([A-E])\.\s*(.+)$', re.IGNORECASE)
_LONE_LETTER = re.compile(r'\b([A-E])\b', re.IGNORECASE)


def prompt(question: str, candidates: Sequence[str]) -> str:
  """mvbench_doc_to_text."""
  options = ''.join(f'({letter}) {option}\n' for letter, option in
                    zip(answers_lib.option_letters(len(candidates)), candidates))
  return f'Question:{question}\nOption:\n{options}{POST_PROMPT}'


def mvbench_read(text: str) -> str:
  """mcq_acc's `process`: a stripped text "X. something" (X in A-E, any case) -> 'X'; else newlines and tabs ->
  spaces, the EvalAI punctuation rule (`answers.evalai_punctuation`), the ends stripped of ' " ) (, lower-cased;
  then the first letter a-e standing alone as a word, upper-cased ("the answer is b" -> 'B'; "a dog" -> 'A'), or,
  when there is none, that processed text itself."""
  option = _OPTION_LINE.match(text.strip())
  if option:
    return option.group(1).upper()
  text = answers_lib.evalai_punctuation(text.replace('\n', ' ').replace('\t', ' ').strip())
  text = text.strip("'").strip('"').strip(')').strip('(').strip().lower()
  letter = _LONE_LETTER.search(text)
  return letter.group(1).upper() if letter else text


class MVBench(Evaluator):
  """MVBench accuracy per task and their mean (module doc)."""
  name = 'mvbench'
  max_new_tokens = 16
  default_split = 'train'
  headline = 'accuracy'
  id_column = 'id'
  video_folder = 'video'

  def __init__(self, split: str | None = None, tasks: Sequence[str] = TASKS):
    super().__init__(split)
    unknown = [t for t in tasks if t not in TASK_FOLDERS]
    if unknown or not tasks:
      raise ValueError(f'MVBench tasks {tuple(tasks)}: unknown {unknown}; expected a non-empty subset of {TASKS}')
    self.tasks = tuple(tasks)

  def shards(self, path: str) -> list[str]:
    """The `<task>.json` file of each task, in the folder `path` or its json/ folder."""
    folder = os.path.join(path, 'json') if os.path.isdir(os.path.join(path, 'json')) else path
    files = [os.path.join(folder, f'{task}.json') for task in self.tasks]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
      raise FileNotFoundError(f'{path}: no MVBench task file(s) {missing}; expected OpenGVLab/MVBench\'s '
                              'json/<task>.json for each task asked for')
    return files

  def read_rows(self, shards: Sequence[str]) -> list[dict[str, Any]]:
    """Every question of the task files, with its `task` and id '<task>/<k>'."""
    rows = []
    for path in shards:
      task = os.path.basename(path)[:-len('.json')]
      with open(path, encoding='utf-8') as f:
        questions = json.load(f)
      if not isinstance(questions, list):
        raise ValueError(f'{path}: expected a JSON list of questions {{{", ".join(FIELDS)}}}')
      for k, question in enumerate(questions):
        missing = [field for field in FIELDS if field not in question]
        if missing:
          raise ValueError(f'{path} item {k}: missing {missing}; an MVBench question has {FIELDS}')
        rows.append({**question, 'task': task, 'id': f'{task}/{k}'})
    return rows

  def from_row(self, row: Mapping[str, Any], question_id: str) -> Example:
    candidates = list(row['candidates'])
    if row['answer'] not in candidates:
      raise ValueError(f'MVBench question {question_id}: answer {row["answer"]!r} is not one of its candidates '
                       f'{candidates}')
    letter = answers_lib.option_letters(len(candidates))[candidates.index(row['answer'])]
    video = VideoRef(os.path.join(TASK_FOLDERS[row['task']], row['video']), question_id)
    return Example(question_id, (), prompt(row['question'], candidates), letter,
                   {'task': row['task'], 'candidates': candidates}, video)

  def score_example(self, example: Example, prediction: str) -> dict[str, Any]:
    parsed = mvbench_read(prediction)
    return {'score': float(parsed == mvbench_read(example.answer)), 'parsed': parsed, 'answered': prediction != ''}

  def aggregate(self, examples: Sequence[Example], per_example: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per task: right / answered (0 when none is answered); `accuracy`: their mean."""
    answered = [(e.meta['task'], p['score']) for e, p in zip(examples, per_example) if p['answered']]
    tasks = {t: 0.0 for t in self.tasks if any(e.meta['task'] == t for e in examples)}
    tasks.update(means_by([t for t, _ in answered], [score for _, score in answered]))
    return {'accuracy': mean(list(tasks.values())), 'tasks': tasks, 'num_questions': len(per_example),
            'num_unanswered': len(per_example) - len(answered)}
