"""Training under FSDP2 and DeepSpeed ZeRO-3 on CPU processes (gloo), compared with one process.

accelerate 1.16 never shards on CPU: `--use_cpu` turns an FSDP or DeepSpeed config into DDP (MULTI_CPU), and
without it a CPU-only process gets no distributed state at all. So the processes here run without `--use_cpu`,
with `--ddp_backend gloo` (the process group accelerate then opens, or DeepSpeed's on `DS_ACCELERATOR=cpu`), and
for FSDP one patch: the state accelerate built (no distributed type, two processes, an FSDP plugin) is marked
FSDP, the type it gives an FSDP config on GPUs. Every run records the class of the model it trained, so a test
can tell a sharded run from a silent fallback. DeepSpeed starts without its shared-memory op (see
`_without_shared_memory_op`).

`python -m tests.sharded_runs ENGINE ARGS...` is one process's program (ENGINE: fsdp2, zero3 or none);
`compare` trains one configuration both ways and returns the largest differences.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"fsdp2": ROOT / "recipes/accelerate/fsdp.yaml", "zero3": ROOT / "recipes/accelerate/zero3.yaml"}
ENGINE_FILE = "engine.json"
LORA = ("--use_peft", "true", "--lora_r", "4", "--lora_dropout", "0", "--lora_target_modules", "q_proj", "v_proj")
# a trainable head under LoRA: peft's wrap policy shards it as its own FSDP group, the case FSDP2 got wrong
TRAINABLE_HEAD = ("--lora_modules_to_save", "lm_head")


def _shard_on_cpu() -> None:
    """Mark the state FSDP where accelerate left a CPU run with two processes and an FSDP plugin undistributed."""
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.NO and self.num_processes > 1:
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = patched


def _without_shared_memory_op() -> None:
    """Start DeepSpeed's CPU backend without its shared-memory all-reduce op.

    On CPU, DeepSpeed's communication backend JIT-compiles that op when it starts (about 2 min on 2 cores, the first
    time on a machine). The op serves only `inference_all_reduce` (tensor-parallel inference); ZeRO-3 training
    communicates through torch.distributed (gloo here) either way, so its steps are the same without it.
    """
    backend = importlib.import_module("deepspeed.comm.torch")  # the attribute of that name is torch itself

    if not callable(getattr(backend, "build_shm_op", None)):
        raise RuntimeError("deepspeed.comm.torch.build_shm_op is gone: check how this DeepSpeed builds its CPU ops")
    backend.build_shm_op = lambda: None


def _record_engine(output_dir: str) -> None:
    """Write (rank 0) the class of the model each training step gets, which of its modules FSDP sharded, and the
    modules sharded in one group with the LM head (accelerate groups it with the final norm; peft's policy, alone)."""
    from poft.trainer import PoFTTrainer

    compute_loss = PoFTTrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):
        if self.accelerator.is_main_process and not os.path.exists(os.path.join(output_dir, ENGINE_FILE)):
            from torch.distributed.fsdp import FSDPModule

            stage = getattr(model, "zero_optimization_stage", None)
            names = {m: name for name, m in model.named_modules()}
            head = next((m for m, name in names.items() if name.endswith("lm_head")), None)
            group = head._get_fsdp_state()._fsdp_param_group if isinstance(head, FSDPModule) else None
            engine = {
                "wrapper": f"{type(model).__module__}.{type(model).__qualname__}",
                "fsdp_modules": [name for m, name in names.items() if isinstance(m, FSDPModule)],
                "head_group": [] if group is None else [names[m] for m in group.modules],
                "zero_stage": stage() if callable(stage) else None,
                "distributed_type": str(self.accelerator.distributed_type),
                "num_processes": self.accelerator.num_processes,
            }
            os.makedirs(output_dir, exist_ok=True)
            Path(output_dir, ENGINE_FILE).write_text(json.dumps(engine))
        return compute_loss(self, model, inputs, *args, **kwargs)

    PoFTTrainer.compute_loss = recording


@dataclass
class Comparison:
    """The largest absolute differences between the sharded run and one process, over every logged step."""

    engine: dict
    loss: float
    metrics: float  # poft/*, entropy, mean_token_accuracy
    parameters: float
    moved: float  # the smallest largest change of a saved tensor from its start: proof that training moved it
    steps: int


def train_args(model: str, data: str, objective: str, lora: bool, steps: int, output_dir: Path) -> list[str]:
    """`poft train` for `steps` SGD steps in float32, logging every step; LoRA with a trainable head."""
    return [
        "train",
        *("--model_name_or_path", model, "--dataset_name", data, "--objective", objective),
        *("--max_steps", str(steps), "--optim", "sgd", "--learning_rate", "1.0", "--logging_steps", "1"),
        *("--max_length", "256", "--activation_checkpointing", "false", "--report_to", "none"),
        *("--save_strategy", "no", "--seed", "0", "--output_dir", str(output_dir)),
        *((*LORA, *TRAINABLE_HEAD) if lora else ()),
    ]


def compare(engine: str, model: str, data: str, objective: str, lora: bool, root: Path, steps: int = 3) -> Comparison:
    """Train under `engine` on two processes (batch 2 each) and on one (batch 4, in this process); the same steps."""
    from poft.cli import main as cli
    from tests import processes
    from tests.conftest import two_cpu_processes

    sharded, single = root / f"{engine}-{objective}-{lora}", root / f"one-{objective}-{lora}"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    args = train_args(model, data, objective, lora, steps, sharded)
    program = ("-m", "tests.sharded_runs", engine, *args, "--ddp_backend", "gloo", "--per_device_train_batch_size")
    run = processes.run(
        two_cpu_processes(*program, "2", config_file=str(CONFIGS[engine])),
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    if run.returncode != 0:
        raise RuntimeError(f"{engine} run failed:\n{run.stderr[-4000:]}")
    if not single.exists():
        args = train_args(model, data, objective, lora, steps, single)
        if cli([*args, "--use_cpu", "true", "--per_device_train_batch_size", "4"]) != 0:
            raise RuntimeError("the one-process run failed")
    return _differences(sharded, single, model, lora)


def _differences(sharded: Path, single: Path, model: str, lora: bool) -> Comparison:
    from safetensors.torch import load_file

    logs = [[h for h in _log_history(d) if "loss" in h and "train_loss" not in h] for d in (sharded, single)]
    if len(logs[0]) != len(logs[1]):
        raise AssertionError(f"{len(logs[0])} logged steps against {len(logs[1])}")
    keys = {k for step in logs[1] for k in step if k.startswith("poft/") or k in ("entropy", "mean_token_accuracy")}
    pairs = list(zip(*logs, strict=True))
    loss = max(abs(a["loss"] - b["loss"]) for a, b in pairs)
    metrics = max(abs(a[k] - b[k]) for a, b in pairs for k in keys)
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    trained, reference = load_file(str(sharded / weights)), load_file(str(single / weights))
    if trained.keys() != reference.keys():
        raise AssertionError(f"saved tensors differ: {sorted(trained.keys() ^ reference.keys())}")
    parameters = max((trained[k] - reference[k]).abs().max().item() for k in reference)
    start = load_file(os.path.join(model, "model.safetensors"))
    moved = min((reference[k] - start[_base_name(k)]).abs().max().item() for k in reference if _base_name(k) in start)
    engine = json.loads((sharded / ENGINE_FILE).read_text())
    return Comparison(engine, loss, metrics, parameters, moved, len(pairs))


def _base_name(saved: str) -> str:
    """The base model's name of a saved tensor (peft saves the trainable head as base_model.model.lm_head...)."""
    return saved.removeprefix("base_model.model.")


def _log_history(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def main(argv: list[str]) -> int:
    engine, *args = argv
    if engine == "fsdp2":
        _shard_on_cpu()
    if engine == "zero3":
        _without_shared_memory_op()
    _record_engine(args[args.index("--output_dir") + 1])
    from poft.cli import main as cli

    return cli(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
