r"""Chat templates and the tokenisation of a conversation into ids and the Eq. 1 loss mask.

`vicuna_v1` (Astrea-13B, LLaVA's `conv_vicuna_v1`):
  "{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>"
`chatml` (Astrea-34B on Hermes-2-Yi, LLaVA-NeXT's `conv_chatml_direct`):
  "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{q1}<|im_end|>\n"
  "<|im_start|>assistant\n{a1}<|im_end|>\n..."

The loss covers each answer and the end-of-turn marker after it ("{a}</s>", "{a}<|im_end|>"), nothing else: the
model learns to answer and to stop, never to write the user's turns. The text between `<image>` placeholders is
tokenised in one piece (so BPE merges match what the model sees at inference) and each token is marked as a target
from its character offsets. Every `<image>` becomes `visual_tokens` positions that the model fills with visual
tokens. The tokens of the first user message (its text without the `<image>` placeholders) are marked as the
instruction: the router's text context ('visual+text'), the same span in training rows and evaluation prompts.

`caption_tokens` gives the text side of the momentum contrast (Eq. 5-7): a caption's tokens as an answer, with the
end marker, in training and in the retrieval evaluation alike."""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import numpy as np

from astrea_jax.convert.hf_astrea.inputs_astrea import overlap_mask, piece_spans
from astrea_jax.data.conversation import GPT, IMAGE_PLACEHOLDER, Turn


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A conversation is rendered as: system, then per exchange `user_prefix + question + user_suffix` (no loss) and
  `answer + answer_suffix` (the loss, Eq. 1), then `turn_separator` (no loss)."""
  name: str
  system: str
  user_prefix: str
  user_suffix: str
  answer_suffix: str
  turn_separator: str
  add_bos: bool
  special_tokens: tuple[str, ...]  # strings the tokenizer must hold as single tokens


VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
TEMPLATES = {
    'vicuna_v1': ChatTemplate(name='vicuna_v1', system=VICUNA_SYSTEM + ' ', user_prefix='USER: ',
                              user_suffix=' ASSISTANT: ', answer_suffix='</s>', turn_separator='', add_bos=True,
                              special_tokens=('</s>',)),
    'chatml': ChatTemplate(name='chatml', system='<|im_start|>system\nAnswer the questions.<|im_end|>\n',
                           user_prefix='<|im_start|>user\n', user_suffix='<|im_end|>\n<|im_start|>assistant\n',
                           answer_suffix='<|im_end|>', turn_separator='\n', add_bos=False,
                           special_tokens=('<|im_start|>', '<|im_end|>')),
}


@dataclasses.dataclass(frozen=True)
class TokenizedConversation:
  """ids [T] int32 (image positions hold `image_token_id`), target_mask [T] bool (answer tokens, Eq. 1),
  image_mask [T] bool (positions the visual tokens fill, `visual_tokens` per image in order), instruction_mask [T]
  bool (the first user message's text tokens)."""
  ids: np.ndarray
  target_mask: np.ndarray
  image_mask: np.ndarray
  instruction_mask: np.ndarray


def get_template(name: str) -> ChatTemplate:
  if name not in TEMPLATES:
    raise ValueError(f'unknown chat template {name!r}; expected one of {sorted(TEMPLATES)}')
  return TEMPLATES[name]


def text_spans(text: str, start: int) -> list[tuple[int, int]]:
  """The [start, end) character spans of `text` (placed at `start`) between its `<image>` placeholders, each with its
  surrounding whitespace trimmed; empty pieces give no span."""
  return piece_spans(text, start, IMAGE_PLACEHOLDER)


def render(template: ChatTemplate,
           turns: Sequence[Turn]) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
  """(the conversation as text, the [start, end) character spans of the answers with their end-of-turn marker, the
  spans of the first user message's text)."""
  parts, spans, instruction, length = [template.system], [], [], len(template.system)
  for role, text in turns:
    if role == GPT:
      piece = text + template.answer_suffix
      spans.append((length, length + len(piece)))
      piece += template.turn_separator
    else:
      if not instruction:
        instruction = text_spans(text, length + len(template.user_prefix))
      piece = template.user_prefix + text + template.user_suffix
    parts.append(piece)
    length += len(piece)
  return ''.join(parts), spans, instruction


def video_prompt(text: str, num_frames: int) -> str:
  """A user message with a video first: "<video>\\n" then the text, its <video> as the pipeline expands it
  (`conversation.video_turns`: one `<image>` per sampled frame)."""
  return f'{IMAGE_PLACEHOLDER * num_frames}\n' + text


def image_prompt(text: str, num_images: int) -> str:
  """A user message with its images first: one "<image>\\n" per image, then the text (as the evaluation and the
  exported chat template write it)."""
  return f'{IMAGE_PLACEHOLDER}\n' * num_images + text


def _literal(text: str) -> str:
  """A Jinja expression printing `text` exactly."""
  return '{{- ' + json.dumps(text) + ' -}}'


def jinja_template(template: ChatTemplate) -> str:
  """The template as a Hugging Face chat template (Jinja) rendering what `render` renders: messages {'role': 'user' |
  'assistant', 'content': text or [{'type': 'image'} | {'type': 'text', 'text': ...}]}, each image item written as
  `image_prompt` writes it; with `add_generation_prompt` the last user turn ends with the bare assistant header
  (`generation_template`). BOS comes first where the template has it; the system prompt is the template's own."""
  def content(message: str) -> str:
    return ('{%- if ' + message + "['content'] is string -%}{{- " + message + "['content'] -}}{%- else -%}"
            '{%- for item in ' + message + "['content'] -%}{%- if item['type'] == 'image' -%}"
            + _literal(image_prompt('', 1)) + "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}"
            '{%- endif -%}{%- endfor -%}{%- endif -%}')
  generation_suffix = template.user_suffix.rstrip(' ')
  return ''.join([
      '{{- bos_token -}}' if template.add_bos else '', _literal(template.system),
      '{%- for message in messages -%}',
      "{%- if message['role'] == 'user' -%}", _literal(template.user_prefix), content('message'),
      '{%- if loop.last and add_generation_prompt -%}', _literal(generation_suffix), '{%- else -%}',
      _literal(template.user_suffix), '{%- endif -%}',
      "{%- elif message['role'] == 'assistant' -%}", content('message'),
      _literal(template.answer_suffix + template.turn_separator),
      "{%- else -%}{{- raise_exception('the " + template.name + " template has user and assistant messages only, "
      "got role ' + message['role']) -}}{%- endif -%}",
      '{%- endfor -%}'])


def end_marker_id(tokenizer, template: ChatTemplate) -> int:
  """The id of the template's end-of-answer marker (what decoding stops at); `tokenizer` a `tokenizers.Tokenizer`."""
  return tokenizer.encode(template.answer_suffix, add_special_tokens=False).ids[0]


def check_special_tokens(tokenizer, template: ChatTemplate, where: str) -> None:
  """Raises ValueError unless each of the template's markers is one token of the (`tokenizers`) tokenizer."""
  for marker in template.special_tokens:
    ids = tokenizer.encode(marker, add_special_tokens=False).ids
    if len(ids) != 1:
      raise ValueError(f'tokenizer {where}: the {template.name} template needs {marker!r} as one token, but it '
                       f'encodes to {len(ids)} tokens {ids}; add it as a special token')


def tokenize_conversation(tokenizer, template: ChatTemplate, turns: Sequence[Turn], *,
                          visual_tokens: int | Sequence[int], image_token_id: int,
                          bos_id: int | None) -> TokenizedConversation:
  """Renders and tokenises a conversation; the loss mask (Eq. 1) marks the answers' tokens.

  `tokenizer` is a `tokenizers.Tokenizer` (a transformers tokenizer's `backend_tokenizer`, which gives offsets).
  The text between `<image>` placeholders is tokenised piece by piece, as LLaVA does, and each placeholder becomes
  `visual_tokens` copies of `image_token_id` (a sequence: the k-th placeholder's count, for images whose token
  counts differ, e.g. AnyRes). BOS is prepended when the template asks for it and bos_id is given.
  """
  text, spans, instruction_spans = render(template, turns)
  counts = [visual_tokens] * text.count(IMAGE_PLACEHOLDER) if isinstance(visual_tokens, int) else list(visual_tokens)
  if len(counts) != text.count(IMAGE_PLACEHOLDER):
    raise ValueError(f'{len(counts)} visual token counts for {text.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} '
                     'placeholders; expected one per placeholder')
  ids, target, image, instruction = [], [], [], []
  if template.add_bos and bos_id is not None:
    ids, target, image, instruction = [bos_id], [False], [False], [False]
  start = 0
  pieces = text.split(IMAGE_PLACEHOLDER)
  for k, piece in enumerate(pieces):
    if piece:
      encoding = tokenizer.encode(piece, add_special_tokens=False)
      offsets = [(start + a, start + b) for a, b in encoding.offsets]
      ids.extend(encoding.ids)
      target.extend(overlap_mask(offsets, spans))
      instruction.extend(overlap_mask(offsets, instruction_spans))
      image.extend([False] * len(encoding.ids))
    start += len(piece)
    if k < len(pieces) - 1:
      ids.extend([image_token_id] * counts[k])
      for mask, value in ((target, False), (image, True), (instruction, False)):
        mask.extend([value] * counts[k])
      start += len(IMAGE_PLACEHOLDER)
  return TokenizedConversation(np.asarray(ids, np.int32), np.asarray(target, bool), np.asarray(image, bool),
                               np.asarray(instruction, bool))


def caption_tokens(tokenizer, template: ChatTemplate, caption: str, length: int, pad_id: int) -> tuple[np.ndarray,
                                                                                                         np.ndarray]:
  """The text side of the momentum contrast (Eq. 5-7): the caption's tokens followed by the answer's end marker (how
  an answer ends in a conversation), cut or padded to `length`. -> (ids [length] int32, mask [length] bool)."""
  encoded = tokenizer.encode(caption + template.answer_suffix, add_special_tokens=False).ids[:length]
  ids = np.full(length, pad_id, np.int32)
  ids[:len(encoded)] = encoded
  return ids, np.arange(length) < len(encoded)
