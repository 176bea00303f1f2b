"""Data2Vec self-supervised pre-training (Baevski et al., 2022, arXiv 2202.03555) on transformers'
Data2Vec encoders and d2v_kernels' fused ones::

    from d2v_kernels.pretraining import Data2VecPretrainer, PretrainingConfig

    pre = Data2VecPretrainer(student, PretrainingConfig.for_audio())
    out = pre(input_values=wave, attention_mask=mask)
    out.loss.backward(); optimizer.step(); pre.ema_step()

Modules: ``config`` (settings and presets), ``masking`` (the student's masks), ``modalities`` (what
differs between audio, vision and text encoders), ``ema`` (the teacher and its update), ``targets``
(layer-averaged teacher targets through ``ops.accumulate_target``), ``loss`` (masked regression and
the variance monitors), ``pretrainer`` (the step).
"""

from d2v_kernels.pretraining.config import PretrainingConfig
from d2v_kernels.pretraining.pretrainer import Data2VecPretrainer, PretrainingOutput, build_regression_head

__all__ = ["Data2VecPretrainer", "PretrainingConfig", "PretrainingOutput", "build_regression_head"]
