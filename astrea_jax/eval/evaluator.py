"""The benchmark evaluator interface (big_vision style: one evaluator per benchmark, picked by name from
`registry.REGISTRY`) and the layout of a benchmark's result JSON.

An evaluation is four steps, the model's part in the middle:
  evaluator = registry.get_evaluator('mme')
  examples = evaluator.load(path, image_root=..., answers=..., limit=...)    # list[Example], images not decoded
  predictions = [generate(e.prompt, [ref.load() for ref in e.images]) for e in examples]   # the caller's model
  (a video benchmark: load(path, video_root=...), and each example's clip is `e.video.load(num_frames)`)
  scores, per_example = evaluator.score(examples, predictions)
  result = result_json(evaluator.name, settings, scores, examples, predictions, per_example)   # -> <name>.json

`Example.prompt` is the user text of one single-turn conversation exactly as lmms-eval's `doc_to_text` builds it for
the benchmark (its default `lmms_eval_specific_kwargs`), without any chat template and without an image
placeholder: the caller puts the image(s) (or the clip's frames) first ("<image>\\n" + prompt, as LLaVA does) and
applies the template.
Generation is greedy, at most `evaluator.max_new_tokens` new tokens (the benchmark's lmms-eval `generation_kwargs`;
1024, lmms-eval's LLaVA default, where the task sets none). `score` takes the decoded texts cut at the template's end
marker; like lmms-eval (`ConfigurableTask.process_results`) every scorer strips them first.

Scores: accuracies are fractions in [0, 1] (the summary prints percent); MME scores are points (perception out of
2000, cognition out of 800). `evaluator.headline` names the score comparable with the paper's Table 1.
"""

from __future__ import annotations

import abc
import dataclasses
import os
from typing import Any, ClassVar, Mapping, Sequence

from astrea_jax.eval import readers
from astrea_jax.eval.readers import ImageRef, VideoRef

__all__ = ['Evaluator', 'Example', 'ImageRef', 'LETTER_ANSWER', 'SHORT_ANSWER', 'VideoRef', 'mean', 'means_by',
           'result_json', 'unique_ids']


@dataclasses.dataclass(frozen=True)
class Example:
  """One question of a benchmark.

  question_id: unique within the loaded benchmark (the dataset's id; '#k' appended to the k-th repeat of an id the
    dataset gives several questions, e.g. MME's two questions per image; the row number where it has none).
  images: the question's images in order, decoded by `ImageRef.load()` (one for every image benchmark here but MMMU
    (up to 7) and SEED-Bench video questions (frames); none for a text-only question or a video question).
  prompt: the user text (module doc).
  answer: the ground truth in the dataset's own form (a string, MMBench/SEED a letter, ScienceQA the letter of its
    answer index, VQAv2 the list of answer dicts, TextVQA/DocVQA a list of strings).
  meta: what the scorer needs besides the answer (category, options, index, ...).
  video: a video question's clip, decoded by `VideoRef.load(num_frames)` (None for an image question).
  """
  question_id: str
  images: tuple[ImageRef, ...]
  prompt: str
  answer: Any
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  video: VideoRef | None = None

  def load_images(self) -> list[Any]:
    """The decoded RGB PIL images."""
    return [ref.load() for ref in self.images]


# The answer instructions (lmms-eval `post_prompt`s) most benchmarks append to the question.
SHORT_ANSWER = '\nAnswer the question using a single word or phrase.'
LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."


class Evaluator(abc.ABC):
  """One benchmark: its reader, prompts and scorer.

  Subclasses set `name` (the registry key), `max_new_tokens`, `default_split` (the split lmms-eval evaluates) and
  `headline` (the key of `score`'s dict comparable with the paper), and say what is particular to the benchmark:
  - reading: the parquet `columns` every shard must have, its `image_columns`, the `optional_columns` read when
    present, the `id_column` (None: the row number), and `from_row`, one row -> an Example (`read_parquet` or
    `read_rows` when reading is more than that: GQA's join, SEED-Bench's filter); benchmarks that can be read from a
    LLaVA question .jsonl set `reads_llava_questions` and, when the scorer needs more than the answer, `llava_meta`;
  - scoring: `score_example`, one stripped prediction -> its per-example entry, and `aggregate`, the entries -> the
    benchmark's scores (by default the mean example score as `headline`, and `num_questions`);
  - a video benchmark: `video_folder`, the folder its dataset keeps the clips in (the default video_root), and
    `from_row` gives each example a `VideoRef` by name; `load` puts the names under the video_root.
  """
  reads_llava_questions: ClassVar[bool] = False
  has_default_data: ClassVar[bool] = False  # whether `data_path('')` finds data by itself (the shapes set)
  name: ClassVar[str]
  max_new_tokens: ClassVar[int]
  default_split: ClassVar[str]
  headline: ClassVar[str]
  columns: ClassVar[tuple[str, ...]] = ()
  image_columns: ClassVar[tuple[str, ...]] = ('image',)
  optional_columns: ClassVar[tuple[str, ...]] = ()
  id_column: ClassVar[str | None] = 'question_id'
  video_folder: ClassVar[str | None] = None  # a video benchmark's clip folder next to its data (`video_root`)

  def __init__(self, split: str | None = None):
    self.split = split or self.default_split
    self.default_limit: int | None = None  # the `limit` of a run config's evaluation (`from_config`)

  @classmethod
  def from_config(cls, config: Any) -> Evaluator:
    """The evaluator as a run config (`config.eval`) asks for it: here the benchmark as lmms-eval runs it (its
    default split, `max_new_tokens`, every example)."""
    del config
    return cls()

  def data_path(self, path: str) -> str:
    """The data to read for a `config.eval.benchmarks` entry: `path`; empty is an error (`has_default_data`)."""
    if not path:
      raise ValueError(f'no data given for benchmark {self.name!r}: expected a folder of lmms-lab parquet shards or '
                       'a LLaVA question file (.jsonl)')
    return path

  def load(self, path: str, *, image_root: str | None = None, video_root: str | None = None,
           answers: str | None = None, limit: int | None = None) -> list[Example]:
    """The benchmark's examples from `path`: a folder of lmms-lab parquet shards (or one shard) of `self.split`, or
    a LLaVA question file (.jsonl) whose images are under `image_root`, with answers inline or in `answers`. `limit`
    keeps the first examples (benchmarks that score groups keep whole groups). A video benchmark's clips are under
    `video_root` (default: `default_video_root(path)`); every kept example's clip must exist (`find_videos`)."""
    if limit is not None and limit < 1:
      raise ValueError(f'limit={limit}: expected a positive number of examples, or None for all')
    if path.endswith('.jsonl'):
      if not self.reads_llava_questions:
        raise ValueError(f'{path}: the {self.name} evaluator reads the lmms-lab parquet shards only, not a LLaVA '
                         'question file')
      records = readers.attach_answers(readers.read_llava_questions(path, image_root), answers)
      ids = unique_ids([str(r['question_id']) for r in records])
      examples = [self.from_llava(r, qid) for r, qid in zip(records, ids)]
    else:
      examples = self.read_parquet(self.shards(path), image_root)
    if not examples:
      raise ValueError(f'{path}: no {self.name} questions in it (split {self.split!r})')
    return self.find_videos(self.take(examples, limit), path, video_root)

  def find_videos(self, examples: list[Example], path: str, video_root: str | None) -> list[Example]:
    """The examples with their clips found under `video_root` (default: `default_video_root(path)`) by
    `VideoRef.under`: a missing clip is an error naming the question and the path, before anything is generated."""
    if all(e.video is None for e in examples):
      return examples
    root = video_root or self.default_video_root(path)
    if not os.path.isdir(root):
      raise FileNotFoundError(f'{self.name}: video_root {root} is not a folder; expected the folder of the clips')
    return [dataclasses.replace(e, video=e.video.under(root)) for e in examples]

  def default_video_root(self, path: str) -> str:
    """The benchmark's `video_folder` where its dataset keeps it: in the data folder `path` (the folder of a data
    file) or next to it. FileNotFoundError when there is none."""
    if self.video_folder is None:
      raise ValueError(f'{self.name}: no video_root given, and the benchmark has no default (video_folder)')
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    candidates = [os.path.join(f, self.video_folder) for f in (folder, os.path.dirname(folder))]
    for candidate in candidates:
      if os.path.isdir(candidate):
        return candidate
    raise FileNotFoundError(f'{self.name}: no video_root given and no {self.video_folder!r} folder of clips at '
                            f'{" or ".join(candidates)}; pass video_root (launch.evaluate --video_root), the folder '
                            'the clips were unpacked into')

  def shards(self, path: str) -> list[str]:
    """The parquet shards of `self.split` under `path` (readers.parquet_shards)."""
    return readers.parquet_shards(path, self.split)

  def read_parquet(self, shards: Sequence[str], image_root: str | None) -> list[Example]:
    """Every example of the shards, in file order: `from_rows` of `read_rows`."""
    return self.from_rows(self.read_rows(shards))

  def read_rows(self, shards: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of the shards: `columns`, the present `optional_columns`, `image_columns` as ImageRefs."""
    return readers.read_parquet_rows(shards, self.columns, self.image_columns, self.optional_columns)

  def from_rows(self, rows: Sequence[Mapping[str, Any]]) -> list[Example]:
    """An example per row (`from_row`) with its question id: the row's `id_column` made unique (`unique_ids`), or
    the row number when `id_column` is None."""
    if self.id_column is None:
      ids = [str(k) for k in range(len(rows))]
    else:
      ids = unique_ids([str(r[self.id_column]) for r in rows])
    return [self.from_row(r, qid) for r, qid in zip(rows, ids)]

  @abc.abstractmethod
  def from_row(self, row: Mapping[str, Any], question_id: str) -> Example:
    """The example of one parquet row (`read_rows`)."""

  def optional_meta(self, row: Mapping[str, Any]) -> dict[str, Any]:
    """The row's `optional_columns` that are present."""
    return {k: row[k] for k in self.optional_columns if k in row}

  def from_llava(self, record: Mapping[str, Any], question_id: str) -> Example:
    """An example from a LLaVA question line with its `answer` attached (readers.attach_answers): the prompt is the
    line's `text` as it is (LLaVA's files carry the answer instruction already), the meta `llava_meta`."""
    return Example(question_id, record['images'], record['text'], record['answer'], self.llava_meta(record))

  def llava_meta(self, record: Mapping[str, Any]) -> dict[str, Any]:
    """What the scorer needs from a LLaVA question line besides its answer; nothing by default."""
    return {}

  def take(self, examples: list[Example], limit: int | None) -> list[Example]:
    """The first `limit` examples (all when None)."""
    return examples if limit is None else examples[:limit]

  def score(self, examples: Sequence[Example], predictions: Sequence[str]) -> tuple[dict[str, Any],
                                                                                    list[dict[str, Any]]]:
    """(scores, per_example): the benchmark's metrics (`aggregate`), and for each example the entry
    `score_example` makes of its prediction, stripped first as every lmms-eval scorer does."""
    self.check_predictions(examples, predictions)
    per_example = [self.score_example(e, p.strip()) for e, p in zip(examples, predictions)]
    return self.aggregate(examples, per_example), per_example

  @abc.abstractmethod
  def score_example(self, example: Example, prediction: str) -> dict[str, Any]:
    """One example's entry: its `score` (a float) and what the scorer read from the prediction (e.g. `parsed`)."""

  def aggregate(self, examples: Sequence[Example], per_example: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The benchmark's scores from the per-example entries: here the mean score as `headline`, and
    `num_questions`. A benchmark that scores groups of examples (MMBench's CircularEval) sets the group's result in
    the entries of its members here."""
    return {self.headline: mean([p['score'] for p in per_example]), 'num_questions': len(per_example)}

  def check_predictions(self, examples: Sequence[Example], predictions: Sequence[str]) -> None:
    """Raises unless there is one prediction string per example (and at least one example)."""
    if not examples:
      raise ValueError(f'{self.name}: no examples to score')
    if len(examples) != len(predictions):
      raise ValueError(f'{self.name}: {len(predictions)} predictions for {len(examples)} examples; expected one each')
    for example, prediction in zip(examples, predictions):
      if not isinstance(prediction, str):
        raise TypeError(f'{self.name} question {example.question_id}: prediction {prediction!r} is a '
                        f'{type(prediction).__name__}; expected the decoded text (str)')


def mean(values: Sequence[float]) -> float:
  """The arithmetic mean, sum / count."""
  return sum(values) / len(values)


def means_by(keys: Sequence[Any], values: Sequence[float]) -> dict[Any, float]:
  """{key: mean of the values with that key}, in sorted key order."""
  groups: dict[Any, list[float]] = {}
  for key, value in zip(keys, values):
    groups.setdefault(key, []).append(value)
  return {k: mean(v) for k, v in sorted(groups.items())}


def unique_ids(ids: Sequence[str]) -> list[str]:
  """The ids with '#k' appended to every id that occurs more than once (k = its occurrence, from 0)."""
  counts: dict[str, int] = {}
  for i in ids:
    counts[i] = counts.get(i, 0) + 1
  seen: dict[str, int] = {}
  out = []
  for i in ids:
    if counts[i] > 1:
      out.append(f'{i}#{seen.get(i, 0)}')
      seen[i] = seen.get(i, 0) + 1
    else:
      out.append(i)
  return out


def result_json(benchmark: str, settings: Mapping[str, Any], scores: Mapping[str, Any], examples: Sequence[Example],
                predictions: Sequence[str], per_example: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """The `<benchmark>.json` dict: {benchmark, settings (the caller's: checkpoint, template, max_new_tokens, limit,
  ...), scores, examples: [{question_id, prompt, prediction, answer, score, ...what the scorer parsed}]}."""
  if not len(examples) == len(predictions) == len(per_example):
    raise ValueError(f'{benchmark}: {len(examples)} examples, {len(predictions)} predictions and {len(per_example)} '
                     'per-example scores; expected as many of each')
  entries = []
  for example, prediction, detail in zip(examples, predictions, per_example):
    if 'score' not in detail:
      raise ValueError(f'{benchmark} question {example.question_id}: per-example entry {dict(detail)} has no "score"')
    entries.append({'question_id': example.question_id, 'prompt': example.prompt, 'prediction': prediction,
                    'answer': example.answer, **detail})
  return {'benchmark': benchmark, 'settings': dict(settings), 'scores': dict(scores), 'examples': entries}
