r"""Time to accuracy: the pipeline at a ladder of iteration budgets, top-1 and wall time
per budget, so "the time needed to reach X % top-1" is read off one table and plot.

  python -m experiments.time_to_accuracy \
      --run="--config cifar10_resnet20 --methods rapq --bits 4/4,2/4" \
      --budgets=250/62,500/125,1000/250,2000/500 --out=results/time_to_accuracy_resnet20.json

Each budget ``W/A`` is one ``experiments.run`` of the ``--run`` arguments with
``--config.weight_iters=W --config.act_iters=A`` in its own directory under
``--workdir``, one after the other, so every timing is taken alone (time it on a quiet
machine and say so). Starting the same command again resumes: finished budgets and units
are loaded, not recomputed (their timings are those of the run that computed them).
Writes the JSON record (``rows``: one per budget, method and bit width; ``peer``: the
official code's runs given by ``--peer``, JSON records of ``../shared/peer/run_peer.py``
timed on the same machine) and a plot of top-1 against wall time beside it (``.png``);
``experiments.results_doc`` renders both, with the fraction of the official run's time
in which ours first reaches its top-1.
"""
import pathlib
import shlex
import sys

from absl import app
from absl import flags

from experiments import ladder

_RUN = flags.DEFINE_string("run", "--config cifar10_resnet20 --methods rapq --bits 4/4,2/4",
                           "Arguments of experiments.run, without --workdir and iterations.")
_BUDGETS = flags.DEFINE_string("budgets", "250/62,500/125,1000/250,2000/500",
                               "Comma-separated weight/activation iterations per unit.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/time_to_accuracy",
                               "Directory of the per-budget runs (resumed when it exists).")
_PEER = flags.DEFINE_list("peer", [], "JSON records of the official code's runs on this "
                          "machine (../shared/peer/run_peer.py --out), shown beside ours.")
_OUT = flags.DEFINE_string("out", "results/time_to_accuracy.json", "Output JSON; the plot "
                           "goes beside it with the suffix .png.")


def main(argv):
  del argv
  try:
    budgets = ladder.parse_budgets(_BUDGETS.value)
    args = shlex.split(_RUN.value)
    out = pathlib.Path(_OUT.value)
    if out.suffix != ".json":
      raise ladder.LadderError(f"--out: {_OUT.value!r} is not a .json path")
    ladder.run_ladder(args, budgets, pathlib.Path(_WORKDIR.value), out,
                      peers=[pathlib.Path(p) for p in _PEER.value])
  except ladder.LadderError as e:
    sys.exit(f"experiments.time_to_accuracy: error: {e}")
  print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
  app.run(main)
