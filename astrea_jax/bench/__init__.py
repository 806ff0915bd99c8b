"""Benchmark library code; `launch/benchmark.py` (and the `launch/memory_report.py`, `launch/convert_memory.py`,
`launch/data_throughput.py` CLIs) only parse flags and call it. One module per concern:

  timing                timed calls and their medians, the machine and its load, the JSON line each benchmark ends
                        with
  peak                  the peak FLOP/s of one device (MFU's denominator)
  flops                 model FLOPs of the LLM and of each stage's trainable set, MFU, the `flops` report
  llm_step              our jitted LLM train step on one device and the random token batches it is fed
  hf_llama              random Hugging Face Llamas converted with our converter (the models `train` and `generate`
                        time)
  train_step            our LLM step against PyTorch eager and torch.compile
  generation            greedy decoding against `transformers` generate
  data                  the input pipeline's examples/s, alone and against the step
  mfu                   the largest LLM of a config that fits one device, trained for its MFU
  conversion            peak host memory of HF -> Orbax conversion
  memory                per-device memory and FLOPs of a stage's step by ahead-of-time compilation
  deformable_attention  our multi-scale deformable attention against transformers'
  profile               where a compiled step's time goes: a profiler trace summed by model part, pass and op kind
  compare               our LLM step under two llm.* settings, timed interleaved in one process

Each `run` (and `memory.print_report`) prints a table and, as its last line, one JSON object.
"""


class BenchmarkError(RuntimeError):
  """A benchmark cannot run as asked, or the frameworks it compares disagree; the message says what was wrong."""
