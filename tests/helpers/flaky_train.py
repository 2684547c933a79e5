"""A torchrun entry point: train_gpt2.main(), except that rank 1 dies once, mid-run.

With FLAKY_MARKER (a file path) and FLAKY_STEP (an int) in the environment, rank 1 calls os._exit(1)
when the train loop asks for step FLAKY_STEP's learning rate (its gradients are already all-reduced,
so rank 0 logs that step before noticing), creating FLAKY_MARKER first so that the attempt torchrun
restarts runs through. Without them this is train_gpt2.py unchanged, except that each rank prints how many
gloo threads it had while training and how many are still alive after main() returns (Linux only): a
gloo thread that outlives main() can abort the rank at interpreter exit (SIGABRT), failing the run.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import train_gpt2  # noqa: E402


def gloo_threads():
    """Names of this process's native threads that belong to gloo; None where /proc cannot tell."""
    if not os.path.isdir("/proc/self/task"):
        return None
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return sorted(n for n in names if "gloo" in n)


def main():
    marker, crash_step = os.environ.get("FLAKY_MARKER"), int(os.environ.get("FLAKY_STEP", "-1"))
    real_get_lr = train_gpt2.get_lr
    during = []  # gloo's threads at the first step

    def get_lr(step, *args):
        if not during:
            during.extend(gloo_threads() or [])
        if step == crash_step and os.environ.get("RANK") == "1" and marker and not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(f"rank 1 died at step {step}\n")
            os._exit(1)
        return real_get_lr(step, *args)

    train_gpt2.get_lr = get_lr
    train_gpt2.main()
    after = gloo_threads()
    if after is not None:  # one os.write: the ranks share a pipe, and python -u writes print's newline apart
        line = f"rank {os.environ.get('RANK')}: {len(during)} gloo threads while training, {len(after)} after main()\n"
        os.write(1, line.encode())


if __name__ == "__main__":
    main()
