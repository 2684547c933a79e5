"""config.py: the --time_budget arithmetic (the trainer's use of it is in test_train.py)."""
import pytest

from config import BUDGET_PROBE, TrainConfig, budget_steps


def test_budget_steps_fits_the_steps_and_evals_left_in_the_budget():
    cfg = TrainConfig(time_budget=100, eval_interval=10, val_steps=6, max_steps=10_000)
    # at step 5, 10 s in, 1 s a step, a val batch 1/3 s: an eval is 6 batches = 2 s, 0.2 s a step amortized,
    # and one more at the end: (0.97 * 100 - 10 - 2) / 1.2 = 70.8 -> 70 more steps after step 5
    assert budget_steps(cfg, 5, 10.0, 1.0, 1 / 3) == 5 + 1 + 70
    # evals as measured, not as the step suggests: the full head at eval, a val batch 2x the (--head_vocab)
    # training step: an eval is 12 s, 1.2 s a step amortized: (97 - 10 - 12) / 2.2 = 34.1
    assert budget_steps(cfg, 5, 10.0, 1.0, 2.0) == 5 + 1 + 34
    # a faster machine gets more steps, in proportion
    assert budget_steps(cfg, 5, 10.0, 0.5, 1 / 6) == 5 + 1 + int((97 - 10 - 1) / 0.6)


def test_budget_steps_never_passes_max_steps_and_never_goes_back():
    cfg = TrainConfig(time_budget=100, eval_interval=10, val_steps=6, max_steps=50)
    assert budget_steps(cfg, 5, 10.0, 0.01, 0.01) == 50  # --max_steps is the cap
    assert budget_steps(cfg, 5, 200.0, 1.0, 1 / 3) == 6  # the budget is spent: stop after this step
    assert BUDGET_PROBE >= 2  # at least one timed step after step 0, which compiles


def test_fsdp_with_float16_is_refused_naming_both_flags(monkeypatch):
    """FSDP's gradients are shards and GradScaler's inf check is per rank: the ranks could disagree on
    skipping a step. Refused for --dtype float16, and for auto on a (stubbed) GPU without bf16."""
    import runtime
    from cli import ConfigError
    from config import parse_args, validate
    with pytest.raises(ConfigError, match="--parallel fsdp with float16"):
        validate(parse_args(["--parallel", "fsdp", "--dtype", "float16", "--device", "cpu"])[0], world_size=2)
    validate(parse_args(["--parallel", "fsdp", "--dtype", "bfloat16", "--device", "cpu"])[0], world_size=2)
    validate(parse_args(["--parallel", "ddp", "--dtype", "float16", "--device", "cpu"])[0], world_size=2)
    monkeypatch.setattr("config.resolve_device", lambda device: "cuda:0")
    monkeypatch.setattr(runtime.torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)  # a T4
    with pytest.raises(ConfigError, match="--parallel fsdp with float16"):
        validate(parse_args(["--parallel", "fsdp", "--compile", "false"])[0], world_size=2)


def test_head_vocab_values_and_what_it_cannot_go_with():
    """--head_vocab train ties the rows of the ids outside the train shards: a pretrained model's would be
    erased, and FSDP shards those rows; a typo, or the frequency cut N this version no longer has, is named."""
    from cli import ConfigError
    from config import parse_args, validate
    assert parse_args(["--preset", "shakespeare"])[0].head_vocab == "train" and parse_args([])[0].head_vocab == "full"
    for argv, msg in ((["--head_vocab", "trian"], "--head_vocab: expected full or train, got 'trian'"),
                      (["--head_vocab", "8191"], "--head_vocab: expected full or train, got '8191'"),
                      (["--head_vocab", "train", "--init_from", "gpt2"], "would erase gpt2's"),
                      (["--preset", "finetune", "--head_vocab", "train"], "--head_vocab train ties the rows of the ids "
                       "the train shards lack into one, which would erase gpt2's: use it with --init_from scratch"),
                      (["--head_vocab", "train", "--parallel", "fsdp"],
                       "--head_vocab train: works with --parallel ddp")):
        with pytest.raises(ConfigError, match=msg):
            validate(parse_args(argv + ["--device", "cpu"])[0], world_size=2)
    validate(parse_args(["--preset", "shakespeare", "--device", "cpu"])[0], world_size=1)


def test_abbreviated_flags_are_refused_naming_the_full_flag():
    """argparse would take --max_step 5 as --max_steps 5: a prefix is an unknown flag, and the error names the
    flag (or flags) it begins; the full flag works as --max_steps 5 and --max_steps=5."""
    from cli import ConfigError
    from config import parse_args
    assert parse_args(["--max_steps", "5"])[0].max_steps == parse_args(["--max_steps=5"])[0].max_steps == 5
    for argv, msg in ((["--max_step", "5"], "unrecognized arguments: --max_step 5 (did you mean --max_steps?)"),
                      (["--max_step=5"], "unrecognized arguments: --max_step=5 (did you mean --max_steps?)"),
                      (["--n_", "3"], "unrecognized arguments: --n_ 3 (did you mean one of --n_embd, --n_head, "
                                      "--n_layer?)"),
                      (["--max_step", "5", "--n_lay", "2", "--bogus"], "unrecognized arguments: --max_step 5 --n_lay "
                       "2 --bogus (--max_step: did you mean --max_steps?; --n_lay: did you mean --n_layer?)"),
                      (["--bogus", "1"], "unrecognized arguments: --bogus 1")):
        with pytest.raises(ConfigError) as e:
            parse_args(argv)
        assert str(e.value) == msg
