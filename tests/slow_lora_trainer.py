"""`python -m tests.slow_lora_trainer SECONDS ARGS...`: builder.lora_trainer's command line with a pause after
every optimizer step, so a test can kill a run between two checkpoints. The pause is the test's own; the
trainer has no hook for it."""

import sys
import time

from transformers import TrainerCallback

from builder import lora_trainer


class _Pause(TrainerCallback):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_step_end(self, *args, **kwargs):
        time.sleep(self.seconds)


def main() -> int:
    seconds, argv = float(sys.argv[1]), sys.argv[2:]
    make_trainer = lora_trainer.make_trainer

    def slowed(*args, **kwargs):
        trainer = make_trainer(*args, **kwargs)
        trainer.add_callback(_Pause(seconds))
        return trainer

    lora_trainer.make_trainer = slowed
    return lora_trainer.main(argv)


if __name__ == "__main__":
    sys.exit(main())
