"""The XLA flags the suite compiles with (tests/conftest.py), and their removal for a
test that runs a real-size job as users run it."""

# XLA's CPU backend without LLVM's optimisation passes, and with its older loop emitters
# instead of the fusion emitters: both change the speed of the machine code and of
# compiling it, not what it computes.
FAST_COMPILE = {"--xla_backend_optimization_level": "0", "--xla_cpu_use_fusion_emitters": "false"}


def with_fast_compile(flags: str) -> str:
  """``flags`` (an ``XLA_FLAGS`` value) with every ``FAST_COMPILE`` flag it does not set."""
  given = {f.split("=")[0] for f in flags.split()}
  return " ".join([flags] * bool(flags) + [f"{k}={v}" for k, v in FAST_COMPILE.items()
                                           if k not in given])


def without_fast_compile(flags: str) -> str:
  """``flags`` without the ``FAST_COMPILE`` flags: XLA's defaults, as users run."""
  return " ".join(f for f in flags.split() if f.split("=")[0] not in FAST_COMPILE)
