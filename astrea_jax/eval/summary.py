"""summary.md: one row per evaluated benchmark, in the units of the paper's Table 1, next to the paper's Astrea rows.

Table 1's columns (the extracted paper text lost its header; the order below is read from §4.3, which names the four
groups General / Knowledge / OCR & Chart / Vision-Centric and their datasets, and from the Cambrian-1 rows, which
match Cambrian-1's published table column for column): MME-P (perception score, points out of 2000), MMB, SEED
(SEED-Image), GQA, SQA-I, MMMU, MathVista, AI2D, ChartQA, OCRBench, TextVQA, DocVQA, MMVP, RealWorldQA, CV-Bench2D,
CV-Bench3D, all but MME-P in percent. Benchmarks that Table 1 lacks (MME cognition, POPE, VQAv2) follow the table
columns (and the synthetic shapes set's VQA, the mean accuracy over its question types); Table 1 columns with no
evaluator here are listed under the table, each result's settings (data, split, stage, checkpoint, ...) after it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class Column:
  """A summary row: its Table 1 column name (or our label), the benchmark and score key, and the factor from the
  score to the paper's unit."""
  label: str
  benchmark: str | None
  score: str = ''
  scale: float = 100.0
  unit: str = '%'


TABLE1 = (
    Column('MME-P', 'mme', 'perception', 1.0, 'points / 2000'), Column('MMB', 'mmbench', 'accuracy'),
    Column('SEED', 'seedbench', 'seed_image'), Column('GQA', 'gqa', 'accuracy'),
    Column('SQA-I', 'scienceqa_img', 'accuracy'), Column('MMMU', 'mmmu', 'accuracy'), Column('MathVista', None),
    Column('AI2D', None), Column('ChartQA', 'chartqa', 'relaxed_overall'), Column('OCRBench', None),
    Column('TextVQA', 'textvqa', 'accuracy'), Column('DocVQA', 'docvqa', 'anls'), Column('MMVP', None),
    Column('RealWorldQA', None), Column('CV-Bench2D', None), Column('CV-Bench3D', None))
EXTRA = (Column('MME-C', 'mme', 'cognition', 1.0, 'points / 800'), Column('POPE F1', 'pope', 'f1'),
         Column('POPE acc', 'pope', 'accuracy'), Column('VQAv2', 'vqav2', 'accuracy'),
         Column('Shapes VQA', 'shapes', 'mean_accuracy'))
# The paper's Table 1 rows, in TABLE1's column order.
PAPER = {
    'Astrea-13B': (1655.2, 77.2, 76.1, 65.9, 78.2, 42.5, 49.3, 74.6, 75.5, 63.4, 73.8, 75.5, 44.6, 65.0, 74.1, 73.0),
    'Astrea-34B': (1749.5, 83.6, 76.9, 66.7, 88.2, 51.5, 55.4, 82.4, 78.2, 63.0, 79.2, 80.6, 51.4, 69.8, 75.5, 82.2),
}


def read_results(folder: str) -> list[dict[str, Any]]:
  """Every `<benchmark>.json` result in `folder` (a dict with 'benchmark' and 'scores'), by file name."""
  results = []
  for name in sorted(os.listdir(folder)):
    if name.endswith('.json'):
      with open(os.path.join(folder, name), encoding='utf-8') as f:
        result = json.load(f)
      if isinstance(result, dict) and 'benchmark' in result and 'scores' in result:
        results.append(result)
  return results


def _value(result: Mapping[str, Any], column: Column) -> float:
  scores = result['scores']
  if column.score not in scores:
    raise ValueError(f'{column.benchmark} result: no score {column.score!r} for the {column.label} column; '
                     f'found {sorted(scores)}')
  return float(scores[column.score]) * column.scale


def summary_markdown(results: Sequence[Mapping[str, Any]]) -> str:
  """The summary table (module doc) of a run's result dicts (`evaluator.result_json`); each row shows the number of
  examples scored (a `limit`ed run is not comparable with the paper)."""
  by_name = {}
  for result in results:
    if result['benchmark'] in by_name:
      raise ValueError(f'two results for benchmark {result["benchmark"]!r}; expected one each')
    by_name[result['benchmark']] = result
  papers = list(PAPER)
  header = ['Table 1 column', 'benchmark', 'unit', 'ours', *[f'{p} (paper)' for p in papers], 'examples']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for k, column in enumerate(TABLE1 + EXTRA):
    if column.benchmark not in by_name:
      continue
    result = by_name[column.benchmark]
    paper = [f'{PAPER[p][k]:.1f}' if k < len(TABLE1) else '-' for p in papers]
    lines.append('| ' + ' | '.join([column.label, column.benchmark, column.unit, f'{_value(result, column):.1f}',
                                    *paper, str(len(result.get('examples', [])))]) + ' |')
  missing = [c.label for c in TABLE1 if c.benchmark is None]
  unknown = sorted(set(by_name) - {c.benchmark for c in TABLE1 + EXTRA})
  text = ['# Benchmark summary', '', *lines, '',
          f'Table 1 columns with no evaluator here: {", ".join(missing)}.']
  if unknown:
    text.append(f'Results not in the table: {", ".join(unknown)}.')
  settings = [f'- {name}: ' + ', '.join(f'{k}={v}' for k, v in by_name[name]['settings'].items())
              for name in sorted(by_name) if by_name[name].get('settings')]
  if settings:
    text += ['', '## Settings', '', *settings]
  return '\n'.join(text) + '\n'
