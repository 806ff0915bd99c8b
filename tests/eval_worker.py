"""Evaluates a benchmark file with a tiny random two-expert Astrea model in its own process (for
tests/test_eval_loop.py), one process of a multi-process job when --num_processes > 1: the parameters are put on the
mesh sharded by the config's rules, the prompts answered by `eval.loop.predict` and the benchmark run end to end by
`eval.benchmarks.run_benchmark`. Each process writes <out>/fed_<process>.json (the question ids whose rows it fed);
process 0 writes <out>/<benchmark>.json and summary.md.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from astrea_jax import config as config_lib  # noqa: E402
from astrea_jax.eval import benchmarks, loop  # noqa: E402
from astrea_jax.parallel import distributed, sharding  # noqa: E402
from astrea_jax.parallel import mesh as mesh_lib  # noqa: E402
from astrea_jax.train.stage_step import params_init_fn  # noqa: E402

SLOTS = ('caption', 'classification')


def tiny_config(mesh: str, coordinator: str = '', num_processes: int = 0, process_id: int = -1):
  """Two 32 px experts, 4 visual tokens, the base config's tiny LLM; the mesh 'data,fsdp,tensor'."""
  c = config_lib.base_config()
  for slot in set(c.model.experts) - set(SLOTS):
    del c.model.experts[slot]
  for slot in c.data.experts:
    c.data.experts[slot].image_size = 32
  c.data.align_order = tuple(f'align_{slot}' for slot in SLOTS)
  c.data.visual_tokens = 4
  c.astrea.top_k = 2
  c.astrea.router_context = 'visual+text'
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = (int(n) for n in mesh.split(','))
  c.distributed.update(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
  return config_lib.lock(c)


def random_params(config, cfg, mesh, seed: int = 0):
  """N(0, 0.1) parameters (the same on every process), each array placed in its sharding on `mesh`."""
  abstract, shardings = sharding.abstract_and_shardings(params_init_fn(config, cfg), mesh, config.logical_axis_rules)
  rng = np.random.default_rng(seed)
  host = jax.tree.map(lambda a: rng.normal(0.0, 0.1, a.shape).astype(a.dtype), abstract)
  return jax.tree.map(lambda h, s: jax.make_array_from_callback(h.shape, s, lambda index: h[index]), host, shardings)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', required=True, help='where the outputs go')
  parser.add_argument('--benchmark', required=True)
  parser.add_argument('--data', required=True)
  parser.add_argument('--tokenizer', required=True)
  parser.add_argument('--batch_size', type=int, required=True)
  parser.add_argument('--mesh', default='2,2,2')
  parser.add_argument('--coordinator', default='')
  parser.add_argument('--num_processes', type=int, default=0)
  parser.add_argument('--process_id', type=int, default=-1)
  args = parser.parse_args()
  logging.set_verbosity(logging.INFO)
  config = tiny_config(args.mesh, args.coordinator, args.num_processes, args.process_id)
  distributed.maybe_initialize(config)
  cfg = config_lib.model_config(config)
  mesh = mesh_lib.create_mesh(config.mesh)
  model = loop.EvalModel.from_config(config, cfg, random_params(config, cfg, mesh), 'main', args.tokenizer, mesh)
  benchmark = benchmarks.load_benchmark(args.benchmark, args.data, config)
  rows = benchmarks.prompt_rows(model, benchmark)
  fed = loop.predict(model, rows, batch_size=args.batch_size, max_new_tokens=benchmark.evaluator.max_new_tokens).fed
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, f'fed_{jax.process_index()}.json'), 'w') as f:
    json.dump([benchmark.examples[i].question_id for i in fed], f)
  result = benchmarks.run_benchmark(model, benchmark, batch_size=args.batch_size, rows=rows)
  benchmarks.write_results(args.workdir, [result])


if __name__ == '__main__':
  main()
