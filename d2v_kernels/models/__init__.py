"""Fused Data2Vec models: every transformers Data2Vec class, with the fused modules swapped in at
construction, so ``from_pretrained`` / ``save_pretrained`` work unchanged::

    from d2v_kernels.models import Data2VecVisionForImageClassification
    model = Data2VecVisionForImageClassification.from_pretrained(path)
"""

import transformers
from transformers import GenerationMixin

from d2v_kernels.models import hf_attention
from d2v_kernels.models.optimize import REGISTRY_MODEL_TYPES, optimize

hf_attention.register()


class _Fused:
    """Runs the transformers constructor, then swaps the fused modules in (``optimize``).

    An ``attn_implementation`` asked for (in the config, or to ``from_pretrained``) is kept; only
    where none was does attention become ``d2v_kernels``, set where transformers would set its
    default. Vision takes ``"d2v_kernels"`` too, which its transformers classes cannot construct."""

    def __init__(self, config, *args, **kwargs):
        requested = config._attn_implementation
        name = hf_attention.IMPLEMENTATION_NAME
        registry = config.model_type in REGISTRY_MODEL_TYPES
        if requested is None and registry:
            config._attn_implementation = name
        elif requested == name and not registry:
            config._attn_implementation = None  # transformers builds its default, then optimize() swaps
        super().__init__(config, *args, **kwargs)
        if requested == name and not registry:
            config._attn_implementation = name
        optimize(self, attn_implementation=requested or name)


class Data2VecAudioModel(_Fused, transformers.Data2VecAudioModel):
    """``transformers.Data2VecAudioModel`` with d2v_kernels' fused modules."""


class Data2VecAudioForCTC(_Fused, transformers.Data2VecAudioForCTC):
    """``transformers.Data2VecAudioForCTC`` with d2v_kernels' fused modules."""


class Data2VecAudioForSequenceClassification(_Fused, transformers.Data2VecAudioForSequenceClassification):
    """``transformers.Data2VecAudioForSequenceClassification`` with d2v_kernels' fused modules."""


class Data2VecAudioForAudioFrameClassification(_Fused, transformers.Data2VecAudioForAudioFrameClassification):
    """``transformers.Data2VecAudioForAudioFrameClassification`` with d2v_kernels' fused modules."""


class Data2VecAudioForXVector(_Fused, transformers.Data2VecAudioForXVector):
    """``transformers.Data2VecAudioForXVector`` with d2v_kernels' fused modules."""


class Data2VecVisionModel(_Fused, transformers.Data2VecVisionModel):
    """``transformers.Data2VecVisionModel`` with d2v_kernels' fused modules."""


class Data2VecVisionForImageClassification(_Fused, transformers.Data2VecVisionForImageClassification):
    """``transformers.Data2VecVisionForImageClassification`` with d2v_kernels' fused modules."""


class Data2VecVisionForSemanticSegmentation(_Fused, transformers.Data2VecVisionForSemanticSegmentation):
    """``transformers.Data2VecVisionForSemanticSegmentation`` with d2v_kernels' fused modules."""


class Data2VecTextModel(_Fused, transformers.Data2VecTextModel):
    """``transformers.Data2VecTextModel`` with d2v_kernels' fused modules."""


class Data2VecTextForCausalLM(_Fused, transformers.Data2VecTextForCausalLM, GenerationMixin):
    """``transformers.Data2VecTextForCausalLM`` with d2v_kernels' fused modules."""


class Data2VecTextForMaskedLM(_Fused, transformers.Data2VecTextForMaskedLM):
    """``transformers.Data2VecTextForMaskedLM`` with d2v_kernels' fused modules."""


class Data2VecTextForSequenceClassification(_Fused, transformers.Data2VecTextForSequenceClassification):
    """``transformers.Data2VecTextForSequenceClassification`` with d2v_kernels' fused modules."""


class Data2VecTextForMultipleChoice(_Fused, transformers.Data2VecTextForMultipleChoice):
    """``transformers.Data2VecTextForMultipleChoice`` with d2v_kernels' fused modules."""


class Data2VecTextForTokenClassification(_Fused, transformers.Data2VecTextForTokenClassification):
    """``transformers.Data2VecTextForTokenClassification`` with d2v_kernels' fused modules."""


class Data2VecTextForQuestionAnswering(_Fused, transformers.Data2VecTextForQuestionAnswering):
    """``transformers.Data2VecTextForQuestionAnswering`` with d2v_kernels' fused modules."""


FUSED_CLASSES = (
    Data2VecAudioModel,
    Data2VecAudioForCTC,
    Data2VecAudioForSequenceClassification,
    Data2VecAudioForAudioFrameClassification,
    Data2VecAudioForXVector,
    Data2VecVisionModel,
    Data2VecVisionForImageClassification,
    Data2VecVisionForSemanticSegmentation,
    Data2VecTextModel,
    Data2VecTextForCausalLM,
    Data2VecTextForMaskedLM,
    Data2VecTextForSequenceClassification,
    Data2VecTextForMultipleChoice,
    Data2VecTextForTokenClassification,
    Data2VecTextForQuestionAnswering,
)

__all__ = [
    "Data2VecAudioForAudioFrameClassification",
    "Data2VecAudioForCTC",
    "Data2VecAudioForSequenceClassification",
    "Data2VecAudioForXVector",
    "Data2VecAudioModel",
    "Data2VecTextForCausalLM",
    "Data2VecTextForMaskedLM",
    "Data2VecTextForMultipleChoice",
    "Data2VecTextForQuestionAnswering",
    "Data2VecTextForSequenceClassification",
    "Data2VecTextForTokenClassification",
    "Data2VecTextModel",
    "Data2VecVisionForImageClassification",
    "Data2VecVisionForSemanticSegmentation",
    "Data2VecVisionModel",
    "FUSED_CLASSES",
    "optimize",
]
