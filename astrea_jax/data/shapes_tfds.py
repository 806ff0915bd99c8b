"""The synthetic shapes dataset as a TFDS dataset, prepared locally to ArrayRecord, and its LLaVA-style export.

`prepare(config.data.shapes)` generates the splits (never downloading anything) under the TFDS data dir, in a folder
named by the generation settings, and returns that folder; later calls find it and return at once. Record i of a split
is scene i of the split's seed stream (`np.random.default_rng([seed, split id, i])`; the three splits use disjoint
streams). Reading goes through `tfds.data_sources` (random access, no TensorFlow at read time).

`export_llava` writes the same records as LLaVA-style files, so that the reader of users' data is tested on them:

  OUT/{split}/{stage}.json          one record per scene: {"id", "image": "images/000017.png", "conversations"}
  OUT/{split}/images/{index:06d}.png
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from astrea_jax.core import files, multihost
from astrea_jax.core.stages import ALIGN_STAGES, STAGES
from astrea_jax.data import shapes, shapes_text, stage_targets
from astrea_jax.data.shapes_text import Annotations, VQAPair

SPLITS = ('train', 'validation', 'test')
VERSION = '1.0.0'


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  """Generation settings; the config name spells them, so different settings never share a folder."""
  image_size: int = 64
  num_train: int = 1024
  num_validation: int = 128
  num_test: int = 128
  seed: int = 0


def builder_config(shapes_config: Mapping[str, Any]) -> ShapesConfig:
  """`config.data.shapes` (checked by `config.validate`) -> a ShapesConfig named after its settings."""
  size, seed = int(shapes_config['image_size']), int(shapes_config['seed'])
  counts = [int(shapes_config[f'num_{split}']) for split in SPLITS]
  name = f'{size}px_seed{seed}_' + '_'.join(str(n) for n in counts)
  return ShapesConfig(name=name, image_size=size, num_train=counts[0], num_validation=counts[1],
                      num_test=counts[2], seed=seed)


def _features(image_size: int) -> tfds.features.FeaturesDict:
  text = tfds.features.Text()
  return tfds.features.FeaturesDict({
      'id': text,
      'image': tfds.features.Image(shape=(image_size, image_size, 3), encoding_format='png'),
      'segmentation': tfds.features.Image(shape=(image_size, image_size, 1), encoding_format='png'),
      'captions': tfds.features.Sequence(text, length=2),
      'tags': tfds.features.Sequence(text),
      'objects': tfds.features.Sequence({
          'shape': tfds.features.ClassLabel(names=shapes.SHAPES),
          'color': tfds.features.ClassLabel(names=list(shapes.COLORS)),
          'size': tfds.features.ClassLabel(names=list(shapes.SIZES)),
          'box': tfds.features.Tensor(shape=(4,), dtype=np.int32),
          'polygon': tfds.features.Tensor(shape=(shapes.POLYGON_VERTICES, 2), dtype=np.float32),
      }),
      'vqa': tfds.features.Sequence({
          'type': tfds.features.ClassLabel(names=shapes_text.VQA_TYPES),
          'question': text,
          'answer': text,
      }),
  })


def scene_record(split: str, index: int, seed: int, image_size: int) -> dict[str, Any]:
  """The stored features of scene `index` of a split (deterministic in seed, split and index)."""
  rng = np.random.default_rng([seed, SPLITS.index(split), index])
  scene = shapes.generate_scene(rng, image_size)
  ann = shapes_text.annotate(rng, scene)
  return {
      'id': f'{split}_{index:06d}',
      'image': scene.image,
      'segmentation': scene.segmentation[..., None],
      'captions': list(ann.captions),
      'tags': list(ann.tags),
      'objects': {'shape': [o.shape for o in ann.objects], 'color': [o.color for o in ann.objects],
                  'size': [o.size for o in ann.objects],
                  'box': np.asarray([o.box for o in ann.objects], np.int32).reshape(-1, 4),
                  'polygon': np.stack([o.polygon for o in ann.objects]).astype(np.float32)},
      'vqa': {'type': [p.type for p in ann.vqa], 'question': [p.question for p in ann.vqa],
              'answer': [p.answer for p in ann.vqa]},
  }


class AstreaShapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Synthetic scenes of coloured shapes with captions, tags, boxes, masks, polygons and VQA pairs."""

  VERSION = tfds.core.Version(VERSION)
  BUILDER_CONFIGS = [ShapesConfig(name='default')]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=__doc__, features=_features(self.builder_config.image_size),
                                 disable_shuffling=True)

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str):
    c = self.builder_config
    for index in range(getattr(c, f'num_{split}')):
      yield index, scene_record(split, index, c.seed, c.image_size)


def prepare(shapes_config: Mapping[str, Any]) -> str:
  """Generates the dataset described by `config.data.shapes` unless already there; returns its folder."""
  data_dir = shapes_config['data_dir'] or None
  builder = AstreaShapes(config=builder_config(shapes_config), data_dir=data_dir)
  folder = os.fspath(builder.data_path)
  if os.path.isdir(folder):  # complete (TFDS renames it into place); no lock, so a read-only copy works
    return folder
  with files.exclusive(folder):  # another process preparing it: wait, then find it
    builder.download_and_prepare(file_format='array_record',
                                 download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return folder


def prepare_shared(shapes_config: Mapping[str, Any]) -> str:
  """`prepare` on process 0 first, then on every other process (which finds the folder): hosts that share a
  filesystem do not race to build it."""
  return multihost.first_then_all('shapes_prepared', lambda: prepare(shapes_config))


def data_source(dataset_dir: str, split: str, *, with_segmentation: bool = True):
  """Random-access source of a prepared split: record i -> dict of numpy features. Without segmentation, that PNG
  is left undecoded (bytes): the training stages read the boxes and polygons instead."""
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r} of the shapes dataset; expected one of {SPLITS}')
  decoders = None if with_segmentation else {'segmentation': tfds.decode.SkipDecoding()}
  return tfds.builder_from_directory(dataset_dir).as_data_source(split=split, decoders=decoders)


@functools.lru_cache(maxsize=None)
def vqa_counts(dataset_dir: str, split: str) -> np.ndarray:
  """[num scenes] the number of VQA pairs of each scene of a split (images left undecoded; cached per process)."""
  skip = {'image': tfds.decode.SkipDecoding(), 'segmentation': tfds.decode.SkipDecoding()}
  source = tfds.builder_from_directory(dataset_dir).as_data_source(split=split, decoders=skip)
  counts = np.asarray([len(source[i]['vqa']['type']) for i in range(len(source))], np.int64)
  counts.flags.writeable = False
  return counts


def _text(value: Any) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def annotations_from_record(record: Mapping[str, Any]) -> Annotations:
  """A decoded record -> the Annotations the stages read."""
  objects, vqa = record['objects'], record['vqa']
  return Annotations(
      image_size=int(record['image'].shape[0]),
      captions=tuple(_text(c) for c in record['captions']),
      tags=tuple(_text(t) for t in record['tags']),
      objects=tuple(shapes.ShapeObject(shape=shapes.SHAPES[s], color=list(shapes.COLORS)[c],
                                       size=list(shapes.SIZES)[z], box=tuple(int(v) for v in b),
                                       polygon=np.asarray(p, np.float32))
                    for s, c, z, b, p in zip(objects['shape'], objects['color'], objects['size'], objects['box'],
                                             objects['polygon'])),
      vqa=tuple(VQAPair(shapes_text.VQA_TYPES[t], _text(q), _text(a))
                for t, q, a in zip(vqa['type'], vqa['question'], vqa['answer'])))


def image_file(index: int) -> str:
  """Path of scene `index`'s PNG relative to its split folder in the export."""
  return f'images/{index:06d}.png'


def export_llava(dataset_dir: str, out_dir: str, align_order: Sequence[str], *, overwrite: bool = False) -> str:
  """Writes every split and stage (those in align_order, then instruct and main) of a prepared dataset as LLaVA
  JSON + PNG files (layout in the module doc), into a temporary folder renamed to out_dir at the end."""
  stages = tuple(align_order) + tuple(s for s in STAGES if s not in ALIGN_STAGES)
  with files.atomic_directory(out_dir, overwrite=overwrite) as tmp:
    for split in SPLITS:
      source = data_source(dataset_dir, split)
      os.makedirs(os.path.join(tmp, split, 'images'))
      records = {stage: [] for stage in stages}
      for index in range(len(source)):
        record = source[index]
        Image.fromarray(record['image']).save(os.path.join(tmp, split, image_file(index)))
        annotations = annotations_from_record(record)
        for stage in stages:
          turns = stage_targets.stage_conversation(stage, annotations, align_order)
          records[stage].append({'id': _text(record['id']), 'image': image_file(index),
                                 'conversations': [{'from': role, 'value': text} for role, text in turns]})
      for stage, stage_records in records.items():
        with open(os.path.join(tmp, split, f'{stage}.json'), 'w') as f:
          json.dump(stage_records, f, indent=1)
  return out_dir
