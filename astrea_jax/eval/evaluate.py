r"""Held-out evaluation on the synthetic shapes data: VQA accuracy per question type next to a majority-answer
baseline, image-text retrieval R@1 from the MoCo embeddings, and the router's mean probability per expert for each
task type (the paper's Fig. 2).

`evaluate` reads the first `config.eval.num_scenes` scenes (0 = all) of `config.eval.split`:
- VQA: every VQA pair of every scene is one single-turn prompt, "<image>\n" + question in the config's chat template
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

import collections
import dataclasses
import io
import json
import os
import re
from typing import Any, Iterable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from astrea_jax.astrea.model import Astrea, AstreaConfig
from astrea_jax.core import boxes, files, stages
from astrea_jax import config as config_lib
from astrea_jax.data import images as images_lib
from astrea_jax.data import pipeline, shapes_tfds, stage_targets, templates
from astrea_jax.data.conversation import HUMAN, IMAGE_PLACEHOLDER
from astrea_jax.data.shapes_text import VQA_TYPES, Annotations
from astrea_jax.eval import generate, plots

CAPTION_TASK = 'caption'
CAPTION_PROMPT = f'{IMAGE_PLACEHOLDER}\n{stage_targets.CAPTION_REQUEST}'
TASK_TYPES = VQA_TYPES + (CAPTION_TASK,)
GROUNDING = 'grounding'
IOU_THRESHOLD = 0.5
EVAL_FILE, ROUTER_FILE = 'eval.json', 'router.png'
SAMPLES_PER_TYPE = 2

_ARTICLES = frozenset({'a', 'an', 'the'})
_NUMBER_WORDS = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4', 'five': '5',
                 'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
_PUNCTUATION = re.compile(r'[^\w\s]')
_BOX = re.compile(r'\[\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\]')

Box = tuple[int, int, int, int]


# --- scorers (pure) ---

def answer_text(generated: str, end_marker: str = '') -> str:
  """The generated text up to the template's end marker (all of it when there is none), stripped."""
  if end_marker and end_marker in generated:
    generated = generated[:generated.index(end_marker)]
  return generated.strip()


def normalize_answer(text: str, end_marker: str = '') -> str:
  """VQA-style normalisation: cut at the end marker, lower case, punctuation (a trailing '.' too) -> spaces, number
  words -> digits ('three' -> '3'), articles dropped ('a', 'an', 'the'), single spaces. An answer made of articles
  only keeps them, so that the multiple-choice letter 'A' stays 'a' and never equals an empty prediction."""
  words = _PUNCTUATION.sub(' ', answer_text(text, end_marker).lower()).split()
  words = [_NUMBER_WORDS.get(w, w) for w in words]
  return ' '.join([w for w in words if w not in _ARTICLES] or words)


def exact_match(prediction: str, answer: str) -> bool:
  """Whether the two texts are equal after `normalize_answer`."""
  return normalize_answer(prediction) == normalize_answer(answer)


def parse_box(text: str) -> Box | None:
  """The first '[x1,y1,x2,y2]' in text as four ints, or None when there is none, a value is outside 0-999, or the
  corners are not ordered (x1 <= x2, y1 <= y2)."""
  match = _BOX.search(text)
  if match is None:
    return None
  x1, y1, x2, y2 = (int(v) for v in match.groups())
  if max(x1, y1, x2, y2) > 999 or x1 > x2 or y1 > y2:
    return None
  return x1, y1, x2, y2


def grounding_correct(prediction: str, answer: str, threshold: float = IOU_THRESHOLD) -> bool:
  """Whether the predicted box has IoU > threshold with the answer's box (an unparsable prediction is wrong)."""
  predicted, expected = parse_box(prediction), parse_box(answer)
  if expected is None:
    raise ValueError(f'grounding answer {answer!r} is not a box [x1,y1,x2,y2] with values in 0-999')
  return predicted is not None and boxes.box_iou(predicted, expected) > threshold


def is_correct(question_type: str, prediction: str, answer: str) -> bool:
  """Grounding by IoU > 0.5, every other type by exact match."""
  if question_type not in VQA_TYPES:
    raise ValueError(f'unknown question type {question_type!r}; expected one of {VQA_TYPES}')
  if question_type == GROUNDING:
    return grounding_correct(prediction, answer)
  return exact_match(prediction, answer)


def accuracy_by_type(types: Sequence[str], predictions: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
  """{type: fraction right} over the types present, in `VQA_TYPES` order."""
  if not len(types) == len(predictions) == len(answers):
    raise ValueError(f'{len(types)} types, {len(predictions)} predictions and {len(answers)} answers; expected as '
                     'many of each')
  right, total = collections.Counter(), collections.Counter(types)
  for t, prediction, answer in zip(types, predictions, answers):
    right[t] += is_correct(t, prediction, answer)
  return {t: right[t] / total[t] for t in VQA_TYPES if total[t]}


def mean_over_types(scores: Mapping[str, float]) -> float:
  """The unweighted mean of per-type scores (0 when there are none)."""
  return float(np.mean(list(scores.values()))) if scores else 0.0


def majority_answers(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
  """{type: its most frequent answer} from (type, answer) pairs; ties go to the smallest answer string."""
  counts = collections.defaultdict(collections.Counter)
  for t, answer in pairs:
    counts[t][answer] += 1
  return {t: min(c.items(), key=lambda item: (-item[1], item[0]))[0] for t, c in counts.items()}


def majority_baseline(majority: Mapping[str, str], pairs: Sequence[tuple[str, str]]) -> dict[str, float]:
  """{type: accuracy} of answering each (type, answer) pair with majority[type] (grounding by IoU > 0.5)."""
  missing = sorted({t for t, _ in pairs} - set(majority))
  if missing:
    raise ValueError(f'no majority answer for question types {missing}; the train split has none of them')
  return accuracy_by_type([t for t, _ in pairs], [majority[t] for t, _ in pairs], [a for _, a in pairs])


def recall_at_1(image_emb: np.ndarray, text_emb: np.ndarray) -> dict[str, float]:
  """Retrieval R@1 from L2-normalised embeddings image_emb, text_emb [N, d] whose row i is pair i.

  image_to_text: the fraction of images whose most similar text (cosine, ties to the lower index) is their own;
  text_to_image: the same for texts.
  """
  image_emb, text_emb = np.asarray(image_emb, np.float64), np.asarray(text_emb, np.float64)
  if image_emb.ndim != 2 or image_emb.shape != text_emb.shape or not len(image_emb):
    raise ValueError(f'image embeddings {image_emb.shape} and text embeddings {text_emb.shape}: expected two [N, d] '
                     'arrays with N >= 1')
  similarity = image_emb @ text_emb.T  # [N images, N texts]
  own = np.arange(len(similarity))
  return {'image_to_text': float(np.mean(similarity.argmax(axis=1) == own)),
          'text_to_image': float(np.mean(similarity.argmax(axis=0) == own))}


def mean_by_task(tasks: Sequence[str], values: np.ndarray, order: Sequence[str] = TASK_TYPES) -> dict[str, np.ndarray]:
  """{task: mean of the rows of values [M, n] whose task it is} for the tasks of `order` present."""
  values = np.asarray(values, np.float64)
  if len(tasks) != len(values):
    raise ValueError(f'{len(tasks)} task names for {len(values)} rows of values; expected one per row')
  tasks = np.asarray(tasks)
  return {t: values[tasks == t].mean(axis=0) for t in order if np.any(tasks == t)}


# --- prompts ---

@dataclasses.dataclass(frozen=True)
class Prompt:
  """One prompt: its scene (index among the evaluated scenes), task (a VQA type or 'caption'), tokens [L] with the
  visual-token positions in image_mask [L] and the instruction's in instruction_mask [L], and for VQA the question
  and answer."""
  scene: int
  task: str
  ids: np.ndarray
  image_mask: np.ndarray
  instruction_mask: np.ndarray
  question: str = ''
  answer: str = ''


def generation_template(template: templates.ChatTemplate) -> templates.ChatTemplate:
  """The template whose user turn ends with the bare assistant header, as LLaVA's generation prompt ("ASSISTANT:"
  for vicuna_v1, "<|im_start|>assistant\\n" for chatml): the user suffix without trailing spaces."""
  return dataclasses.replace(template, user_suffix=template.user_suffix.rstrip(' '))


def prompt_tokens(tok: pipeline.TokenizerInfo, template: templates.ChatTemplate, text: str,
                  visual_tokens: int) -> templates.TokenizedConversation:
  """A single-turn generation prompt for the user text (with its `<image>`) -> ids and image mask."""
  return templates.tokenize_conversation(tok.backend, generation_template(template), [(HUMAN, text)],
                                         visual_tokens=visual_tokens, image_token_id=tok.image_token_id,
                                         bos_id=tok.bos_id)


def left_pad_prompts(prompts: Sequence[Prompt], pad_id: int) -> tuple[np.ndarray, ...]:
  """(ids, mask, image_mask, instruction_mask), each [M, P] with P the longest prompt, every prompt right-aligned."""
  ids, mask = generate.left_pad([p.ids for p in prompts], pad_id)
  image_mask, _ = generate.left_pad([p.image_mask.astype(np.int32) for p in prompts], 0)
  instruction, _ = generate.left_pad([p.instruction_mask.astype(np.int32) for p in prompts], 0)
  return ids, mask, image_mask.astype(bool), instruction.astype(bool)


def batch_indices(num_rows: int, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
  """(row indices [batch_size], number of real rows) per batch; the last batch repeats its final row."""
  for start in range(0, num_rows, batch_size):
    rows = np.arange(start, min(start + batch_size, num_rows))
    yield np.pad(rows, (0, batch_size - len(rows)), mode='edge'), len(rows)


# --- the model's side, jitted ---

@dataclasses.dataclass(frozen=True)
class Encoders:
  """Jitted functions of (params, ...) for one model and stage.

  prompt_inputs(params, ids, image_mask, instruction_mask, images) -> (LLM input embeddings [B, P, D], router P per
    prompt averaged over the visual tokens [B, n] ([B, 0] outside the routed stages));
  caption_outputs(params, ids, image_mask, instruction_mask, images) -> (image embeddings [B, d] of the routed visual
    tokens, router P per prompt [B, n]);
  text_embeddings(params, ids, mask) -> [B, d] (caption tokens, `templates.caption_tokens`).
  ids, image_mask, instruction_mask [B, P] (left-padded prompts), images {slot: [B, S, S, 3]} in [0, 1] (one image
  per prompt).
  """
  prompt_inputs: Any
  caption_outputs: Any
  text_embeddings: Any


def make_encoders(model: Astrea, stage: str) -> Encoders:
  """The `Encoders` of a model evaluated at `stage`; the router context follows the train step."""

  def visual(params, stage, ids, instruction_mask, images):
    variables = {'params': params}
    instruction = None
    if model.cfg.fusion(stage) == 'routed' and model.cfg.router_context == 'visual+text':
      instruction = model.apply(variables, ids, instruction_mask[:, None, :], method=Astrea.pooled_instruction)
    rows = {slot: x[:, None] for slot, x in images.items()}  # one image slot per prompt
    tokens, aux = model.apply(variables, stage, rows, instruction=instruction, method=Astrea.visual_tokens)
    probs = aux['probs'].mean(axis=(1, 2)) if 'probs' in aux else jnp.zeros((ids.shape[0], 0), jnp.float32)
    return tokens, probs

  @jax.jit
  def prompt_inputs(params, ids, image_mask, instruction_mask, images):
    tokens, probs = visual(params, stage, ids, instruction_mask, images)
    embeds = model.apply({'params': params}, ids, tokens, image_mask, method=Astrea.prompt_embeddings)
    return embeds, probs

  @jax.jit
  def caption_outputs(params, ids, image_mask, instruction_mask, images):
    del image_mask
    tokens, probs = visual(params, stages.MOCO_STAGE, ids, instruction_mask, images)
    return model.apply({'params': params}, tokens[:, 0], method=Astrea.image_embedding), probs

  @jax.jit
  def text_embeddings(params, ids, mask):
    embeds = model.apply({'params': params}, ids, method=Astrea.embed_tokens)
    return model.apply({'params': params}, embeds, mask, method=Astrea.text_embedding)

  return Encoders(prompt_inputs, caption_outputs, text_embeddings)


# --- files ---

def router_plot_bytes(router: Mapping[str, Any], stage: str, split: str) -> bytes:
  """router.png: the [tasks x experts] mean router probabilities as a labelled heatmap (PNG bytes)."""
  title = f'Router: mean probability per expert and task ({stage}, {split} split)'
  image = plots.heatmap(router['mean_prob'], router['tasks'], router['experts'], title)
  buffer = io.BytesIO()
  image.save(buffer, format='PNG')
  return buffer.getvalue()


# --- the evaluation ---

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


def readable_params(params: Any) -> Any:
  """The unboxed params with every leaf that spans several processes (multi-host) gathered whole onto each process
  as a numpy array, so that each process can run the single-device-style evaluation; other leaves as they are."""
  def readable(x):
    return x if getattr(x, 'is_fully_addressable', True) else multihost_utils.process_allgather(x, tiled=True)
  return jax.tree.map(readable, nn.unbox(params))


def _read_eval_scenes(config: ml_collections.ConfigDict, dataset_dir: str):
  """(annotations, images) of the first config.eval.num_scenes scenes of config.eval.split (0 = all)."""
  source = shapes_tfds.data_source(dataset_dir, config.eval.split, with_segmentation=False)
  num = len(source) if not config.eval.num_scenes else min(config.eval.num_scenes, len(source))
  if config.eval.num_scenes > len(source):
    logging.warning('eval: config.eval.num_scenes=%d but the %s split has %d scenes; evaluating all of them',
                    config.eval.num_scenes, config.eval.split, len(source))
  records = [source[i] for i in range(num)]
  return [shapes_tfds.annotations_from_record(r) for r in records], [r['image'] for r in records]


def _train_majority(dataset_dir: str) -> tuple[dict[str, str], int]:
  """The majority answer per VQA type over the whole train split, and the number of train scenes."""
  source = shapes_tfds.data_source(dataset_dir, 'train', with_segmentation=False)
  pairs = [(p.type, p.answer) for i in range(len(source))
           for p in shapes_tfds.annotations_from_record(source[i]).vqa]
  return majority_answers(pairs), len(source)


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


def vqa_report(prompts: Sequence[Prompt], predictions: Sequence[str], majority: Mapping[str, str],
               num_train: int) -> dict[str, Any]:
  """eval.json's 'vqa' section from the VQA prompts, their predicted answers and the train split's majority answers."""
  types, answers = [p.task for p in prompts], [p.answer for p in prompts]
  accuracy = accuracy_by_type(types, predictions, answers)
  baseline = majority_baseline(majority, list(zip(types, answers)))
  counts = collections.Counter(types)
  taken = collections.Counter()
  samples = []
  for p, prediction in zip(prompts, predictions):
    if taken[p.task] < SAMPLES_PER_TYPE:
      taken[p.task] += 1
      samples.append({'type': p.task, 'question': p.question, 'answer': p.answer, 'prediction': prediction})
  return {'num_questions': len(prompts), 'counts': {t: counts[t] for t in VQA_TYPES}, 'accuracy': accuracy,
          'majority_baseline': baseline, 'majority_answer': {t: majority[t] for t in accuracy},
          'mean_accuracy': mean_over_types(accuracy), 'mean_majority_baseline': mean_over_types(baseline),
          'grounding_iou_threshold': IOU_THRESHOLD, 'majority_train_scenes': num_train, 'samples': samples}


def router_report(tasks: Sequence[str], probs: np.ndarray, experts: Sequence[str], context: str) -> dict[str, Any]:
  """eval.json's 'router' section: the prompts' router probabilities probs [M, n] averaged per task type."""
  by_task = mean_by_task(tasks, probs)
  counts = collections.Counter(tasks)
  return {'router_context': context, 'experts': list(experts), 'tasks': list(by_task),
          'mean_prob': [[float(v) for v in row] for row in by_task.values()],
          'counts': {t: counts[t] for t in by_task}}


def _build_prompts(tok: pipeline.TokenizerInfo, template: templates.ChatTemplate, annotations: Sequence[Annotations],
                   visual_tokens: int, with_captions: bool) -> list[Prompt]:
  """One prompt per VQA pair of each scene, in scene order, then (with_captions) one caption prompt per scene."""
  prompts = []
  for s, ann in enumerate(annotations):
    for pair in ann.vqa:
      tokens = prompt_tokens(tok, template, f'{IMAGE_PLACEHOLDER}\n{pair.question}', visual_tokens)
      prompts.append(Prompt(s, pair.type, tokens.ids, tokens.image_mask, tokens.instruction_mask, pair.question,
                            pair.answer))
  if with_captions:
    caption = prompt_tokens(tok, template, CAPTION_PROMPT, visual_tokens)
    prompts += [Prompt(s, CAPTION_TASK, caption.ids, caption.image_mask, caption.instruction_mask)
                for s in range(len(annotations))]
  return prompts


def evaluate(config: ml_collections.ConfigDict, cfg: AstreaConfig, params: Any, tokenizer_dir: str, workdir: str, *,
             stage: str = 'main') -> dict[str, Any]:
  """Evaluates the model at `stage` on the held-out shapes scenes; returns the eval.json dict (module doc) and, on
  process 0, writes <workdir>/eval.json and, for a routed stage, <workdir>/router.png."""
  tok = pipeline.load_tokenizer(tokenizer_dir)
  template = templates.get_template(config.data.template)
  templates.check_special_tokens(tok.backend, template, tokenizer_dir)
  _check_inputs(config, cfg, stage, tok, tokenizer_dir)
  params = readable_params(params)
  end_marker = template.answer_suffix
  eos_id = tok.backend.encode(end_marker, add_special_tokens=False).ids[0]
  visual_tokens, batch_size = config.data.visual_tokens, config.eval.batch_size
  routed_stage = cfg.fusion(stage) == 'routed'

  dataset_dir = shapes_tfds.prepare(config.data.shapes)
  annotations, scene_images = _read_eval_scenes(config, dataset_dir)
  majority, num_train = _train_majority(dataset_dir)
  prompts = _build_prompts(tok, template, annotations, visual_tokens, with_captions=cfg.routed)
  vqa_prompts = [p for p in prompts if p.task != CAPTION_TASK]
  padded = left_pad_prompts(prompts, tok.pad_id)
  batch_inputs = _Batcher(prompts, padded, scene_images,
                          images_lib.experts_from_config(config.data.experts, config_lib.expert_families(config),
                                                         cfg.slots), config.data.image_square)
  encoders = make_encoders(Astrea(cfg), stage)
  logging.info('eval: %d scenes of the %s split, %d VQA prompts of %d tokens, stage %s', len(annotations),
               config.eval.split, len(vqa_prompts), padded[0].shape[1], stage)

  predictions, probs = [], []
  num_batches = -(-len(vqa_prompts) // batch_size)
  for k, (rows, real) in enumerate(batch_indices(len(vqa_prompts), batch_size)):
    ids, mask, image_mask, instruction_mask, pixels = batch_inputs(rows)
    embeds, batch_probs = encoders.prompt_inputs(params, ids, image_mask, instruction_mask, pixels)
    out = generate.generate_from_inputs(cfg.llm, params['llm'], embeds, mask, config.eval.max_new_tokens,
                                        eos_id=eos_id, pad_id=tok.pad_id)
    predictions += [answer_text(tok.backend.decode(row, skip_special_tokens=False), end_marker)
                    for row in out[:real]]
    probs.append(np.asarray(batch_probs)[:real])
    logging.info('eval: VQA batch %d/%d', k + 1, num_batches)
  result: dict[str, Any] = {
      'stage': stage, 'split': config.eval.split, 'num_scenes': len(annotations), 'template': template.name,
      'max_new_tokens': config.eval.max_new_tokens,
      'vqa': vqa_report(vqa_prompts, predictions, majority, num_train)}

  if cfg.routed:
    image_emb = []
    for rows, real in batch_indices(len(annotations), batch_size):
      ids, _, image_mask, instruction_mask, pixels = batch_inputs(rows + len(vqa_prompts))
      emb, batch_probs = encoders.caption_outputs(params, ids, image_mask, instruction_mask, pixels)
      image_emb.append(np.asarray(emb)[:real])
      if routed_stage:
        probs.append(np.asarray(batch_probs)[:real])
    texts = [templates.caption_tokens(tok.backend, template, ann.captions[0], config.moco.caption_len, tok.pad_id)
             for ann in annotations]
    text_ids, text_mask = np.stack([t for t, _ in texts]), np.stack([m for _, m in texts])
    text_emb = [np.asarray(encoders.text_embeddings(params, text_ids[rows], text_mask[rows]))[:real]
                for rows, real in batch_indices(len(texts), batch_size)]
    r1 = recall_at_1(np.concatenate(image_emb), np.concatenate(text_emb))
    result['retrieval'] = {'image_to_text_r1': r1['image_to_text'], 'text_to_image_r1': r1['text_to_image'],
                           'chance': 1.0 / len(annotations), 'num_pairs': len(annotations),
                           'caption_prompt': CAPTION_PROMPT}
  if routed_stage:
    result['router'] = router_report([p.task for p in prompts], np.concatenate(probs), cfg.slots,
                                     cfg.router_context)

  _log_summary(result)
  if jax.process_index() == 0:
    files.write_atomic(os.path.join(workdir, EVAL_FILE), json.dumps(result, indent=1).encode('utf-8'))
    if 'router' in result:
      files.write_atomic(os.path.join(workdir, ROUTER_FILE), router_plot_bytes(result['router'], stage, config.eval.split))
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
