"""``Data2VecPretrainer``: Data2Vec's self-supervised step on a transformers Data2Vec encoder
(or d2v_kernels' fused one): the EMA teacher sees the whole input and gives layer-averaged targets,
the student sees a masked view and regresses them at the masked positions through a head."""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn

from d2v_kernels.pretraining.config import PretrainingConfig
from d2v_kernels.pretraining.ema import EMAUpdate, annealed_decay, make_teacher
from d2v_kernels.pretraining.loss import feature_std, regression_loss
from d2v_kernels.pretraining.masking import audio_span_mask, block_mask, token_span_mask
from d2v_kernels.pretraining.modalities import Modality, modality_of, unwrap
from d2v_kernels.pretraining.targets import teacher_targets

_PRESETS = {
    "audio": PretrainingConfig.for_audio,
    "vision": PretrainingConfig.for_vision,
    "text": PretrainingConfig.for_text,
}
_MASK_ARGUMENTS = ("mask_time_indices", "bool_masked_pos", "masked_positions", "masked_input_ids")


@dataclasses.dataclass
class PretrainingOutput:
    """One step's result. ``loss``: the scalar to backpropagate; ``target_var`` / ``pred_var``: the
    mean per-channel standard deviation of the targets / predictions over the masked positions
    (fairseq's names and definition; a falling ``target_var`` is collapse); ``sample_size``: the
    number of masked positions; ``mask``: (B, L) bool, the masked positions."""

    loss: torch.Tensor
    target_var: torch.Tensor
    pred_var: torch.Tensor
    sample_size: int
    mask: torch.Tensor


def build_regression_head(hidden_size: int, layers: int = 1) -> nn.Sequential:
    """fairseq's head: one Linear(C, C), or for ``layers`` n > 1 Linear(C, 2C), GELU, then n - 2 x
    (Linear(2C, 2C), GELU), then Linear(2C, C)."""
    modules, width = [], hidden_size
    for _ in range(layers - 1):
        modules += [nn.Linear(width, 2 * hidden_size), nn.GELU()]
        width = 2 * hidden_size
    modules.append(nn.Linear(width, hidden_size))
    return nn.Sequential(*modules)


class Data2VecPretrainer(nn.Module):
    """Data2Vec pre-training around ``student``, a Data2Vec{Audio,Vision,Text}Model (transformers'
    class, d2v_kernels.models' fused one, or one given ``d2v_kernels.optimize``), possibly wrapped
    in DistributedDataParallel or ``torch.compile``: calls go through the wrapper, the teacher is
    copied from and updated from the model inside it (``.module`` / ``._orig_mod``).

    ``config``: a :class:`PretrainingConfig` (default: the modality's preset). ``mask_token_id``
    (text): the id masked tokens become, by default ``student.config.mask_token_id``; needed only
    when the masked ids are made here. ``regression_head``: a module mapping (M, C) to (M, C)
    (default ``build_regression_head(C, config.head_layers)``); pass one wrapped in DDP to train it
    data-parallel. ``generator``: the CPU generator masks are drawn from (default: seeded with
    ``config.seed``).

    Attributes: ``student`` (the unwrapped model, to fine-tune afterwards), ``teacher`` (a model of
    the student's class, eval mode, no grad; shared submodules are the student's own objects),
    ``regression_head``, ``config``, ``ema_updates`` and ``ema_decay``.

    Requirements of the student: audio needs ``masked_spec_embed`` (a config with
    ``mask_time_prob > 0``) and ``apply_spec_augment``; vision needs a mask token
    (``use_mask_token=True``). For a half-precision student the EMA is kept in that precision: keep
    fp32 weights and use autocast for bf16 training.
    """

    def __init__(
        self,
        student: nn.Module,
        config: PretrainingConfig | None = None,
        *,
        mask_token_id: int | None = None,
        regression_head: nn.Module | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        model = unwrap(student)
        modality = modality_of(model)
        if config is None:
            config = _PRESETS[modality.name]()
        if not isinstance(config, PretrainingConfig):
            raise TypeError(f"config must be a PretrainingConfig, got {type(config).__name__}")
        _check_student(model, modality, config)
        self.modality = modality
        self.config = config
        self.student = model
        self._shared = (
            tuple(model.get_submodule(path) for path in modality.shared) if config.ema_transformer_only else ()
        )
        self.teacher = make_teacher(model, self._shared)
        self._ema = EMAUpdate(self.teacher, model, self._shared)
        self.ema_updates = 0
        if regression_head is None:
            reference = next(model.parameters())
            regression_head = build_regression_head(model.config.hidden_size, config.head_layers)
            regression_head.to(device=reference.device, dtype=reference.dtype)
        self.regression_head = unwrap(regression_head)
        # The callables the step goes through (a DDP or compiled wrapper), not registered as submodules.
        object.__setattr__(self, "_student_call", student)
        object.__setattr__(self, "_head_call", regression_head)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.generator = generator if generator is not None else torch.Generator().manual_seed(config.seed)
        self.mask_token_id = mask_token_id
        self._set_teacher_eval()
        self.register_state_dict_post_hook(_drop_shared_teacher_keys)
        self.register_load_state_dict_post_hook(_allow_missing_shared_teacher_keys)

    # -- modes, EMA, state ----------------------------------------------------------------------

    def _set_teacher_eval(self) -> None:
        shared = {id(m) for module in self._shared for m in module.modules()}
        for module in self.teacher.modules():
            if id(module) not in shared:
                module.training = False

    def train(self, mode: bool = True):
        """Student and head in ``mode``; the teacher stays in eval mode (its shared modules follow the student)."""
        super().train(mode)
        self._set_teacher_eval()
        return self

    @property
    def ema_decay(self) -> float:
        """The decay the next :meth:`ema_step` uses."""
        c = self.config
        return annealed_decay(c.ema_decay, c.ema_end_decay, self.ema_updates, c.ema_anneal_end_step)

    def ema_step(self) -> None:
        """teacher <- ema_decay * teacher + (1 - ema_decay) * student over the unshared parameters
        (buffers copied); then the schedule advances one update. Call it after the optimizer step."""
        self._ema.update(self.ema_decay)
        self.ema_updates += 1

    def get_extra_state(self) -> dict:
        return {"ema_updates": self.ema_updates, "generator": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.ema_updates = int(state["ema_updates"])
        self.generator.set_state(state["generator"])

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """The student as a transformers checkpoint (``Data2Vec*Model.from_pretrained`` loads it)."""
        self.student.save_pretrained(save_directory, **kwargs)

    # -- the step -------------------------------------------------------------------------------

    def forward(
        self,
        input_values: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mask_time_indices: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        masked_positions: torch.Tensor | None = None,
        masked_input_ids: torch.Tensor | None = None,
        **model_kwargs,
    ) -> PretrainingOutput:
        """One step on a batch: targets from the teacher, predictions from the student on the masked
        input, the loss at the masked positions.

        The masks are drawn from the config unless given: audio ``mask_time_indices`` (B, frames),
        vision ``bool_masked_pos`` (B, patches), text ``masked_positions`` (B, T) with, optionally,
        the student's ``masked_input_ids`` (default: ``input_ids`` with the masked positions set to
        ``mask_token_id``). For text, ``input_ids`` is always the unmasked sequence the teacher
        reads. Other keyword arguments go to both models.
        """
        given = dict(
            input_values=input_values,
            pixel_values=pixel_values,
            input_ids=input_ids,
            mask_time_indices=mask_time_indices,
            bool_masked_pos=bool_masked_pos,
            masked_positions=masked_positions,
            masked_input_ids=masked_input_ids,
        )
        teacher_inputs, valid = self._teacher_inputs(given, attention_mask, model_kwargs)
        student_inputs, mask = self._student_inputs(given, teacher_inputs, valid)
        targets = self._targets(teacher_inputs, valid)
        hidden = self._student_call(**student_inputs)[0][:, self.modality.prefix_tokens :]
        predictions = self._head_call(hidden[mask])
        targets = targets[mask]
        loss = regression_loss(predictions, targets, beta=self.config.loss_beta, scale=self.config.loss_scale)
        return PretrainingOutput(
            loss=loss,
            target_var=feature_std(targets),
            pred_var=feature_std(predictions),
            sample_size=targets.shape[0],
            mask=mask,
        )

    @torch.no_grad()
    def targets(
        self,
        input_values: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **model_kwargs,
    ) -> torch.Tensor:
        """The teacher's (B, L, C) float32 targets for the unmasked input (vision: the patches, no
        CLS); zero at padded positions."""
        given = dict(input_values=input_values, pixel_values=pixel_values, input_ids=input_ids)
        teacher_inputs, valid = self._teacher_inputs(given, attention_mask, model_kwargs)
        return self._targets(teacher_inputs, valid)

    def _targets(self, teacher_inputs: dict, valid: torch.Tensor | None) -> torch.Tensor:
        c = self.config
        return teacher_targets(
            self.teacher,
            self.modality,
            teacher_inputs,
            top_k=c.average_top_k_layers,
            layer_norm=c.layer_norm_mode,
            target_norm=c.target_norm_mode,
            valid=valid,
            shared=self._shared,
        )

    # -- inputs and masks -----------------------------------------------------------------------

    def _teacher_inputs(self, given: dict, attention_mask, model_kwargs) -> tuple[dict, torch.Tensor | None]:
        """The teacher's keyword arguments and the (B, L) valid positions (None: all)."""
        m = self.modality
        for name in ("input_values", "pixel_values", "input_ids"):
            value = given.get(name)
            if name == m.input_name and not isinstance(value, torch.Tensor):
                raise ValueError(f"{name} is required for a {m.model_class.__name__} student")
            if name != m.input_name and value is not None:
                raise ValueError(f"{name} is not an input of a {m.model_class.__name__} student; give {m.input_name}")
        x = given[m.input_name]
        inputs = {m.input_name: x, **model_kwargs}
        if attention_mask is not None:
            if m.name == "vision":
                raise ValueError("attention_mask is not an input of a Data2VecVisionModel student")
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != x.shape[:2]:
                raise ValueError(f"attention_mask must be a tensor of shape {tuple(x.shape[:2])}")
            inputs["attention_mask"] = attention_mask
        if m.name == "audio" and attention_mask is not None:
            lengths = self.student._get_feat_extract_output_lengths(torch.tensor(x.shape[-1]))
            valid = self.student._get_feature_vector_attention_mask(int(lengths), attention_mask)
        elif m.name == "text" and attention_mask is not None:
            valid = attention_mask != 0
        else:
            valid = None
        return inputs, valid

    def _student_inputs(self, given: dict, teacher_inputs: dict, valid) -> tuple[dict, torch.Tensor]:
        m = self.modality
        for name in _MASK_ARGUMENTS:
            if (
                given.get(name) is not None
                and name != m.mask_name
                and not (m.name == "text" and name == "masked_input_ids")
            ):
                raise ValueError(f"{name} is not a mask of a {m.model_class.__name__} student; give {m.mask_name}")
        x = teacher_inputs[m.input_name]
        shape = self._mask_shape(x)
        mask = given[m.mask_name]
        if mask is None:
            if m.name == "text" and given["masked_input_ids"] is not None:
                raise ValueError("masked_input_ids needs masked_positions (which positions the loss is taken at)")
            mask = self._sample_mask(x, shape, valid)
        else:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != shape:
                raise ValueError(f"{m.mask_name} must be a bool tensor of shape {shape}")
            mask = mask.to(x.device)
            if valid is not None and bool((mask & ~valid).any()):
                raise ValueError(f"{m.mask_name} masks padded positions")
        if not bool(mask.any()):
            raise ValueError(f"{m.mask_name} masks no position: the loss needs at least one")
        inputs = dict(teacher_inputs)
        if m.name == "text":
            masked_ids = given["masked_input_ids"]
            if masked_ids is None:
                masked_ids = x.masked_fill(mask, self._mask_token_id())
            elif not isinstance(masked_ids, torch.Tensor) or masked_ids.shape != x.shape:
                raise ValueError(f"masked_input_ids must be a tensor of input_ids' shape {tuple(x.shape)}")
            inputs["input_ids"] = masked_ids
        else:
            inputs[m.mask_name] = mask
        return inputs, mask

    def _mask_shape(self, x: torch.Tensor) -> tuple[int, int]:
        m = self.modality
        if m.name == "audio":
            return (x.shape[0], int(self.student._get_feat_extract_output_lengths(torch.tensor(x.shape[-1]))))
        if m.name == "vision":
            height, width = _patch_grid(self.student.config, x)
            return (x.shape[0], height * width)
        return tuple(x.shape)

    def _sample_mask(self, x: torch.Tensor, shape: tuple[int, int], valid) -> torch.Tensor:
        c, g, name = self.config, self.generator, self.modality.name
        if name == "audio":
            mask = audio_span_mask(*shape, mask_prob=c.mask_prob, mask_length=c.mask_length, generator=g, valid=valid)
        elif name == "vision":
            height, width = _patch_grid(self.student.config, x)
            mask = block_mask(x.shape[0], height, width, mask_prob=c.mask_prob, min_block=c.mask_length, generator=g)
        else:
            eligible = torch.ones(shape, dtype=torch.bool) if valid is None else valid.cpu()
            config = self.student.config
            for special in {config.bos_token_id, config.eos_token_id, config.pad_token_id} - {None}:
                eligible &= x.cpu() != special
            mask = token_span_mask(eligible, mask_prob=c.mask_prob, span=c.mask_length, generator=g)
        return mask.to(x.device)

    def _mask_token_id(self) -> int:
        token = (
            self.mask_token_id
            if self.mask_token_id is not None
            else getattr(self.student.config, "mask_token_id", None)
        )
        if token is None:
            raise ValueError(
                "mask_token_id: the student's config has none; pass Data2VecPretrainer(..., mask_token_id=tokenizer.mask_token_id)"
            )
        return int(token)


def _patch_grid(config, pixel_values: torch.Tensor) -> tuple[int, int]:
    patch = config.patch_size
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    return pixel_values.shape[-2] // ph, pixel_values.shape[-1] // pw


def _check_student(model: nn.Module, modality: Modality, config: PretrainingConfig) -> None:
    layers = len(modality.layers(model))
    if config.average_top_k_layers > layers:
        raise ValueError(f"average_top_k_layers ({config.average_top_k_layers}) exceeds the student's {layers} layers")
    if modality.name == "audio":
        if getattr(model, "masked_spec_embed", None) is None or not getattr(model.config, "apply_spec_augment", True):
            raise ValueError(
                "student: a Data2VecAudioModel masks through masked_spec_embed, which it has only with "
                "config.mask_time_prob > 0 and config.apply_spec_augment=True"
            )
    elif modality.name == "vision" and getattr(model.embeddings, "mask_token", None) is None:
        raise ValueError("student: a Data2VecVisionModel needs a mask token (use_mask_token=True)")


def _shared_teacher_prefixes(module: Data2VecPretrainer) -> tuple[str, ...]:
    return tuple(f"teacher.{path}." for path in module.modality.shared) if module._shared else ()


def _drop_shared_teacher_keys(module, state_dict, prefix, local_metadata) -> None:
    """The teacher's shared submodules are the student's: saved once, under ``student.``."""
    for key in [k for k in state_dict if k.startswith(tuple(prefix + p for p in _shared_teacher_prefixes(module)))]:
        del state_dict[key]


def _allow_missing_shared_teacher_keys(module, incompatible_keys) -> None:
    prefixes = _shared_teacher_prefixes(module)
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not any(p in k for p in prefixes)]
