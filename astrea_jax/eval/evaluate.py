r"""Held-out evaluation on the synthetic shapes data: VQA accuracy per question type next to a majority-answer
baseline, image-text retrieval R@1 from the MoCo embeddings, and the router's mean probability per expert for each
task type (the paper's Fig. 2).

`evaluate` reads the first `config.eval.num_scenes` scenes (0 = all) of `config.eval.split`:
- VQA (the registry's `shapes` evaluator, `eval.shapes`: questions, scoring, majority baseline): every VQA pair of
  every scene is one single-turn prompt, "<image>\n" + question in the config's chat template
  ending with the assistant header (LLaVA's generation prompt: the template's user suffix without its trailing
  space), the stage's visual tokens spliced in, greedy decoding of up to `config.eval.max_new_tokens` tokens that
  stops at the template's end marker. A prediction is right when its normalised text equals the answer's
  (`normalize_answer`, `exact_match`); a grounding prediction when its box has IoU > 0.5 with the answer's box
  (`parse_box`, `box_iou`). The majority baseline answers each question with the most frequent answer of its type in
  the train split (`majority_answers`), scored in the same way.
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
its final prompt), so that the prompt encoder, the prefill and the decode loop each compile once. Process 0 writes
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

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from astrea_jax.astrea.model import Astrea, AstreaConfig
from astrea_jax.core import files
from astrea_jax import config as config_lib
from astrea_jax.data import images as images_lib
from astrea_jax.data import pipeline, shapes_tfds, stage_targets, templates
from astrea_jax.eval import encoders as encoders_lib
from astrea_jax.eval import generate, probes, registry
from astrea_jax.eval.evaluator import Example
from astrea_jax.eval.prompting import Prompt, answer_text, batch_indices, left_pad_prompts, prompt_tokens

CAPTION_PROMPT = templates.image_prompt(stage_targets.CAPTION_REQUEST, 1)
EVAL_FILE, ROUTER_FILE = 'eval.json', 'router.png'


def _check_inputs(config: ml_collections.ConfigDict, cfg: AstreaConfig, stage: str,
                  tok: pipeline.TokenizerInfo, tokenizer_dir: str) -> None:
  if config.data.dataset != 'shapes':
    raise ValueError(f"config.data.dataset={config.data.dataset!r}: the evaluation reads the synthetic 'shapes' data")
  if cfg.fusion(stage) == 'routed' and not cfg.routed:  # (fusion raises naming the valid stages)
    raise ValueError(f'stage {stage!r} routes between experts, but the model has one expert {cfg.slots}')
  if config.data.visual_tokens != cfg.num_visual_tokens:
    raise ValueError(f'config.data.visual_tokens={config.data.visual_tokens} but the model has '
                     f'{cfg.num_visual_tokens} visual tokens per image')
  if tok.size > cfg.llm.vocab_size:
    raise ValueError(f'tokenizer {tokenizer_dir} has {tok.size} tokens, more than the model vocabulary '
                     f'{cfg.llm.vocab_size}')


@dataclasses.dataclass(frozen=True)
class _Batcher:
  """The model inputs of a batch of prompt rows: (ids, mask, image_mask, instruction_mask) [B, P] and each expert's
  input of the rows' scenes {slot: [B, S, S, 3]}, prepared per batch so that host memory stays bounded at any image
  size."""
  prompts: Sequence[Prompt]
  padded: tuple[np.ndarray, ...]
  scene_images: Sequence[np.ndarray]
  experts: tuple[images_lib.ExpertImage, ...]
  square_mode: str

  def __call__(self, rows: np.ndarray):
    ids, mask, image_mask, instruction_mask = (x[rows] for x in self.padded)
    pixels = images_lib.expert_inputs([self.scene_images[self.prompts[r].scene] for r in rows], self.experts,
                                      self.square_mode)
    return ids, mask, image_mask, instruction_mask, pixels


def build_prompts(tok: pipeline.TokenizerInfo, template: templates.ChatTemplate, examples: Sequence[Example],
                  num_scenes: int, visual_tokens: int, with_captions: bool) -> list[Prompt]:
  """One prompt per VQA example ("<image>\\n" + question), in order, then (with_captions) one caption prompt per
  scene."""
  prompts = []
  for e in examples:
    tokens = prompt_tokens(tok, template, templates.image_prompt(e.prompt, 1), visual_tokens)
    prompts.append(Prompt(e.meta['scene'], e.meta['type'], tokens.ids, tokens.image_mask, tokens.instruction_mask))
  if with_captions:
    caption = prompt_tokens(tok, template, CAPTION_PROMPT, visual_tokens)
    prompts += [Prompt(s, probes.CAPTION_TASK, caption.ids, caption.image_mask, caption.instruction_mask)
                for s in range(num_scenes)]
  return prompts


def evaluate(config: ml_collections.ConfigDict, cfg: AstreaConfig, params: Any, tokenizer_dir: str, workdir: str, *,
             stage: str = 'main') -> dict[str, Any]:
  """Evaluates the model at `stage` on the held-out shapes scenes; returns the eval.json dict (module doc) and, on
  process 0, writes <workdir>/eval.json and, for a routed stage, <workdir>/router.png."""
  tok = pipeline.load_tokenizer(tokenizer_dir)
  template = templates.get_template(config.data.template)
  templates.check_special_tokens(tok.backend, template, tokenizer_dir)
  _check_inputs(config, cfg, stage, tok, tokenizer_dir)
  params = encoders_lib.readable_params(params)
  end_marker = template.answer_suffix
  eos_id = templates.end_marker_id(tok.backend, template)
  visual_tokens, batch_size = config.data.visual_tokens, config.eval.batch_size
  routed_stage = cfg.fusion(stage) == 'routed'

  shapes = registry.get_evaluator('shapes', split=config.eval.split)
  examples = shapes.load(shapes_tfds.prepare(config.data.shapes), limit=config.eval.num_scenes or None)
  annotations = shapes.annotations
  prompts = build_prompts(tok, template, examples, len(annotations), visual_tokens, with_captions=cfg.routed)
  padded = left_pad_prompts(prompts, tok.pad_id)
  batch_inputs = _Batcher(prompts, padded, shapes.scene_images,
                          images_lib.experts_from_config(config.data.experts, config_lib.expert_families(config),
                                                         cfg.slots), config.data.image_square)
  encoders = encoders_lib.make_encoders(Astrea(cfg), stage)
  logging.info('eval: %d scenes of the %s split, %d VQA prompts of %d tokens, stage %s', len(annotations),
               config.eval.split, len(examples), padded[0].shape[1], stage)

  predictions, probs = [], []
  num_batches = -(-len(examples) // batch_size)
  for k, (rows, real) in enumerate(batch_indices(len(examples), batch_size)):
    ids, mask, image_mask, instruction_mask, pixels = batch_inputs(rows)
    embeds, batch_probs = encoders.prompt_inputs(params, ids, image_mask, instruction_mask, pixels)
    out = generate.generate_from_inputs(cfg.llm, params['llm'], embeds, mask, config.eval.max_new_tokens,
                                        eos_id=eos_id, pad_id=tok.pad_id)
    predictions += [answer_text(tok.backend.decode(row, skip_special_tokens=False), end_marker)
                    for row in out[:real]]
    probs.append(np.asarray(batch_probs)[:real])
    logging.info('eval: VQA batch %d/%d', k + 1, num_batches)
  vqa, _ = shapes.score(examples, predictions)
  result: dict[str, Any] = {
      'stage': stage, 'split': config.eval.split, 'num_scenes': len(annotations), 'template': template.name,
      'max_new_tokens': config.eval.max_new_tokens, 'vqa': vqa}

  if cfg.routed:
    image_emb = []
    for rows, real in batch_indices(len(annotations), batch_size):
      ids, _, image_mask, instruction_mask, pixels = batch_inputs(rows + len(examples))
      emb, batch_probs = encoders.caption_outputs(params, ids, image_mask, instruction_mask, pixels)
      image_emb.append(np.asarray(emb)[:real])
      if routed_stage:
        probs.append(np.asarray(batch_probs)[:real])
    texts = [templates.caption_tokens(tok.backend, template, ann.captions[0], config.moco.caption_len, tok.pad_id)
             for ann in annotations]
    text_ids, text_mask = np.stack([t for t, _ in texts]), np.stack([m for _, m in texts])
    text_emb = [np.asarray(encoders.text_embeddings(params, text_ids[rows], text_mask[rows]))[:real]
                for rows, real in batch_indices(len(texts), batch_size)]
    r1 = probes.recall_at_1(np.concatenate(image_emb), np.concatenate(text_emb))
    result['retrieval'] = {'image_to_text_r1': r1['image_to_text'], 'text_to_image_r1': r1['text_to_image'],
                           'chance': 1.0 / len(annotations), 'num_pairs': len(annotations),
                           'caption_prompt': CAPTION_PROMPT}
  if routed_stage:
    result['router'] = probes.router_report([p.task for p in prompts], np.concatenate(probs), cfg.slots,
                                            cfg.router_context)

  _log_summary(result)
  if jax.process_index() == 0:
    files.write_atomic(os.path.join(workdir, EVAL_FILE), json.dumps(result, indent=1).encode('utf-8'))
    if 'router' in result:
      files.write_atomic(os.path.join(workdir, ROUTER_FILE),
                         probes.router_plot_bytes(result['router'], stage, config.eval.split))
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
