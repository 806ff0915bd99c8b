"""Which tokenizer a run uses, resolved one way for training, evaluation and every CLI (`resolve`): config.tokenizer_dir,
else the tokenizer stored in config.init_checkpoint, else, for the synthetic shapes set, a byte-level BPE tokenizer
with the chat markers learned from that set's text (`synthetic_tokenizer`), kept beside the prepared dataset so that
every tool sees the tokenisation training sees. `build_chat_tokenizer` makes such a tokenizer from any corpus."""

from __future__ import annotations

import json
import os
from typing import Sequence

import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from astrea_jax.convert import checkpoint
from astrea_jax.core import files, multihost
from astrea_jax.core.errors import ConfigError
from astrea_jax.core.stages import ALIGN_STAGES
from astrea_jax.data import shapes_tfds, shapes_video, stage_targets

SPECIAL_TOKENS = ('<unk>', '<s>', '</s>')           # ids 0, 1, 2; BOS prepended
CHAT_TOKENS = ('<image>', '<|im_start|>', '<|im_end|>', '<pad>')  # the last ids; <pad> is the pad token
CORPUS_SCENES = 256                                  # scenes of the train split whose text the merges are learned on


def build_chat_tokenizer(vocab_size: int, corpus: Sequence[str]) -> transformers.PreTrainedTokenizerFast:
  """A byte-level BPE `PreTrainedTokenizerFast` of at most vocab_size entries: <unk>=0, <s>=1 (prepended), </s>=2,
  merges learned from `corpus`, and the chat markers (<image>, <|im_start|>, <|im_end|>, <pad> as the pad token) as
  special tokens in its last four ids, so that both chat templates work."""
  tok = tokenizers.Tokenizer(models.BPE(unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(CHAT_TOKENS), special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(list(corpus), trainer)
  tok.post_processor = processors.TemplateProcessing(single='<s> $A', pair='<s> $A <s> $B',
                                                     special_tokens=[('<s>', tok.token_to_id('<s>'))])
  out = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='<s>', eos_token='</s>',
                                             unk_token='<unk>')
  out.add_special_tokens({'pad_token': '<pad>', 'additional_special_tokens': list(CHAT_TOKENS[:-1])})
  return out


def shapes_corpus(dataset_dir: str) -> list[str]:
  """The text the synthetic tokenizer learns from: every turn of every alignment stage and of instruction tuning for
  the first `CORPUS_SCENES` scenes of the train split."""
  source = shapes_tfds.data_source(dataset_dir, 'train', with_segmentation=False)
  corpus = []
  for i in range(min(len(source), CORPUS_SCENES)):
    ann = shapes_tfds.annotations_from_record(source[i])
    for stage in ALIGN_STAGES + ('instruct',):
      corpus += [text for _, text in stage_targets.stage_conversation(stage, ann, ALIGN_STAGES)]
  return corpus


def video_corpus(folder: str) -> list[str]:
  """The turns of the first `CORPUS_SCENES` clips' questions of a prepared shapes_video set's train split."""
  with open(os.path.join(folder, 'train.json')) as f:
    records = json.load(f)[:CORPUS_SCENES * len(shapes_video.QUESTION_TYPES)]
  return [turn['value'] for record in records for turn in record['conversations']]


def synthetic_tokenizer(shapes_config, vocab_size: int, video_config=None) -> str:
  """The folder of the synthetic set's tokenizer of `vocab_size` entries, beside the prepared dataset (built by
  process 0 when absent, written atomically; every process then finds it). With `video_config`
  (config.data.shapes_video) it also learns the clips' questions and sits beside the clips."""
  dataset_dir = shapes_tfds.prepare_shared(shapes_config)
  video_dir = shapes_video.prepare_shared(video_config) if video_config is not None else None
  out = os.path.join(video_dir or dataset_dir, f'tokenizer_{vocab_size}')
  if multihost.is_primary() and not os.path.isfile(os.path.join(out, 'tokenizer.json')):
    with files.exclusive(out):  # another process building it: wait, then find it
      if not os.path.isfile(os.path.join(out, 'tokenizer.json')):
        corpus = shapes_corpus(dataset_dir) + (video_corpus(video_dir) if video_dir else [])
        tok = build_chat_tokenizer(vocab_size, corpus)
        with files.atomic_directory(out, overwrite=True) as tmp:
          tok.save_pretrained(tmp)
  multihost.barrier(f'synthetic_tokenizer_{vocab_size}')
  return out


def resolve(config) -> str:
  """The run's tokenizer folder (module docstring); a run on LLaVA files with none is a ConfigError."""
  if config.tokenizer_dir:
    return config.tokenizer_dir
  if config.init_checkpoint:
    found = checkpoint.tokenizer_dir(config.init_checkpoint)
    if found:
      return found
  if config.data.dataset == 'shapes':
    return synthetic_tokenizer(config.data.shapes, config.llm.vocab_size)
  if config.data.dataset == 'shapes_video':
    return synthetic_tokenizer(config.data.shapes, config.llm.vocab_size, config.data.shapes_video)
  raise ConfigError('config.tokenizer_dir and config.init_checkpoint (with a tokenizer) are empty; a run on LLaVA '
                    'files needs a tokenizer (set config.tokenizer_dir)')
