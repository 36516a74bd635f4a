"""The XLA flags the suite compiles with (tests/conftest.py), and those of the child
processes that run real-size work.

Both change the speed of the machine code and of compiling it, and the last bits of some
float results with it (LLVM's passes at -O1 compile some float arithmetic differently from
-O0): the installed-package job of tests/test_fresh_install.py gave rapq 91.1 % at -O1 and
90.2 % at -O0 on its 1000 test images, its first unit's loss 0.004876 and 0.004875. So
every equality a test asserts compares runs made with the same flags, and a figure a
test pins was measured with the flags that test uses.
"""

# The suite: XLA's CPU backend without LLVM's optimisation passes, with its older loop
# emitters instead of the fusion emitters, and generating each program's code in one piece
# on one thread (by default it is split into parts compiled in parallel). Its programs are
# tiny and each is compiled once, so compiling is most of a test's time; its two workers
# keep both cores busy, so parallel code generation only adds work: the tiny job of
# tests/cli.py took 23.2 s of CPU time without splitting, 25.8 s with it (same results).
FAST_COMPILE = {"--xla_backend_optimization_level": "0", "--xla_cpu_use_fusion_emitters": "false",
                "--xla_cpu_parallel_codegen_split_count": "1"}

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
