"""The XLA flags the suite compiles with (tests/conftest.py), and those of the child
processes that run real-size work.

Both change the speed of the machine code and of compiling it, not what it computes:
XLA's graph passes still run and floating point stays IEEE (no fast math).
"""

# The suite: XLA's CPU backend without LLVM's optimisation passes, and with its older
# loop emitters instead of the fusion emitters. Its programs are tiny and each is compiled
# once, so compiling is most of a test's time.
FAST_COMPILE = {"--xla_backend_optimization_level": "0", "--xla_cpu_use_fusion_emitters": "false"}

# A child that runs hundreds of steps or predicts thousands of images (ResNet-20's integer
# path, the shipped-data job): LLVM at -O1 compiles faster than XLA's default level and
# its code runs far faster than at -O0 (the shipped-data job of test_fresh_install: 40 s
# against 59 s at -O0; the ResNet-20 integer test's body: 61 s against 78 s at the default).
LONG_RUN = {"--xla_backend_optimization_level": "1", "--xla_cpu_use_fusion_emitters": "false"}


def _without(flags: str, names) -> list[str]:
  return [f for f in flags.split() if f.split("=")[0] not in names]


def with_fast_compile(flags: str) -> str:
  """``flags`` (an ``XLA_FLAGS`` value) with every ``FAST_COMPILE`` flag it does not set."""
  given = {f.split("=")[0] for f in flags.split()}
  return " ".join(flags.split() + [f"{k}={v}" for k, v in FAST_COMPILE.items() if k not in given])


def for_long_run(flags: str) -> str:
  """``flags`` with the suite's ``FAST_COMPILE`` flags replaced by ``LONG_RUN``."""
  return " ".join(_without(flags, {*FAST_COMPILE, *LONG_RUN})
                  + [f"{k}={v}" for k, v in LONG_RUN.items()])
