"""Timing of benchmark calls and the machine they run on.

Every call is timed with `time.perf_counter` around a result synced to the host (`jax.block_until_ready`,
`.item()`); the first `WARMUP_STEPS` calls (compilation) are excluded and medians are reported. A shared machine times
badly, so the timed benchmarks first sample how much of the host's CPU other processes use (`machine`) and warn above
`BUSY_LOAD`, and record the load average (`os.getloadavg`) when they start and when they end; the fastest call is
reported beside the median (on a busy machine it is the least disturbed). Every benchmark ends by printing one JSON
object (`emit`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import time
from typing import Any, Callable, Sequence

import jax

from astrea_jax.core import host_memory

WARMUP_STEPS = 2
BUSY_LOAD = 0.2  # other processes' CPU share above which timings are flagged as taken on a busy machine


@dataclasses.dataclass(frozen=True)
class Run:
  """Wall seconds and host results of timed calls, and the process's minor page faults and kernel CPU seconds during
  each (from getrusage: the calls run one at a time, so each call's counts are its own)."""
  seconds: list[float]
  values: list[Any]
  page_faults: list[int] = dataclasses.field(default_factory=list)
  kernel_s: list[float] = dataclasses.field(default_factory=list)

  @property
  def median_s(self) -> float:
    return statistics.median(self.seconds)

  @property
  def best_s(self) -> float:
    """The fastest call: on a shared machine, the one least slowed by other processes."""
    return min(self.seconds)

  @property
  def median_page_faults(self) -> float:
    return statistics.median(self.page_faults)

  @property
  def median_kernel_s(self) -> float:
    """Kernel CPU seconds (all threads) per call: page faults, memory mapping, thread wake-ups."""
    return statistics.median(self.kernel_s)


def time_calls(fns: dict[str, Callable[[int], Any]], steps: Sequence[int]) -> dict[str, Run]:
  """Calls every fn on each step index in turn, interleaved (every fn on step i before any on step i + 1) so that a
  change in the machine's load falls on all of them alike, timing each call. fn must return a result on the host
  (synced), so that the time covers its work."""
  runs = {name: Run([], []) for name in fns}
  for i in steps:
    for name, fn in fns.items():
      usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
      value = fn(i)
      runs[name].seconds.append(time.perf_counter() - start)
      after = resource.getrusage(resource.RUSAGE_SELF)
      runs[name].values.append(value)
      runs[name].page_faults.append(after.ru_minflt - usage.ru_minflt)
      runs[name].kernel_s.append(after.ru_stime - usage.ru_stime)
  return runs


def time_steps(fn: Callable[[int], Any], steps: int, warmup: int = WARMUP_STEPS) -> Run:
  """fn on `warmup` warm-up steps, then the Run of `steps` timed ones."""
  time_calls({'fn': fn}, range(warmup))
  return time_calls({'fn': fn}, range(warmup, warmup + steps))['fn']


def median_seconds(fn: Callable[[], Any], warmup: int, repeats: int) -> float:
  """The median seconds of `repeats` calls of fn after `warmup` untimed ones."""
  return time_steps(lambda _: fn(), repeats, warmup).median_s


def other_cpu_load(seconds: float = 1.0) -> float | None:
  """Fraction of the host's CPU time spent busy over `seconds` while this process sleeps (from /proc/stat; None
  where there is none): what other processes take from a benchmark about to start."""
  if not os.path.exists('/proc/stat'):
    return None

  def sample() -> tuple[int, int]:
    with open('/proc/stat') as f:
      ticks = [int(v) for v in f.readline().split()[1:]]
    return sum(ticks), ticks[3] + ticks[4]  # all, idle + iowait

  total, idle = sample()
  time.sleep(seconds)
  total_after, idle_after = sample()
  return round(1 - (idle_after - idle) / max(total_after - total, 1), 3)


def load_average() -> list[float] | None:
  """The host's 1, 5 and 15 minute load averages (None where the OS has none)."""
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return None


def machine() -> dict[str, Any]:
  """The device, this host's CPU count and model (from /proc/cpuinfo where there is one), the share of its CPU that
  other processes use just before the benchmark starts and the load average then (a shared machine times badly), and
  the malloc settings (`core.host_memory.setting`)."""
  cpu = 'unknown'
  if os.path.exists('/proc/cpuinfo'):
    with open('/proc/cpuinfo') as f:
      cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
  device = jax.devices()[0]
  return {'device': device.device_kind, 'platform': device.platform, 'cpus': os.cpu_count(), 'cpu_model': cpu,
          'other_cpu_load': other_cpu_load(), 'loadavg_start': load_average(),
          'host_malloc': host_memory.setting(os.environ)}


def warn_if_busy(info: dict[str, Any]) -> None:
  if (info['other_cpu_load'] or 0.0) > BUSY_LOAD:
    print(f'warning: other processes used {100 * info["other_cpu_load"]:.0f}% of the {info["cpus"]} CPUs just before '
          'the benchmark started; its timings are not representative')


def emit(result: dict[str, Any]) -> None:
  """The benchmark's last line: its result as one JSON object, with the load average at its end."""
  print(json.dumps({**result, 'loadavg_end': load_average()}))
