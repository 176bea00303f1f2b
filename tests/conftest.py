import os

# The CPU suite checks the Triton kernels through the interpreter, which must be chosen before
# triton is imported (it replaces @triton.jit). On a GPU machine, `TRITON_INTERPRET=0 pytest -m cuda`
# runs the GPU tests on the compiled kernels instead.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.pop("D2V_KERNELS_BACKEND", None)
INTERPRETER = os.environ["TRITON_INTERPRET"] not in ("", "0")

from collections import Counter  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_reset():
    from d2v_kernels import dispatch

    torch.manual_seed(0)
    dispatch.reset_warnings()
    yield


# Models small enough for the Triton interpreter: one layer, hidden 32, 2 heads of 16.
SMALL = dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=40)
AUDIO_SAMPLES, AUDIO_PADDED_FROM = 481, 361  # -> 95 -> 47 -> 23 frames


def small_pair(class_name: str, **overrides):
    """testing.build_pair at the SMALL sizes (``overrides`` on top)."""
    from d2v_kernels import testing

    return testing.build_pair(class_name, **(SMALL | overrides))


def small_inputs(class_name: str, config, **kwargs) -> dict:
    """testing.inputs_for, audio cut to AUDIO_SAMPLES samples with the last row padded from
    AUDIO_PADDED_FROM (CTC labels cut to fit the frames)."""
    from d2v_kernels import testing

    inputs = testing.inputs_for(class_name, config, **kwargs)
    if class_name.startswith("Data2VecAudio"):
        inputs = {name: t[:, :AUDIO_SAMPLES].clone() if name != "labels" else t for name, t in inputs.items()}
        inputs["attention_mask"][-1, AUDIO_PADDED_FROM:] = 0
        inputs["input_values"][-1, AUDIO_PADDED_FROM:] = 0.0
    return inputs


@pytest.fixture
def triton_launches(monkeypatch):
    """A Counter of the Triton kernels the interpreter launches during the test, by kernel name.

    What really ran, including inside a torch.compile'd graph, where ``record_dispatch()`` sees
    only the tracing: a compiled graph calls our custom ops, whose implementations launch here."""
    if not INTERPRETER:
        pytest.skip("counts the Triton interpreter's launches: run with TRITON_INTERPRET=1")
    from triton.runtime.interpreter import InterpretedFunction

    launches, run = Counter(), InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        if not kwargs.get("warmup"):
            launches[self.__name__] += 1
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", counting_run)
    return launches


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def on_device(request):
    """Runs the test body with torch's default device set: "cpu" (the Triton kernels through the
    interpreter) or "cuda" (the compiled kernels; GPU runs only). Tensors the test makes without a
    device land there. On cuda, TF32 is off so that the fp32 eager references are fp32."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if request.param == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.device(request.param):
            yield request.param
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    elif INTERPRETER:
        skip_gpu = pytest.mark.skip(reason="GPU tests run the compiled kernels: TRITON_INTERPRET=0 pytest -m cuda")
    else:
        skip_gpu = None
    skip_cpu = pytest.mark.skip(
        reason="CPU tests check the Triton kernels through the interpreter: run them with TRITON_INTERPRET=1"
    )
    for item in items:
        is_gpu_test = "cuda" in item.keywords
        if is_gpu_test and skip_gpu is not None:
            item.add_marker(skip_gpu)
        elif not is_gpu_test and not INTERPRETER:
            item.add_marker(skip_cpu)
