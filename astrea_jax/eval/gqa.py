"""GQA (lmms-eval task `gqa`, `lmms_eval/tasks/gqa/{gqa.yaml,utils.py}`): compositional questions, short answers.

Data: lmms-lab/GQA, two configs of split `testdev`: `testdev_balanced_instructions` (columns `id`, `imageId`,
`question`, `answer`) and `testdev_balanced_images` (columns `id`, `image`), joined on imageId = id. `load(path)`
takes the dataset folder holding both config folders, or the instructions folder with `image_root` = the images
folder. Prompt: the question + "\\nAnswer the question using a single word or phrase.". Up to 16 new tokens.

Score: lm-eval's `exact_match` with ignore_case and ignore_punctuation
(`answers.exact_match_ignoring_case_punctuation`): lower-cased, ASCII punctuation deleted, equal.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from astrea_jax.eval import answers as answers_lib
from astrea_jax.eval import readers
from astrea_jax.eval.evaluator import SHORT_ANSWER, Evaluator, Example


class GQA(Evaluator):
  """GQA exact-match accuracy (module doc). `instructions` / `images` name the two config folders."""
  name = 'gqa'
  max_new_tokens = 16
  default_split = 'testdev'
  headline = 'accuracy'
  reads_llava_questions = True
  columns = ('id', 'imageId', 'question', 'answer')
  image_columns = ()
  id_column = 'id'

  def __init__(self, split: str | None = None, instructions: str = 'testdev_balanced_instructions',
               images: str = 'testdev_balanced_images'):
    super().__init__(split)
    self.instructions, self.images = instructions, images

  def shards(self, path: str) -> list[str]:
    """The instruction shards: under `path/<instructions>` when it exists, else under `path`."""
    folder = os.path.join(path, self.instructions)
    return readers.parquet_shards(folder if os.path.isdir(folder) else path, self.split)

  def read_parquet(self, shards: Sequence[str], image_root: str | None) -> list[Example]:
    """The instruction rows, each with the image of its imageId from the images config (`image_root`, by default
    the `images` folder next to the instructions folder)."""
    if image_root is None:
      instructions_folder = os.path.dirname(shards[0])
      if os.path.basename(instructions_folder) == 'data':
        instructions_folder = os.path.dirname(instructions_folder)
      image_root = os.path.join(os.path.dirname(instructions_folder), self.images)
      if not os.path.isdir(image_root):
        raise FileNotFoundError(f'GQA images: no folder {image_root} next to the instructions {instructions_folder}; '
                                f'pass image_root = the {self.images} folder')
    image_rows = readers.read_parquet_rows(readers.parquet_shards(image_root, self.split), ('id',),
                                           image_columns=('image',))
    images = {str(r['id']): r['image'] for r in image_rows}
    rows = self.read_rows(shards)
    for r in rows:
      if str(r['imageId']) not in images:
        raise ValueError(f'GQA question {r["id"]}: image {r["imageId"]!r} is not in the images under {image_root}')
      r['image'] = images[str(r['imageId'])]
    return self.from_rows(rows)

  def from_row(self, row: Mapping[str, Any], question_id: str) -> Example:
    return Example(question_id, (row['image'],), row['question'] + SHORT_ANSWER, row['answer'],
                   {'image_id': str(row['imageId'])})

  def score_example(self, example: Example, prediction: str) -> dict[str, Any]:
    return {'score': float(answers_lib.exact_match_ignoring_case_punctuation(prediction, str(example.answer)))}
