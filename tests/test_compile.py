"""torch.compile(fullgraph=True) of optimized models: no graph breaks from our modules or ops."""

import pytest
import torch

from d2v_kernels import testing


@pytest.mark.parametrize(
    "class_name", ["Data2VecAudioForCTC", "Data2VecVisionForImageClassification", "Data2VecTextForMaskedLM"]
)
def test_compiled_optimized_model_matches_eager(class_name):
    torch._dynamo.reset()
    _, model, config = testing.build_pair(class_name)
    model.eval()
    inputs = testing.inputs_for(class_name, config, labels=False)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=1e-5)
