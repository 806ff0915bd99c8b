"""Command-line jobs, each run as `python -m launch.<job>`.

A job that runs compiled steps over and over on the CPU backend first runs itself again with glibc malloc settings
that keep XLA's freed buffers for the next step (`astrea_jax.core.host_memory`; `ASTREA_HOST_MALLOC=system` keeps
glibc's defaults). This happens here, before the job imports anything heavy."""

from astrea_jax.core import host_memory

host_memory.maybe_reexec()
