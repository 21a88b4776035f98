"""FSDP2 distillation (amad.distributed): fsdp_config, block choice, and 2 CPU processes against 1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.utils import DistributedType
from torch.distributed.fsdp import CPUOffloadPolicy
from transformers import BertForSequenceClassification, TrainingArguments

import model_factories as mf
from amad import DistillationTrainer, Distiller
from amad.distributed import _blocks, fsdp_options, shard_for_fsdp
from fsdp_worker import ALPHA
from trainer_worker import assert_matches_single_process, ddp_trainer, run_workers, teacher_and_student

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "distributed"


def fsdp_config(tmp_path: Path, **config) -> dict:
    """``fsdp_config`` as TrainingArguments normalises it."""
    args = TrainingArguments(output_dir=str(tmp_path), fsdp=True, fsdp_config=config, use_cpu=True, report_to=[])
    return args.fsdp_config


def test_fsdp_config_is_translated(tmp_path: Path) -> None:
    config = fsdp_config(
        tmp_path, version=2, transformer_layer_cls_to_wrap="BertLayer", reshard_after_forward="false", cpu_offload=True
    )
    options = fsdp_options(config)
    assert options.keys() == {"layer_classes", "reshard_after_forward", "offload_policy"}
    assert options["layer_classes"] == ["BertLayer"]
    assert options["reshard_after_forward"] is False
    assert isinstance(options["offload_policy"], CPUOffloadPolicy)
    assert fsdp_options(fsdp_config(tmp_path)) == {}  # version 2 is the default


def test_committed_launch_configs_parse(tmp_path: Path) -> None:
    """examples/distributed: the fsdp_config file is honoured as written; the accelerate config has no FSDP section."""
    args = TrainingArguments(
        output_dir=str(tmp_path), fsdp=True, fsdp_config=str(CONFIGS / "fsdp2.json"), use_cpu=True, report_to=[]
    )
    assert fsdp_options(args.fsdp_config) == {"layer_classes": ["BertLayer"], "reshard_after_forward": True}
    cluster = ClusterConfig.from_yaml_file(str(CONFIGS / "accelerate_multi_gpu.yaml"))
    assert cluster.distributed_type == DistributedType.MULTI_GPU and not cluster.fsdp_config


@pytest.mark.parametrize(
    "config, message",
    [
        ({"version": 1}, "FSDP2 only"),
        ({"forward_prefetch": True}, "'forward_prefetch'"),
        ({"state_dict_type": "SHARDED_STATE_DICT"}, "'state_dict_type'"),
        ({"activation_checkpointing": True}, "'activation_checkpointing'"),
    ],
)
def test_fsdp_config_it_cannot_honour_is_refused(tmp_path: Path, config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fsdp_options(fsdp_config(tmp_path, **config))


def test_sharding_needs_a_distributed_launch(tmp_path: Path) -> None:
    teacher, student = teacher_and_student()
    with pytest.raises(RuntimeError, match="torchrun"):
        shard_for_fsdp(Distiller(teacher, student))
    args = TrainingArguments(output_dir=str(tmp_path), fsdp=True, use_cpu=True, report_to=[])
    with pytest.raises(RuntimeError, match="torchrun"):
        DistillationTrainer(model=Distiller(teacher, student), args=args)


def test_blocks_are_the_no_split_modules_except_tied_ones() -> None:
    blip, _ = mf.teacher_and_student("blip")
    blocks = _blocks(blip, None, "Teacher")
    assert {type(b).__name__ for b in blocks} == {"BlipEncoderLayer"}  # BlipTextEmbeddings' words feed the decoder
    assert len(blocks) == len(blip.vision_model.encoder.layers)
    bert, _ = mf.teacher_and_student("bert")
    assert len(_blocks(bert, ["BertLayer"], "Teacher")) == bert.config.num_hidden_layers
    with pytest.raises(ValueError, match=r"\['LlamaDecoderLayer'\].*BertForSequenceClassification"):
        _blocks(bert, ["LlamaDecoderLayer"], "Teacher")


@pytest.mark.slow
def test_two_process_fsdp_run_matches_one_process(tmp_path: Path) -> None:
    """torchrun, gloo: both models sharded over 2 CPU processes x 2 samples == 1 process x 4 samples."""
    run_workers("fsdp_worker.py", tmp_path / "fsdp")
    result = torch.load(tmp_path / "fsdp" / "result.pt", weights_only=False)
    assert result["world_size"] == 2
    assert result["wrapped"] == "FSDPDistiller"  # sharded, not wrapped in DDP
    assert result["teacher_is_sharded"] == "FSDPBertForSequenceClassification"
    # each rank holds half of each model (FSDP2 splits every parameter on dim 0)
    for model in ("teacher", "student"):
        local = [counts[model][0] for counts in result["counts"]]
        total = result["counts"][0][model][1]
        assert sum(local) == total, model
        assert all(abs(n - total / 2) <= 0.01 * total for n in local), (model, local, total)
    assert result["teacher_changed"] == []

    single = ddp_trainer(str(tmp_path / "single"), per_device_batch=4, alpha=ALPHA)
    single.train()
    assert_matches_single_process(result, single)
    # rank 0 saved the gathered Student as a plain model
    reloaded = BertForSequenceClassification.from_pretrained(str(tmp_path / "fsdp" / "student"))
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, result["student"][key], rtol=0, atol=0)

    # Hook-recorded attention (ViLT) on sharded attention modules: same losses and Student gradients as unsharded.
    hooks = result["hooks"]
    assert hooks["attention_class"] == "FSDPViltSelfAttention"
    reference, sharded = hooks["reference"], hooks["sharded"]
    assert reference["losses"].keys() == sharded["losses"].keys() and len(reference["losses"]) == 2
    assert all(float(v) > 1e-3 for v in reference["losses"].values())
    for key, value in reference["losses"].items():
        torch.testing.assert_close(sharded["losses"][key], value, rtol=1e-6, atol=0)
    assert reference["grads"].keys() == sharded["grads"].keys()
    for key, value in reference["grads"].items():
        torch.testing.assert_close(sharded["grads"][key], value, rtol=0, atol=1e-6, msg=f"{key} gradient differs")
