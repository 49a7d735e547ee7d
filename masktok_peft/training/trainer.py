"""MaskTokTrainer: TRL's SFT trainer with the masktok self-distillation loss.

Everything but the loss is TRL's and transformers': dataset formats and tokenization, completion-
only labels, mixed precision, gradient checkpointing, checkpoints and resumption, accelerate
multi-process runs and the progress bar. The trainer overrides `compute_loss` (one distillation
step per batch, the teacher being the same model with the adapter disabled), `prediction_step`
(loss only) and `log` (the distillation metrics), and prepares on-policy text before TRL
tokenizes the dataset.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from peft import PeftConfig
from transformers import AutoTokenizer, PreTrainedModel
from trl import SFTTrainer
from trl.trainer.utils import create_model_from_path

from ..config import MaskTokConfig
from ..data import apply_chat_template_choice
from ..errors import MaskTokError
from . import objective as objective_module
from .callbacks import TimeBudgetCallback
from .config import MaskTokTrainingConfig
from .on_policy import OnPolicySettings, build_on_policy_dataset

logger = logging.getLogger(__name__)

# Streams of the per-step random draws (block size k and layout offsets); any two distinct constants do.
TRAIN_STREAM = 0
EVAL_STREAM = 1


def _adapter_config_of(model) -> PeftConfig | None:
    if not is_peft_model(model):
        return None
    return model.peft_config[model.active_adapter]


def _move_to_training_device(model, args: MaskTokTrainingConfig) -> None:
    """Move a model that sits whole on the CPU to the training device, so on-policy text is generated there.

    Trainer would move it there later anyway. Models placed with a device map, quantized models and
    FSDP or DeepSpeed runs are left where they are, because Trainer does not move those either.
    """
    if getattr(model, "hf_device_map", None) or getattr(model, "is_quantized", False) or args.fsdp or args.deepspeed:
        return
    if args.device.type == "cpu" or any(parameter.device.type != "cpu" for parameter in model.parameters()):
        return
    logger.info("Moving the model to %s to generate the on-policy text there.", args.device)
    model.to(args.device)


class MaskTokTrainer(SFTTrainer):
    """Train a masktok adapter (LoRA weights plus the mask row) by online self-distillation.

    Args:
        model: a Hub id or folder, a `transformers` causal LM, or a `PeftModel` that already contains a
            masktok adapter.
        args: a `MaskTokTrainingConfig`; the trainer works on a copy and never changes it.
        train_dataset, eval_dataset: datasets in any TRL SFT format: `text`, prompt/completion, or
            conversational `messages` or prompt/completion message lists.
        processing_class: the tokenizer; loaded from `model` when None.
        peft_config: a `MaskTokConfig` for a model without an adapter. None uses `MaskTokConfig()`.
            It is copied, because creating the adapter records the mask id and embedding shape.

    Each training step draws k uniformly from [min_k, max_k] from a generator seeded by
    (`args.seed`, global step, micro-batch index), so a resumed run draws the same k sequence.
    Evaluation always uses k = max_k, so every mask offset is reported.
    """

    _tag_names = ["trl", "sft", "masktok"]
    _name = "MaskTok"
    # compute_loss returns a per-batch mean, so Trainer divides it by the gradient accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: str | PreTrainedModel,
        args: MaskTokTrainingConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset] | None = None,
        processing_class=None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        optimizer_cls_and_kwargs: tuple | None = None,
        peft_config: MaskTokConfig | None = None,
        formatting_func: Callable[[dict], str] | None = None,
    ) -> None:
        # The time budget (args.max_time_minutes) counts from here, so on-policy generation is part of it.
        created_at = time.monotonic()
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = MaskTokTrainingConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-masktok")
        elif not isinstance(args, MaskTokTrainingConfig):
            raise TypeError(
                f"args must be a MaskTokTrainingConfig, got {type(args).__name__}. Build one with the same options: "
                "MaskTokTrainingConfig(**sft_config.to_dict()) keeps every SFT setting."
            )
        else:
            # SFTTrainer and Trainer write to their args (dispatch_batches, gradient checkpointing kwargs).
            args = copy.deepcopy(args)
        if formatting_func is not None and (args.use_chat_template is not None or args.on_policy):
            raise MaskTokError(
                "formatting_func cannot be combined with use_chat_template or on_policy, which both need the "
                "dataset's prompt and completion columns. Format the dataset before passing it instead."
            )

        if not isinstance(model, str) and is_peft_model(model):
            if peft_config is not None:
                raise MaskTokError(
                    "The model already has a PEFT adapter, so peft_config must be None. Pass the base model with "
                    "peft_config, or the PeftModel alone."
                )
            adapter_config = _adapter_config_of(model)
        else:
            adapter_config = copy.deepcopy(peft_config) if peft_config is not None else MaskTokConfig()
            peft_config = adapter_config
        if not isinstance(adapter_config, MaskTokConfig):
            raise MaskTokError(
                f"MaskTokTrainer trains masktok adapters, but the adapter config is {type(adapter_config).__name__}. "
                "Pass a MaskTokConfig as peft_config."
            )
        self.max_k, self.threshold = args.resolve_block_settings(adapter_config)

        if args.on_policy:
            if isinstance(model, str):
                model_init_kwargs = dict(args.model_init_kwargs or {})
                model_init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
                model = create_model_from_path(model, **model_init_kwargs)
            if processing_class is None:
                processing_class = AutoTokenizer.from_pretrained(model.config._name_or_path)
            train_dataset = self._build_on_policy_text(model, processing_class, train_dataset, args)

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            peft_config=peft_config,
            formatting_func=formatting_func,
        )
        if args.max_time_minutes is not None:
            self.add_callback(TimeBudgetCallback(args.max_time_minutes * 60, started_at=created_at))
        self._step_for_k = -1
        self._micro_step = 0
        self._eval_batch = 0
        self._total_supervised_positions = 0

    @staticmethod
    def _build_on_policy_text(model, tokenizer, train_dataset, args: MaskTokTrainingConfig) -> Dataset:
        if train_dataset is None:
            raise ValueError("train_dataset is required.")
        train_dataset = apply_chat_template_choice(train_dataset, args.use_chat_template, args.dataset_text_field)
        settings = OnPolicySettings(
            max_new_tokens=args.on_policy_max_new_tokens,
            do_sample=args.on_policy_do_sample,
            temperature=args.on_policy_temperature,
            top_p=args.on_policy_top_p,
            batch_size=args.on_policy_batch_size,
            seed=args.seed,
        )
        _move_to_training_device(model, args)
        state = PartialState()
        # The main process generates and writes the cache first; the other processes then read it.
        with state.main_process_first():
            return build_on_policy_dataset(
                model,
                tokenizer,
                train_dataset,
                settings,
                cache_dir=args.on_policy_cache_dir,
                show_progress=state.is_main_process and not args.disable_tqdm,
            )

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        if formatting_func is None:
            dataset = apply_chat_template_choice(dataset, args.use_chat_template, args.dataset_text_field)
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

    def _next_block_draw(self, training: bool) -> tuple[int, torch.Generator]:
        """Return this batch's block size k and a seeded generator for the layout's random offsets.

        Training draws k from (seed, global step, micro-batch index), the same on every process,
        so resuming at a checkpoint replays the same k sequence. The layout generator also mixes
        in the process index, so data-parallel processes place their blocks differently.
        """
        if training:
            step = self.state.global_step
            if step != self._step_for_k:
                self._step_for_k, self._micro_step = step, 0
            entropy = [self.args.seed, TRAIN_STREAM, step, self._micro_step]
            self._micro_step += 1
            draw = np.random.default_rng(np.random.SeedSequence(entropy))
            k = int(draw.integers(self.args.min_k, self.max_k + 1))
        else:
            entropy = [self.args.seed, EVAL_STREAM, self._eval_batch]
            self._eval_batch += 1
            k = self.max_k
        layout_seed = np.random.SeedSequence(entropy + [self.accelerator.process_index]).generate_state(1)[0]
        generator = torch.Generator(device="cpu").manual_seed(int(layout_seed))
        return k, generator

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = self.model.training
        input_ids = inputs["input_ids"]
        attention_mask = inputs.get("attention_mask")
        if attention_mask is None:
            raise MaskTokError(
                "The batch has no attention_mask. MaskTokTrainer needs right-padded rows; keep padding_free=False "
                "and use a collator that returns attention_mask."
            )
        labels = inputs.get("labels")
        # TRL's labels are -100 for tokens left out of the loss: prompt tokens under completion-only or
        # assistant-only training, and padding.
        supervised_mask = attention_mask.bool() if labels is None else (labels != -100) & attention_mask.bool()

        k, generator = self._next_block_draw(training)
        output = objective_module.distillation_step(
            model,
            input_ids,
            attention_mask,
            supervised_mask,
            k,
            objective=self.args.objective,
            layout=self.args.layout,
            region_size=self.args.region_size,
            blocks_per_sequence=self.args.blocks_per_sequence,
            threshold=self.threshold,
            generator=generator,
        )
        self._record_metrics("train" if training else "eval", output, k, attention_mask)
        return (output.loss, output) if return_outputs else output.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # The distillation loss has no logits over the dataset's tokens to hand to compute_metrics.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluate(self, *args, **kwargs):
        # Every evaluation replays the same layout draws, so its figures compare across evaluations.
        self._eval_batch = 0
        return super().evaluate(*args, **kwargs)

    def _record_metrics(self, mode: str, output, k: int, attention_mask: torch.Tensor) -> None:
        """Gather this batch's distillation figures from all processes and queue them for the next log."""
        agreement = torch.full((self.max_k,), math.nan, device=attention_mask.device)
        batch_agreement = output.agreement.detach().float().reshape(-1)[: self.max_k]
        agreement[: batch_agreement.numel()] = batch_agreement.to(agreement.device)
        counts = torch.tensor([float(output.num_positions), float(attention_mask.sum())], device=attention_mask.device)
        row = torch.cat(
            [
                agreement,
                output.confidence.detach().float().reshape(1).to(agreement.device),
                output.tokens_per_pass.detach().float().reshape(1).to(agreement.device),
                counts,
            ]
        )
        rows = self.accelerator.gather_for_metrics(row.unsqueeze(0)).reshape(-1, row.numel())  # [processes, fields]

        metrics = self._metrics[mode]
        per_offset = rows[:, : self.max_k].nanmean(dim=0).tolist()
        for offset, value in enumerate(per_offset):
            if not math.isnan(value):
                metrics[f"agreement/offset_{offset}"].append(value)
        for name, column in (("mean_confidence", self.max_k), ("tokens_per_pass", self.max_k + 1)):
            value = rows[:, column].nanmean().item()
            if not math.isnan(value):
                metrics[name].append(value)
        if mode == "train":
            metrics["k"].append(float(k))
            self._total_supervised_positions += int(rows[:, self.max_k + 2].sum().item())
            self._total_train_tokens += int(rows[:, self.max_k + 3].sum().item())
            metrics["num_supervised_positions"] = [self._total_supervised_positions]
            metrics["num_tokens"] = [self._total_train_tokens]

    @property
    def adapter_config(self) -> MaskTokConfig:
        """The masktok config of the adapter being trained."""
        return _adapter_config_of(self.model)
