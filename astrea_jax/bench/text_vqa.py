"""The shapes set's held-out VQA with each scene given as text: how much of it the run's LLM learns in the instruction
stage's budget when the visual side is perfect (issue 17, item 3; BENCHMARKS.md section 8).

A training conversation is the instruct stage's with its `<image>` placeholder replaced by the scene as text
(`data.scene_text`: 'scene: red circle [31,46,187,218]; blue square [...]', every object left to right with its box,
i.e. what an encoder whose tokens name each object and its box would hand the LLM). The LLM (`config.llm`, fresh random
weights), the optimizer, the global batch, the sequence length and the instruct stage's learning rate are the run's; it
trains for `steps` optimizer steps (0: the instruct stage's `num_steps`) on the train split's scenes in a seeded random
order. Every `eval_every` steps the first `config.eval.num_scenes` scenes of `config.eval.split` are asked one question
per prompt, as `launch.evaluate` asks them (the scene text where the image would be), answered greedily up to
`config.eval.max_new_tokens` tokens and scored as eval.json scores them (`eval.shapes`: exact match, grounding by IoU >
0.5), next to the train split's majority answers. The JSON line holds every evaluation (`curve`) and, from the last one,
each type's first question's answer and prediction (`samples`).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import ml_collections
import numpy as np

from astrea_jax import config as config_lib
from astrea_jax.bench import timing
from astrea_jax.data import pipeline, scene_text, shapes_tfds, templates
from astrea_jax.data import tokenizer as tokenizer_lib
from astrea_jax.data.shapes_text import VQA_TYPES, Annotations
from astrea_jax.eval import generate, prompting
from astrea_jax.eval import shapes as shapes_eval
from astrea_jax.train import llm_text


def eval_prompts(scenes: Sequence[Annotations], tok: pipeline.TokenizerInfo,
                 template: templates.ChatTemplate) -> tuple[list[list[int]], list[str], list[str]]:
  """Every VQA pair of every scene as one generation prompt (the scene text, a newline, the question) -> (prompt ids,
  question types, answers)."""
  prompts, types, answers = [], [], []
  for ann in scenes:
    for pair in ann.vqa:
      text = f'{scene_text.scene_text(ann)}\n{pair.question}'
      prompts.append(prompting.prompt_tokens(tok, template, text, 0).ids.tolist())
      types.append(pair.type)
      answers.append(pair.answer)
  return prompts, types, answers


def run(config: ml_collections.ConfigDict, steps: int, eval_every: int, info: dict[str, Any]) -> dict[str, Any]:
  """The `text_vqa` benchmark (module doc): prints a line per evaluation and, last, its JSON line."""
  steps = steps or config.stages.instruct.num_steps
  eval_every = eval_every or steps
  dataset_dir = shapes_tfds.prepare(config.data.shapes)
  tok = pipeline.load_tokenizer(tokenizer_lib.resolve(config))
  template = templates.get_template(config.data.template)
  train_scenes, _ = shapes_eval.read_scenes(dataset_dir, 'train', None)
  test_scenes, _ = shapes_eval.read_scenes(dataset_dir, config.eval.split, config.eval.num_scenes or None)
  seq_len, batch = config.data.seq_len, config.train.global_batch_size
  rows = [scene_text.text_row('instruct', a, tok, template, config.data.align_order, seq_len) for a in train_scenes]
  prompts, types, answers = eval_prompts(test_scenes, tok, template)
  majority, _ = shapes_eval.train_majority(dataset_dir)
  baseline = shapes_eval.majority_baseline(majority, list(zip(types, answers)))

  cfg = config_lib.llm_config(config)
  table = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  order = np.random.default_rng(config.train.seed).integers(0, len(rows), (steps, batch))
  end_marker = template.answer_suffix
  eos_id = templates.end_marker_id(tok.backend, template)

  def evaluate(params):
    out = generate.generate(cfg, generate.decoding_params(params), prompts, config.eval.max_new_tokens,
                            eos_id=eos_id, pad_id=tok.pad_id)
    texts = [prompting.answer_text(tok.backend.decode(t, skip_special_tokens=False), end_marker) for t in out]
    first = {t: i for i, t in reversed(list(enumerate(types)))}  # each type's first question
    samples.update({t: dict(answer=answers[i], prediction=texts[i]) for t, i in first.items()})
    return shapes_eval.accuracy_by_type(types, texts, answers, VQA_TYPES)

  print(f'text_vqa: a prompt: {tok.backend.decode(prompts[0], skip_special_tokens=False)!r}')
  print(f'text_vqa: the scene as text, {len(train_scenes)} train scenes, {len(prompts)} questions of '
        f'{len(test_scenes)} {config.eval.split} scenes; LLM {cfg.num_layers} layers x {cfg.hidden_size}, batch '
        f'{batch} x {seq_len}, lr {config.stages.instruct.learning_rate}, {steps} steps')
  print('majority  ' + ' '.join(f'{t} {v:.3f}' for t, v in baseline.items()) +
        f'  mean {shapes_eval.mean_over_types(baseline):.3f}')
  curve, samples, start = [], {}, time.perf_counter()

  def evaluate_every(n, state, metrics):
    if n % eval_every == 0 or n == steps:
      loss = float(metrics['loss'])
      accuracy = evaluate(state.params)
      curve.append(dict(step=n, loss=round(loss, 4), seconds=round(time.perf_counter() - start, 1),
                        accuracy={t: round(v, 4) for t, v in accuracy.items()},
                        mean=round(shapes_eval.mean_over_types(accuracy), 4)))
      print(f'step {n:6d} loss {loss:.3f} ' + ' '.join(f'{t} {v:.3f}' for t, v in accuracy.items()) +
            f'  mean {curve[-1]["mean"]:.3f}', flush=True)

  llm_text.train_text_llm(config, cfg, table, order, config.stages.instruct.learning_rate, evaluate_every)
  result = dict(steps=steps, batch=batch, seq_len=seq_len, learning_rate=config.stages.instruct.learning_rate,
                llm_layers=cfg.num_layers, llm_width=cfg.hidden_size, num_questions=len(prompts),
                majority={t: round(v, 4) for t, v in baseline.items()},
                majority_mean=round(shapes_eval.mean_over_types(baseline), 4), curve=curve, samples=samples, **info)
  timing.emit(result)
  return result
