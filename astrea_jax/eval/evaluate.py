r"""Held-out evaluation on the synthetic shapes data: VQA accuracy per question type next to a majority-answer
baseline, image-text retrieval R@1 from the MoCo embeddings, and the router's mean probability per expert for each
task type (the paper's Fig. 2).

`evaluate` reads the first `config.eval.num_scenes` scenes (0 = all) of `config.eval.split`:
- VQA (the registry's `shapes` evaluator, `eval.shapes`: questions, scoring, majority baseline), answered by the
  evaluation loop (`eval.loop`, sharded over the mesh's batch axes and the hosts): every VQA pair of every scene is
  one single-turn prompt, "<image>\n" + question in the config's chat template ending with the assistant header
  (LLaVA's generation prompt: the template's user suffix without its trailing space), the stage's visual tokens
  spliced in, greedy decoding of up to `config.eval.max_new_tokens` tokens that stops at the template's end marker.
  A prediction is right when its normalised text equals the answer's (`normalize_answer`, `exact_match`); a
  grounding prediction when its box has IoU > 0.5 with the answer's box (`parse_box`, `box_iou`). The majority
  baseline answers each question with the most frequent answer of its type in the train split (`majority_answers`),
  scored in the same way.
- Retrieval (models with a router, `cfg.routed`): the image embedding is `image_embedding` of the routed visual tokens
  given the caption prompt "<image>\ncaption" (the alignment stages' caption instruction), the text embedding is
  `text_embedding` of the scene's first caption as `templates.caption_tokens` gives it (the caption's tokens and the
  end marker, exactly as the main stage embeds each image's caption for Eq. 5-7). R@1 in both directions over the N
  scenes (`recall_at_1`), next to chance 1/N.
- Router (routed stages): the router probabilities P (Eq. 9) averaged over the visual tokens of each prompt, then
  over the prompts of each task type (each VQA type, and 'caption' for the caption prompt) -> [tasks x experts],
  each row summing to one, written to eval.json and drawn as router.png. With `router_context='visual+text'` the
  router sees the pooled embedding of the prompt's instruction tokens (the question's text, `instruction_mask`), the
  same span the train step pools (its routed rows hold one question each); with 'visual' the rows differ only
  through the scenes each type covers.

All prompts are left-padded to one length and every batch to `config.eval.batch_size` rows (the last one repeats
its final prompt), so that the prompt encoder, the prefill and the decode loop each compile once. The retrieval and
router probes run on every process alike (the parameters gathered whole, `encoders.readable_params`). Process 0 writes
`<workdir>/eval.json` and `<workdir>/router.png`, each to a temporary file renamed into place. eval.json:

  {"stage", "split", "num_scenes", "template", "max_new_tokens",
   "vqa": {"num_questions", "counts": {type: n} (every VQA type), "accuracy": {type: acc},
           "majority_baseline": {type: acc}, "majority_answer": {type: answer} (types with n > 0),
           "mean_accuracy", "mean_majority_baseline" (means over those types), "grounding_iou_threshold",
           "majority_train_scenes", "samples": [{"type", "question", "answer", "prediction"}] (first 2 per type)},
   "retrieval": {"image_to_text_r1", "text_to_image_r1", "chance", "num_pairs", "caption_prompt"}  (cfg.routed),
   "router": {"router_context", "experts": [slot], "tasks": [task], "mean_prob": [[p]] (tasks x experts),
              "counts": {task: prompts}}  (routed stages)}
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from astrea_jax.astrea.model import AstreaConfig
from astrea_jax.core import files
from astrea_jax.data import stage_targets, templates
from astrea_jax.eval import encoders as encoders_lib
from astrea_jax.eval import benchmarks, loop, probes
from astrea_jax.eval.prompting import batch_indices
from astrea_jax.eval.shapes import SceneImage, Shapes
from astrea_jax.eval.shapes_video import ShapesVideo
from astrea_jax.parallel import mesh as mesh_lib

CAPTION_PROMPT = templates.image_prompt(stage_targets.CAPTION_REQUEST, 1)
EVAL_FILE, ROUTER_FILE = 'eval.json', 'router.png'


def _check_inputs(config: ml_collections.ConfigDict, cfg: AstreaConfig) -> None:
  if config.data.dataset != 'shapes':
    raise ValueError(f"config.data.dataset={config.data.dataset!r}: the evaluation reads the synthetic 'shapes' data")
  if config.data.visual_tokens != cfg.num_visual_tokens:
    raise ValueError(f'config.data.visual_tokens={config.data.visual_tokens} but the model has '
                     f'{cfg.num_visual_tokens} visual tokens per image')


def evaluate(config: ml_collections.ConfigDict, cfg: AstreaConfig, params: Any, tokenizer_dir: str, workdir: str, *,
             stage: str = 'main', mesh: Mesh | None = None) -> dict[str, Any]:
  """Evaluates the model at `stage` on the held-out shapes scenes; returns the eval.json dict (module doc) and, on
  process 0, writes <workdir>/eval.json and, for a routed stage, <workdir>/router.png. The VQA prompts are answered
  by `loop.predict` on `mesh` (default: `config.mesh` over every device)."""
  _check_inputs(config, cfg)
  mesh = mesh if mesh is not None else mesh_lib.create_mesh(config.mesh)
  model = loop.EvalModel.from_config(config, cfg, params, stage, tokenizer_dir, mesh)
  routed_stage = cfg.fusion(stage) == 'routed'
  batch_size = config.eval.batch_size

  shapes = Shapes.from_config(config)
  examples = shapes.load(shapes.data_path(''), limit=shapes.default_limit)
  annotations = shapes.annotations
  texts, images = [e.prompt for e in examples], [e.images for e in examples]
  vqa_rows = model.prompt_rows(texts, images)
  if cfg.routed:  # every prompt, VQA and caption, is padded to one length
    captions = model.prompt_rows([stage_targets.CAPTION_REQUEST] * len(annotations),
                                 [(SceneImage(pixels),) for pixels in shapes.scene_images], vqa_rows.length)
    vqa_rows = model.prompt_rows(texts, images, captions.length)
  logging.info('eval: %d scenes of the %s split, %d VQA prompts of %d tokens, stage %s', len(annotations),
               config.eval.split, len(examples), vqa_rows.length, stage)
  predictions = loop.predict(model, vqa_rows, batch_size=batch_size, max_new_tokens=shapes.max_new_tokens,
                             with_probs=routed_stage, name='eval VQA')
  vqa, _ = shapes.score(examples, predictions.texts)
  result: dict[str, Any] = {
      'stage': stage, 'split': config.eval.split, 'num_scenes': len(annotations), 'template': model.template.name,
      'max_new_tokens': shapes.max_new_tokens, 'vqa': vqa}

  if cfg.routed:
    params = encoders_lib.readable_params(params)
    encoders = model.encoders
    image_emb, caption_probs = [], []
    for rows, real in batch_indices(len(annotations), batch_size):
      inputs = model.batch_inputs(captions, rows)
      emb, batch_probs = encoders.caption_outputs(params, inputs['ids'], inputs['image_mask'],
                                                  inputs['instruction_mask'], inputs['images'])
      image_emb.append(np.asarray(emb)[:real])
      caption_probs.append(np.asarray(batch_probs)[:real])
    tok = model.tok
    texts = [templates.caption_tokens(tok.backend, model.template, ann.captions[0], config.moco.caption_len,
                                      tok.pad_id) for ann in annotations]
    text_ids, text_mask = np.stack([t for t, _ in texts]), np.stack([m for _, m in texts])
    text_emb = [np.asarray(encoders.text_embeddings(params, text_ids[rows], text_mask[rows]))[:real]
                for rows, real in batch_indices(len(texts), batch_size)]
    r1 = probes.recall_at_1(np.concatenate(image_emb), np.concatenate(text_emb))
    result['retrieval'] = {'image_to_text_r1': r1['image_to_text'], 'text_to_image_r1': r1['text_to_image'],
                           'chance': 1.0 / len(annotations), 'num_pairs': len(annotations),
                           'caption_prompt': CAPTION_PROMPT}
  if routed_stage:
    tasks = [e.meta['type'] for e in examples] + [probes.CAPTION_TASK] * len(annotations)
    result['router'] = probes.router_report(tasks, np.concatenate([predictions.probs, *caption_probs]), cfg.slots,
                                            cfg.router_context)

  _log_summary(result)
  if jax.process_index() == 0:
    files.write_atomic(os.path.join(workdir, EVAL_FILE), json.dumps(result, indent=1).encode('utf-8'))
    if 'router' in result:
      files.write_atomic(os.path.join(workdir, ROUTER_FILE),
                         probes.router_plot_bytes(result['router'], stage, config.eval.split))
  return result


def evaluate_video(config: ml_collections.ConfigDict, cfg: AstreaConfig, params: Any, tokenizer_dir: str,
                   workdir: str, *, stage: str, mesh: Mesh | None = None) -> dict[str, Any]:
  """Evaluates the model at `stage` on the held-out moving-shapes clips (the registry's `shapes_video`: each
  question after its clip's config.data.video.num_frames frames, greedy answers scored like the shapes set's, next to
  the train split's majority answers); returns and (process 0) writes <workdir>/eval.json:
  {"stage", "split", "num_clips", "num_frames", "template", "max_new_tokens", "vqa": the 'vqa' section of `evaluate`}."""
  mesh = mesh if mesh is not None else mesh_lib.create_mesh(config.mesh)
  model = loop.EvalModel.from_config(config, cfg, params, stage, tokenizer_dir, mesh)
  benchmark = benchmarks.load_benchmark(ShapesVideo.name, '', config)
  rows = benchmarks.prompt_rows(model, benchmark)
  logging.info('eval: %d questions on held-out clips (%s split), %d prompt tokens, stage %s', len(rows),
               config.eval.split, rows.length, stage)
  predictions = loop.predict(model, rows, batch_size=config.eval.batch_size,
                             max_new_tokens=benchmark.evaluator.max_new_tokens, name='eval video VQA')
  vqa, _ = benchmark.evaluator.score(benchmark.examples, predictions.texts)
  result = {'stage': stage, 'split': config.eval.split,
            'num_clips': len({e.video.name for e in benchmark.examples}), 'num_frames': model.num_frames,
            'template': model.template.name, 'max_new_tokens': benchmark.evaluator.max_new_tokens, 'vqa': vqa}
  _log_summary(result)
  if jax.process_index() == 0:
    files.write_atomic(os.path.join(workdir, EVAL_FILE), json.dumps(result, indent=1).encode('utf-8'))
  return result


def _log_summary(result: Mapping[str, Any]) -> None:
  """One line per metric."""
  vqa = result['vqa']
  for t, acc in vqa['accuracy'].items():
    logging.info('eval vqa/%s: accuracy %.4f (majority baseline %.4f) over %d questions', t, acc,
                 vqa['majority_baseline'][t], vqa['counts'][t])
  logging.info('eval vqa/mean: accuracy %.4f (majority baseline %.4f) over %d types, %d questions',
               vqa['mean_accuracy'], vqa['mean_majority_baseline'], len(vqa['accuracy']), vqa['num_questions'])
  if 'retrieval' in result:
    r = result['retrieval']
    logging.info('eval retrieval: R@1 image->text %.4f, text->image %.4f (chance %.4f, N=%d)', r['image_to_text_r1'],
                 r['text_to_image_r1'], r['chance'], r['num_pairs'])
  if 'router' in result:
    router = result['router']
    for task, row in zip(router['tasks'], router['mean_prob']):
      logging.info('eval router/%s: %s', task, ', '.join(f'{e} {p:.3f}' for e, p in zip(router['experts'], row)))
