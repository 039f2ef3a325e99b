"""Entrypoint: ``python -m prefgrpo_jax.main --config=configs/tiny.py --workdir=/tmp/run``.

Modes: ``train`` (default; re-running with the same --workdir resumes from the
latest checkpoint), ``sample`` (images for prompts from the latest checkpoint,
or the base weights when there is none), ``eval`` (per-dimension scores on
the held-out prompt set) and ``plan`` (compile the run's programs for
``config.plan.devices`` simulated devices and report whether it fits).
"""

import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/tiny.py", "ml_collections config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, TensorBoard and images.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "plan"], "What to run.")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    config = FLAGS.config
    import jax

    from prefgrpo_jax import sharding

    # Before anything touches a JAX backend.
    if FLAGS.mode == "plan":
        # The topology is simulated: N host devices stand in for the accelerators.
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", int(config.plan.devices))
    else:
        sharding.initialize_distributed(config.distributed)
    import prefgrpo_jax.toyworld.noisy_judge  # noqa: F401  (registers the controlled noisy judges)
    import prefgrpo_jax.toyworld.reward  # noqa: F401  (registers the toy verifier rewards)
    from prefgrpo_jax import evaluate, plan, sample, train

    # Our own messages at INFO; the libraries' INFO chatter (orbax writes ~200
    # lines per run) only when asked for with --verbosity=0.
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    std_logging.getLogger("prefgrpo_jax").setLevel(std_logging.INFO)
    if FLAGS.mode == "train":
        train.train(config, FLAGS.workdir)
    elif FLAGS.mode == "sample":
        sample.sample(config, FLAGS.workdir)
    elif FLAGS.mode == "plan":
        plan.plan(config, FLAGS.workdir, command=" ".join(["python -m prefgrpo_jax.main", *sys.argv[1:]]))
    else:
        evaluate.evaluate(config, FLAGS.workdir)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a bad ``--config.<field>`` override reported in one line
    (ml_collections raises it from deep inside flag parsing as a long traceback)."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        reason = " ".join(str(err).replace("\\n", " ").strip("'\"").split()).replace("\\'", "'")
        named = [o for o in overrides if o.rsplit(".", 1)[-1] in reason] or overrides
        sys.stderr.write(f"error: bad config override {' '.join(named) or '(in --config)'}: {reason}\n"
                         "(every field is listed in the README's config table)\n")
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
