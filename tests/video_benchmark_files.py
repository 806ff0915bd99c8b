"""Small video benchmark folders in the layouts their datasets ship, for tests: the question files in each one's own
format and column names, and the clips as empty placeholder files (nothing here is ever decoded), each where the
dataset unpacks it (the evaluator's default video_root).

- MVBench (OpenGVLab/MVBench): JSON, json/<task>.json; clips video/<task folder>/<video> (a folder of frames where
  the video name has no extension, as episodic_reasoning's were).
- Video-MME (lmms-lab/Video-MME): parquet, videomme/test-00000-of-00001.parquet; clips data/<videoID>.mp4.
- EgoSchema (lmms-lab/egoschema): parquet, <config>/test-00000-of-00001.parquet (config Subset, MC, GENERATION);
  clips videos/<video_idx>.mp4.
- Perception Test (lmms-lab/PerceptionTest_Val): parquet, mc_question_val/validation-00000-of-00001.parquet; clips
  videos/<video_name>.mp4.
- ActivityNet-QA (lmms-lab/ActivityNetQA): parquet, data/test-00000-of-00001.parquet; clips all_test/v_<video_name>.mp4.
- MSVD-QA (Video-LLaVA's MSVD_Zero_Shot_QA): JSON, test_q.json and test_a.json; clips videos/<video_name>.avi.

Each writer returns the folder to pass to `load`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

from benchmark_files import shard_path, write_parquet


def touch_clip(path: str) -> str:
  """An empty file at `path` (a folder of one empty frame when `path` has no extension), standing for a clip."""
  if os.path.splitext(path)[1]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, 'wb').close()
  else:
    os.makedirs(path, exist_ok=True)
    open(os.path.join(path, '00001.jpg'), 'wb').close()
  return path


def _write_json(path: str, document: Any) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(document, f)
  return path


def write_mvbench(folder: str, tasks: Mapping[str, Sequence[Mapping[str, Any]]],
                  task_folders: Mapping[str, str]) -> str:
  """json/<task>.json for each task: its questions {video, question, candidates, answer} (and any other keys, e.g.
  start/end), and each question's clip under video/<task_folders[task]>/."""
  for task, questions in tasks.items():
    _write_json(os.path.join(folder, 'json', f'{task}.json'), [dict(q) for q in questions])
    for q in questions:
      touch_clip(os.path.join(folder, 'video', task_folders[task], q['video']))
  return folder


def write_videomme(folder: str, rows: Sequence[Mapping[str, Any]]) -> str:
  """videomme/test-00000-of-00001.parquet with the Hub's columns (video_id and url filled in), data/<videoID>.mp4."""
  table = [{'video_id': f'{k:03d}', 'duration': r['duration'], 'domain': r['domain'],
            'sub_category': r['sub_category'], 'url': f'https://www.youtube.com/watch?v={r["videoID"]}',
            'videoID': r['videoID'], 'question_id': r['question_id'], 'task_type': r['task_type'],
            'question': r['question'], 'options': list(r['options']), 'answer': r['answer']}
           for k, r in enumerate(rows)]
  write_parquet(shard_path(folder, 'test', 'videomme'), table, image_columns=())
  for r in rows:
    touch_clip(os.path.join(folder, 'data', f'{r["videoID"]}.mp4'))
  return folder


def write_egoschema(folder: str, rows: Sequence[Mapping[str, Any]], config: str = 'Subset') -> str:
  """<config>/test-00000-of-00001.parquet: question_idx (the row number), question, video_idx, option (five
  "A. ..." strings), answer (a string index, or None as in the full-set configs); videos/<video_idx>.mp4. Returns
  the config folder."""
  table = [{'question_idx': str(k), 'question': r['question'], 'video_idx': r['video_idx'], 'option': list(r['option']),
            'answer': r['answer']} for k, r in enumerate(rows)]
  write_parquet(shard_path(folder, 'test', config), table, image_columns=())
  for r in rows:
    touch_clip(os.path.join(folder, 'videos', f'{r["video_idx"]}.mp4'))
  return os.path.join(folder, config)


def write_perceptiontest(folder: str, rows: Sequence[Mapping[str, Any]]) -> str:
  """mc_question_val/validation-00000-of-00001.parquet: video_name, question_id, question, options, answer_id, area,
  reasoning, tag; videos/<video_name>.mp4. Returns the config folder."""
  table = [{'video_name': r['video_name'], 'question_id': r['question_id'], 'question': r['question'],
            'options': list(r['options']), 'answer_id': r['answer_id'], 'area': r.get('area', 'physics'),
            'reasoning': r.get('reasoning', 'descriptive'), 'tag': list(r.get('tag', ['motion']))} for r in rows]
  write_parquet(shard_path(folder, 'validation', 'mc_question_val'), table, image_columns=())
  for r in rows:
    touch_clip(os.path.join(folder, 'videos', f'{r["video_name"]}.mp4'))
  return os.path.join(folder, 'mc_question_val')


def write_activitynet_qa(folder: str, rows: Sequence[Mapping[str, Any]], extension: str = '.mp4') -> str:
  """data/test-00000-of-00001.parquet: question_id, video_name, question, answer, type; all_test/v_<video_name> +
  `extension`."""
  table = [{'video_name': r['video_name'], 'question_id': r['question_id'], 'question': r['question'],
            'answer': r['answer'], 'type': r.get('type', 0)} for r in rows]
  write_parquet(shard_path(folder, 'test'), table, image_columns=())
  for r in rows:
    touch_clip(os.path.join(folder, 'all_test', f'v_{r["video_name"]}{extension}'))
  return folder


def write_msvd_qa(folder: str, rows: Sequence[Mapping[str, Any]]) -> str:
  """test_q.json [{video_name, question_id, question}], test_a.json [{answer, question_id}] in the same order,
  videos/<video_name>.avi."""
  _write_json(os.path.join(folder, 'test_q.json'),
              [{'video_name': r['video_name'], 'question_id': r['question_id'], 'question': r['question']}
               for r in rows])
  _write_json(os.path.join(folder, 'test_a.json'),
              [{'answer': r['answer'], 'question_id': r['question_id']} for r in rows])
  for r in rows:
    touch_clip(os.path.join(folder, 'videos', f'{r["video_name"]}.avi'))
  return folder
