"""A fused model under transformers.Trainer as users run it: bf16=True (autocast on CPU) and
gradient checkpointing. Every LoRA call takes the fused path, and the loss curve is stock PEFT's."""
import copy

import pytest
import torch
from lora_helpers import MINILM_TARGETS, lora_model
from transformers import Trainer, TrainingArguments

from slora_kernels import fuse, fusion_stats
from slora_kernels.app.defaults import load_minilm_classifier

STEPS, BATCH = 4, 8
TEXTS = ["a gripping, beautifully shot film", "dull and overlong", "the plot never quite comes together",
         "one of the year's best", "flat", "warm, funny and wise", "an utter mess", "it earns every tear"]


@pytest.fixture(scope="module")
def minilm_and_data():
    model, tokenizer = load_minilm_classifier(seed=0)
    encoded = tokenizer(TEXTS * 4, padding="max_length", max_length=16, truncation=True)
    data = [{"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(i % 2)}
            for i, (ids, mask) in enumerate(zip(encoded["input_ids"], encoded["attention_mask"]))]
    return model, data


def train(model, data, output_dir, **options):
    """Trainer on model for STEPS steps; the logged training losses, one per step."""
    args = TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=BATCH, max_steps=STEPS,
                             learning_rate=2e-3, lr_scheduler_type="constant", logging_steps=1, use_cpu=True,
                             report_to="none", save_strategy="no", disable_tqdm=True, seed=0, **options)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


@pytest.mark.slow
@pytest.mark.parametrize("options", [{"bf16": True}, {"gradient_checkpointing": True},
                                     {"bf16": True, "gradient_checkpointing": True}], ids=str)
def test_trainer_runs_fused_and_follows_stock_peft(minilm_and_data, tmp_path, options):
    base, data = minilm_and_data
    start = lora_model(copy.deepcopy(base), MINILM_TARGETS, seed=4, modules_to_save=["classifier"])
    curves = {}
    for name in ("stock", "fused"):
        model = copy.deepcopy(start)
        if name == "fused":
            fuse(model)
        curves[name] = train(model, data, tmp_path / name, **options)
        if name == "fused":
            stats = fusion_stats(model)
            layers = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A"))
            # With checkpointing the 36 encoder layers run again in the backward; the pooler's once.
            calls_per_step = layers + (layers - 1 if options.get("gradient_checkpointing") else 0)
            assert stats.fallback == {} and stats.fused == STEPS * calls_per_step, str(stats)
    assert len(curves["stock"]) == STEPS and curves["stock"][0] != curves["stock"][-1]
    # bf16 autocast rounds differently in the two (one rounding of the LoRA sum vs PEFT's three): a
    # few bf16 ulps per step, compounding over 4 Adam steps at lr 2e-3; float32 agrees to 1e-5.
    tolerance = 2e-2 if options.get("bf16") else 1e-5
    for fused_loss, stock_loss in zip(curves["fused"], curves["stock"]):
        assert fused_loss == pytest.approx(stock_loss, rel=tolerance), curves
