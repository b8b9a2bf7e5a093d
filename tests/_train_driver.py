"""Runs `convret train` on the test world (tests/_train_world.py) in its own process: for the resume test
(killed with SIGKILL) and the multi-process test (under torchrun).

    python tests/_train_driver.py WORLD_DIR [--examples N] [--negatives N] [--triplets] [--mixture W1,W2] -- [flags]

--negatives: hard negatives per example in the data (default: --num_negatives, i.e. none to sample from).
--mixture W1,W2: two sources (a MixtureDataset), these examples and a second set, with those weights.
--config FILE: the config the flags override (default: the embedded tiny one).

WORLD_DIR holds tok/ (a tokenizer) and model.json (made by the test). CONVRET_TEST_KILL_IN_SAVE=N kills the
process with SIGKILL in the middle of saving checkpoint-N (model files written, not yet renamed).
CONVRET_TEST_ENGINE_REPORT=DIR: at its first training step each rank writes DIR/rank-R.json with the engine in
force (the Trainer's is_fsdp_enabled / is_deepspeed_enabled, accelerate's distributed type, the class of
model_wrapped, and the parameters this rank holds against the model's total). CONVRET_TEST_NO_FSDP_SWITCH=1 leaves
accelerate's state as accelerate sets it (DDP on CPU processes, whatever the FSDP request).

DeepSpeed's CPU accelerator compiles its shared-memory all-reduce op (used only for inference) at start-up, about
two minutes on two cores the first time on a machine: the driver marks it unavailable to keep the tests short."""
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _train_world import WordFormatter, make_examples  # noqa: E402


def main() -> int:
    world = Path(sys.argv[1])
    rest = sys.argv[2:]
    split = rest.index("--") if "--" in rest else len(rest)
    opts, flags = rest[:split], rest[split + 1:]
    num_examples = int(opts[opts.index("--examples") + 1]) if "--examples" in opts else 24
    triplets = "--triplets" in opts
    negatives = int(opts[opts.index("--negatives") + 1]) if "--negatives" in opts else None
    lm_only = [int(i) for i in opts[opts.index("--lm-only") + 1].split(",")] if "--lm-only" in opts else []

    from convret.train import trainer as trainer_module
    from convret.train.arguments import parse_arguments
    from convret.train.main import run
    from convret.train.model import build_model

    try:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except ImportError:
        pass
    if os.environ.get("CONVRET_TEST_NO_FSDP_SWITCH"):  # accelerate's own behaviour on CPU processes: DDP
        trainer_module.enable_fsdp_on_cpu = lambda accelerator, args: False
    report_dir = os.environ.get("CONVRET_TEST_ENGINE_REPORT")
    if report_dir:
        step = trainer_module.ConvretTrainer.training_step

        def reporting_step(self, model, inputs, num_items_in_batch=None):
            if not getattr(self, "_reported", False):
                self._reported = True
                _report(self, model, Path(report_dir))
            return step(self, model, inputs, num_items_in_batch)

        trainer_module.ConvretTrainer.training_step = reporting_step
    kill_step = os.environ.get("CONVRET_TEST_KILL_IN_SAVE")
    if kill_step:
        original = trainer_module.ConvretTrainer._save_rng_state

        def save_then_die(self, output_dir):
            original(self, output_dir)
            if self.state.global_step == int(kill_step):
                os.kill(os.getpid(), signal.SIGKILL)

        trainer_module.ConvretTrainer._save_rng_state = save_then_die

    argv = ["--model_config", str(world / "model.json"), "--tokenizer_name_or_path", str(world / "tok"),
            "--max_session_len", "48", "--max_passage_len", "16", "--max_response_len", "16", *flags]
    config = opts[opts.index("--config") + 1] if "--config" in opts else None
    m, d, l, t = parse_arguments(argv, config)
    built = build_model(m, d, l)
    examples = make_examples(num_examples, negatives=d.num_negatives if negatives is None else negatives,
                             triplets=triplets, lm_only=lm_only)
    if "--mixture" in opts:  # two sources: these examples and a second set, weights W1,W2
        from _train_world import make_mixture

        examples = make_mixture(examples, [float(w) for w in opts[opts.index("--mixture") + 1].split(",")],
                                negatives=d.num_negatives if negatives is None else negatives)
    return run(m, d, l, t, examples=examples, formatter=WordFormatter(built.tokenizer), built=built)


def _report(trainer, model, directory: Path) -> None:
    local = total = 0
    for param in trainer.model.parameters():
        if hasattr(param, "ds_numel"):  # a ZeRO-3 partition
            local, total = local + param.ds_tensor.numel(), total + param.ds_numel
        elif hasattr(param, "to_local"):  # an FSDP2 DTensor shard
            local, total = local + param.to_local().numel(), total + param.numel()
        else:
            local, total = local + param.numel(), total + param.numel()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"rank-{trainer.args.process_index}.json").write_text(json.dumps({
        "is_fsdp_enabled": bool(trainer.is_fsdp_enabled), "is_deepspeed_enabled": bool(trainer.is_deepspeed_enabled),
        "distributed_type": str(trainer.accelerator.distributed_type), "model_wrapped": type(trainer.model_wrapped).__name__,
        "step_model": type(model).__name__, "local_params": local, "total_params": total,
        "world_size": trainer.args.world_size, "local_rank": int(os.environ.get("LOCAL_RANK", -1)),
        "node_rank": int(os.environ.get("GROUP_RANK", -1))}))


if __name__ == "__main__":
    sys.exit(main())
