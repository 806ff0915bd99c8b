"""grain input pipelines: records -> tokenised, image-preprocessed, padded or packed host batches -> global arrays.

  source (random access) -> decode + tokenise + per-expert images [-> pad to config.data.seq_len] [kept after the
    first read] -> global shuffle (seeded, a new order each epoch) -> repeat -> this host's shard -> (read by threads)
    -> drop bad records (policy 'skip') [-> pack to seq_len] -> batch -> [worker processes] -> count what was skipped
    or cut

Records are encoded lazily, when the reading threads ask for them, so decoding before shuffling costs nothing extra.
With `config.data.cache_examples` each record's encoded example is kept (`EncodedOnce`) and later epochs only shuffle,
pad and batch: for data sets whose encoded examples fit in host memory (the tiny default: 4096 scenes, ~0.8 GB).

Each host reads its blocks of the shuffled stream (`HostBlocks`: of every global batch's worth of examples, host p takes
the p-th per-host batch), so hosts see disjoint parts of every epoch and the global batch is the same for any number
of hosts. `iter(make_dataset(...))` is a `grain.DatasetIterator`: `get_state()` / `set_state()` (or the
Orbax checkpointing grain provides) restore it to continue exactly where it stopped. `to_global_batch` assembles the
hosts' batches into `jax.Array`s sharded over the mesh's batch axes.

Bad records (`config.data.on_bad_record`): 'error' raises `BadRecordError` naming the file and record index; 'skip'
drops the record, counts it and logs the running count (`DataIterator.counts['skipped']`). Over-long sequences are
truncated, counted and logged under either policy ('truncated'); one with no answer token left within seq_len is
dropped, counted and logged ('too_long').
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from typing import Any, Mapping, Sequence

import grain
import jax
import numpy as np
from absl import flags, logging
from jax.sharding import Mesh, PartitionSpec

from astrea_jax.convert.hf_astrea.anyres_astrea import AnyresGrid
from astrea_jax.data import images, sequence, sources, templates
from astrea_jax.data.conversation import BadRecordError
from astrea_jax.data.templates import ChatTemplate
from astrea_jax.parallel import sharding

# Per-example counters carried to the training process: bad records skipped, sequences truncated, and sequences
# dropped because no answer token fits in config.data.seq_len.
COUNTERS = ('num_skipped', 'num_truncated', 'num_too_long')
IMAGE_TOKEN = '<image>'
LOG_EVERY_S = 10.0  # a growing counter is logged at most this often


@dataclasses.dataclass(frozen=True)
class Dropped:
  """Stands in the stream for a record left out: a bad record under on_bad_record='skip' (counter 'num_skipped'),
  or a sequence with no answer token within seq_len (counter 'num_too_long', under either policy)."""
  counter: str
  reason: str


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
  """What the pipeline needs of a tokenizer: the `tokenizers` backend (thread-safe, with offsets) and ids."""
  backend: Any
  bos_id: int | None
  pad_id: int
  image_token_id: int
  size: int


_TOKENIZER_LOCK = threading.Lock()


def load_tokenizer(tokenizer_dir: str) -> TokenizerInfo:
  """Loads a Hugging Face tokenizer folder once per process (under a lock: the reading threads ask at once, and
  transformers' lazy imports are not thread-safe). Visual-token positions hold the id of `<image>` if the tokenizer
  has it, else the pad id (the model overwrites them either way); pad is pad, else unk, else 0."""
  with _TOKENIZER_LOCK:
    return _load_tokenizer(tokenizer_dir)


@functools.lru_cache(maxsize=None)
def _load_tokenizer(tokenizer_dir: str) -> TokenizerInfo:
  import transformers
  tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  backend = getattr(tok, 'backend_tokenizer', None)
  if backend is None:
    raise ValueError(f'tokenizer {tokenizer_dir}: not a fast (`tokenizers`) tokenizer; the pipeline needs offsets')
  pad_id = next((i for i in (tok.pad_token_id, tok.unk_token_id) if i is not None), 0)
  image_id = backend.token_to_id(IMAGE_TOKEN)
  return TokenizerInfo(backend=backend, bos_id=tok.bos_token_id, pad_id=pad_id,
                       image_token_id=pad_id if image_id is None else image_id, size=len(tok))


@dataclasses.dataclass(frozen=True)
class ExampleEncoder:
  """(record index, raw record) -> one example (unpadded fields of `sequence`, images under 'images/<expert>') or
  a `Dropped` marker. Runs in the reading threads / worker processes."""
  source: str
  decoder: Any
  tokenizer_dir: str
  template: ChatTemplate
  seq_len: int
  visual_tokens: int
  max_images: int
  experts: tuple[images.ExpertImage, ...]
  square_mode: str
  skip_bad: bool
  caption_len: int = 0  # > 0: each image's caption as tokens ('captions', 'caption_mask'), MoCo's text side
  frame_tokens: int = 0  # positions a video frame fills (its pooled tokens: visual_tokens / config.data.video.pool^2)
  anyres: AnyresGrid | None = None  # AnyRes (config.data.anyres): tiles, per-image token counts and index

  def image_tokens(self, image: np.ndarray) -> int:
    """The placeholders an image [H, W, 3] fills: visual_tokens, or with AnyRes its size's count (as LLaVA-NeXT's
    processor computes it, `AnyresGrid.num_tokens`)."""
    return self.visual_tokens if self.anyres is None else self.anyres.num_tokens(image.shape[:2])

  def __call__(self, indexed: tuple[int, Any]) -> dict[str, Any] | Dropped:
    index, raw = indexed
    try:
      return self.encode(index, raw)
    except BadRecordError as e:
      located = e.at(self.source, index)
      if not self.skip_bad:
        raise located from None
      logging.log_first_n(logging.WARNING, 'data: skipping a bad record: %s', 20, located)
      return Dropped('num_skipped', str(located))

  def encode(self, index: int, raw: Any) -> dict[str, Any] | Dropped:
    sample = self.decoder(self.source, index, raw)
    if len(sample.images) > self.max_images:
      what = f'a video of {len(sample.images)} frames' if any(sample.frames) else f'{len(sample.images)} images'
      raise BadRecordError(f'{what}; config.data.max_images={self.max_images} image slots per row')
    frames = sample.frames or (False,) * len(sample.images)
    counts = np.asarray([self.frame_tokens if frame else self.image_tokens(image)
                         for image, frame in zip(sample.images, frames)], np.int32)
    tok = load_tokenizer(self.tokenizer_dir)
    tokens = templates.tokenize_conversation(tok.backend, self.template, sample.turns, visual_tokens=counts,
                                             image_token_id=tok.image_token_id, bos_id=tok.bos_id)
    full_length = len(tokens.ids)
    tokens, truncated = sequence.truncate(tokens, self.seq_len)
    if not tokens.target_mask[1:].any():
      reason = (f'{self.source} record {index}: no answer token within the first {self.seq_len} tokens '
                f'({full_length} in all)')
      logging.log_first_n(logging.WARNING, 'data: dropping a sequence: %s', 20, reason)
      return Dropped('num_too_long', reason)
    example: dict[str, Any] = sequence.next_token_fields(tokens)
    kept = sequence.images_kept(counts, example['image_mask'])
    example['image_ids'] = np.asarray(sample.image_ids[:kept], np.int32)
    example['image_tokens'] = counts[:kept]
    if self.anyres is None:
      pixels = images.expert_inputs(sample.images[:kept], self.experts, self.square_mode)
    else:
      pixels = images.expert_tiles(sample.images[:kept], self.anyres, self.experts, frames[:kept])
      example['anyres_index'] = np.zeros((kept, self.anyres.max_tokens), np.int32)
      for i, (image, frame) in enumerate(zip(sample.images[:kept], frames)):
        example['anyres_index'][i] = self.anyres.slot_index(None if frame else image.shape[:2])
    for name, x in pixels.items():
      example[sequence.IMAGE_PREFIX + name] = x
    if self.caption_len:
      if len(sample.captions) < kept:
        raise BadRecordError(f'{len(sample.captions)} captions for {kept} images; the main stage contrasts each '
                             'image with its caption')
      pairs = [templates.caption_tokens(tok.backend, self.template, c, self.caption_len, tok.pad_id)
               for c in sample.captions[:kept]]
      example['captions'] = np.asarray([ids for ids, _ in pairs], np.int32).reshape(kept, self.caption_len)
      example['caption_mask'] = np.asarray([m for _, m in pairs], np.int32).reshape(kept, self.caption_len)
    example['num_truncated'] = int(truncated)
    return example


@dataclasses.dataclass(frozen=True)
class WithRecordIndex:
  """(stream index, raw) -> (record index, raw): past the first epoch, grain's index counts on from the length."""
  num_records: int

  def __call__(self, index: int, raw: Any) -> tuple[int, Any]:
    return index % self.num_records, raw


class EncodedOnce(grain.MapDataset):
  """The parent's elements, each computed at its first read and kept for the life of the dataset (per process:
  each grain worker keeps its own). Element i of a later epoch (index i + epoch * len) is element i: the parent
  must give the same element for both, as the encoded records do (`ExampleEncoder` is a function of the record)."""

  def __init__(self, parent: grain.MapDataset):
    super().__init__(parent)
    self._kept: dict[int, Any] = {}  # reading threads may encode a record twice at once; either copy is the same

  def __len__(self) -> int:
    return len(self._parent)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    key = index % len(self._parent)
    if key not in self._kept:
      self._kept[key] = self._parent[index]
    return self._kept[key]

  def __str__(self) -> str:
    return 'EncodedOnce'


class HostBlocks(grain.MapDataset):
  """This host's part of a stream: element k is element (k // block) * block * count + index * block + k % block of
  the parent, i.e. host `index` of `count` takes the index-th block of `block` consecutive elements out of every
  block * count. With block = the per-host batch size, the global batch (hosts' batches in process order) holds the
  same examples in the same order for any number of hosts, so runs on 1 and on N hosts train alike."""

  def __init__(self, parent: grain.MapDataset, block: int, index: int, count: int):
    super().__init__(parent)
    self._block, self._index, self._count = block, index, count

  def __len__(self) -> int:
    n, span = len(self._parent), self._block * self._count
    full, rest = divmod(n, span)
    return full * self._block + min(max(rest - self._index * self._block, 0), self._block)

  def __getitem__(self, k):
    if isinstance(k, slice):
      return self.slice(k)
    row, i = divmod(k, self._block)
    return self._parent[row * self._block * self._count + self._index * self._block + i]

  def __str__(self) -> str:
    return f'HostBlocks(block={self._block}, index={self._index}, count={self._count})'


class DroppedEverythingError(ValueError):
  """A run of consecutive records was dropped: the data cannot make a batch (names the source and the reasons)."""


class _CountingIterator(grain.DatasetIterator):
  """A pipeline iterator whose checkpointed state is its parent's and one dict of counts: the attribute named by
  `STATE` = (key in the state, attribute)."""
  STATE: tuple[str, str]

  def get_state(self) -> dict[str, Any]:
    key, attribute = self.STATE
    return {'parent': self._parent.get_state(), key: dict(getattr(self, attribute))}

  def set_state(self, state: dict[str, Any]) -> None:
    key, attribute = self.STATE
    self._parent.set_state(state['parent'])
    setattr(self, attribute, dict(state[key]))


class _DropIterator(_CountingIterator):
  """Drops `Dropped` markers; each example kept carries, per drop counter, the markers dropped just before it. More
  than `max_run` markers in a row stop the pipeline (`DroppedEverythingError`) instead of reading forever."""
  STATE = ('pending', '_pending')

  def __init__(self, parent: grain.DatasetIterator, source: str, max_run: int):
    super().__init__(parent)
    self._source, self._max_run = source, max_run
    self._pending = {'num_skipped': 0, 'num_too_long': 0}

  def __next__(self) -> dict[str, Any]:
    while True:
      element = next(self._parent)
      if isinstance(element, Dropped):
        self._pending[element.counter] += 1
        if sum(self._pending.values()) >= self._max_run:
          raise DroppedEverythingError(
              f'{self._source}: the last {sum(self._pending.values())} records were all dropped '
              f'({self._pending["num_skipped"]} bad records skipped, {self._pending["num_too_long"]} with no answer '
              f'token within config.data.seq_len); the last one: {element.reason}. Fix the data or config.data '
              '(seq_len, on_bad_record); config.data.max_consecutive_drops sets this limit')
        continue
      element = {**element, **self._pending}  # a new dict: the element may be kept (EncodedOnce)
      self._pending = dict.fromkeys(self._pending, 0)
      return element


class _Wrapped(grain.IterDataset):
  """An IterDataset whose iterator is `iterator_class(parent iterator, *args)` (the pipeline's own iterators)."""

  def __init__(self, parent: grain.IterDataset, iterator_class: type, *args: Any):
    super().__init__(parent)
    self._iterator_class, self._args = iterator_class, args

  def __iter__(self) -> grain.DatasetIterator:
    return self._iterator_class(self._parent.__iter__(), *self._args)


class DataIterator(_CountingIterator):
  """The pipeline's iterator over host batches. `counts` holds, so far: 'skipped' bad records, 'truncated' sequences
  and 'too_long' sequences dropped with no answer token within seq_len; each is logged as it grows and is part of the
  checkpointed state."""

  _MESSAGES = {'skipped': 'data %s: skipped %d bad records so far (on_bad_record=skip)',
               'truncated': 'data %s: truncated %d sequences longer than config.data.seq_len so far',
               'too_long': 'data %s: dropped %d sequences with no answer token within config.data.seq_len so far'}
  STATE = ('counts', 'counts')

  def __init__(self, parent: grain.DatasetIterator, source: str):
    super().__init__(parent)
    self._source = source
    self.counts = dict.fromkeys(self._MESSAGES, 0)
    self._logged_at = dict.fromkeys(self._MESSAGES, -np.inf)

  def __next__(self) -> dict[str, Any]:
    batch = next(self._parent)
    for counter, name in zip(COUNTERS, self._MESSAGES):
      added = int(np.sum(batch.pop(counter)))
      self.counts[name] += added
      if added and time.monotonic() - self._logged_at[name] >= LOG_EVERY_S:
        logging.warning(self._MESSAGES[name], self._source, self.counts[name])
        self._logged_at[name] = time.monotonic()
    return batch


@dataclasses.dataclass(frozen=True)
class PadRow:
  """An encoded example -> its row padded to seq_len tokens and max_images image slots, images nested (a `Dropped`
  marker passes through). Runs in the reading threads, before `EncodedOnce`."""
  seq_len: int
  max_images: int
  pad_id: int

  def __call__(self, example: dict[str, Any] | Dropped) -> dict[str, Any] | Dropped:
    if isinstance(example, Dropped):
      return example
    row = sequence.pad_row(example, self.seq_len, self.max_images, self.pad_id)
    row['num_truncated'] = example['num_truncated']  # the drop counters are added after (_DropIterator)
    return sequence.nest_images(row)


def _packed_row(packed: dict[str, Any]) -> dict[str, Any]:
  row = sequence.row_from_packed(packed)
  row.update({k: int(sum(packed[k])) for k in COUNTERS})
  return sequence.nest_images(row)


def _pack(ds: grain.IterDataset, experts: Sequence[str], seq_len: int, max_images: int, pad_id: int, rows: int,
          seed: int, slot_fields: Sequence[str]) -> grain.IterDataset:
  """First-fit packing into `rows` bins at a time: token fields up to seq_len, image slots up to max_images."""
  lengths = sequence.packing_lengths(experts, seq_len, max_images, slot_fields)
  padding = {k: pad_id if k == 'inputs' else -1 if k == 'image_ids' else None for k in lengths}
  packed = grain.experimental.FirstFitPackIterDataset(ds, length_struct=lengths, num_packing_bins=rows, seed=seed,
                                                      shuffle_bins=True, meta_features=COUNTERS,
                                                      padding_struct=padding)
  return packed.map(_packed_row)


def local_batch_size(global_batch_size: int, shard_count: int) -> int:
  if global_batch_size % shard_count:
    raise ValueError(f'config.train.global_batch_size={global_batch_size} is not divisible by the {shard_count} '
                     f'data shards (hosts)')
  return global_batch_size // shard_count


def make_dataset(config, stage: str, split: str = 'train', *, tokenizer_dir: str,
                 shard_options: grain.sharding.ShardOptions | None = None, shuffle: bool | None = None,
                 num_epochs: int | None = None, batch_size: int | None = None,
                 experts: Sequence[str] | None = None, single_turn: bool = False,
                 caption_len: int = 0) -> grain.IterDataset:
  """The host-batch pipeline of one stage and split; `iter()` of it is a `DataIterator`.

  shard_options default to `grain.sharding.ShardByJaxProcess()` (this process of jax.process_count(); tests simulate
  hosts with explicit `ShardOptions(shard_index, shard_count)`); shuffle defaults to split == 'train';
  num_epochs to config.data.num_epochs for 'train' (0 = forever) and 1 otherwise; batch_size (per host) to
  train.global_batch_size / shard_count; experts to all of config.data.experts. single_turn: one example per
  question-answer exchange (`sources.SingleTurnSource`); caption_len > 0 adds each image's caption tokens (MoCo's
  text side). A batch holds the row fields of `astrea_jax.data.sequence` with a leading [batch_size] axis.
  """
  data = config.data
  shard = shard_options or grain.sharding.ShardByJaxProcess()
  if not 0 <= shard.shard_index < shard.shard_count:
    raise ValueError(f'{shard}: expected 0 <= shard_index < shard_count')
  shuffle = split == 'train' if shuffle is None else shuffle
  if num_epochs is None:
    num_epochs = (data.num_epochs or None) if split == 'train' else 1
  batch_size = batch_size or local_batch_size(config.train.global_batch_size, shard.shard_count)
  template = templates.get_template(data.template)
  tok = load_tokenizer(tokenizer_dir)
  templates.check_special_tokens(tok.backend, template, tokenizer_dir)
  if tok.size > config.llm.vocab_size:
    raise ValueError(f'tokenizer {tokenizer_dir} has {tok.size} tokens, more than config.llm.vocab_size='
                     f'{config.llm.vocab_size}')

  source, decoder, name = sources.open_source(data, stage, split, single_turn=single_turn)
  if len(source) == 0:
    raise ValueError(f'{name}: no records')
  encoder = ExampleEncoder(source=name, decoder=decoder, tokenizer_dir=tokenizer_dir, template=template,
                           seq_len=data.seq_len, visual_tokens=data.visual_tokens, max_images=data.max_images,
                           frame_tokens=data.visual_tokens // data.video.pool**2,
                           experts=images.experts_from_config(
                               data.experts, {slot: e.family for slot, e in config.model.experts.items()}, experts),
                           square_mode=data.image_square,
                           skip_bad=data.on_bad_record == 'skip', caption_len=caption_len,
                           anyres=images.anyres_grid(data))
  seed = config.train.seed
  ds = grain.MapDataset.source(source).map_with_index(WithRecordIndex(len(source))).map(encoder)
  if not data.packing:
    ds = ds.map(PadRow(data.seq_len, data.max_images, tok.pad_id))
  if data.cache_examples:
    ds = EncodedOnce(ds)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = HostBlocks(ds.repeat(num_epochs), batch_size, shard.shard_index, shard.shard_count)
  it = _Wrapped(ds.to_iter_dataset(grain.ReadOptions(num_threads=data.read_threads,
                                                     prefetch_buffer_size=2 * batch_size)),
                _DropIterator, name, data.max_consecutive_drops)
  if data.packing:
    slot_fields = (['image_ids', 'image_tokens'] + (['captions', 'caption_mask'] if caption_len else [])
                   + (['anyres_index'] if encoder.anyres is not None else []))
    it = _pack(it, [e.name for e in encoder.experts], data.seq_len, data.max_images, tok.pad_id, batch_size, seed,
               slot_fields)
  it = it.batch(batch_size, drop_remainder=True)
  if data.num_workers:
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # grain's worker setup reads its absl flags; outside an absl app, the defaults
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers,
                                                     per_worker_buffer_size=data.worker_buffer_size))
  return _Wrapped(it, DataIterator, name)


def batch_logical_axes(key: str, ndim: int) -> tuple[str | None, ...]:
  """Logical axis names of a batch field: [B, L] token fields ('activation_batch', 'activation_length'), anything
  else batch-sharded on its first axis only."""
  if key in sequence.TOKEN_FIELDS + ('segment_ids', 'positions'):
    return ('activation_batch', 'activation_length')
  if key == 'cached':  # [k, B, T, D]: the earlier stages' tokens from the feature cache
    return (None, 'activation_batch') + (None,) * (ndim - 2)
  return ('activation_batch',) + (None,) * (ndim - 1)


def to_global_batch(batch: Mapping[str, Any], mesh: Mesh, rules) -> dict[str, Any]:
  """This host's batch (numpy, leading axis = its rows) -> global `jax.Array`s sharded over the mesh axes that the
  rules give 'activation_batch' (by default ('data', 'fsdp')); the global batch is the hosts' rows in process order."""
  def put(path, value):
    key = path[0].key
    spec = PartitionSpec(*batch_logical_axes(key, np.ndim(value)))
    return jax.make_array_from_process_local_data(sharding.logical_to_sharding(spec, mesh, rules), np.asarray(value))
  return jax.tree_util.tree_map_with_path(put, dict(batch))
