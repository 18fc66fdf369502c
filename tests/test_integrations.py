"""Training frameworks clip through our functions: Lightning (GradClipCallback), Hugging Face Trainer and Accelerate
(patch_torch). Each test trains a tiny model for a few steps on the CPU, once with torch's clipping and once with
ours, counts the calls that reach our functions and compares the results. Skipped where a framework is not
installed; `-m "not integration"` leaves them out."""
import contextlib
import os
import warnings

import pytest
import torch

import gradclip_cuda as gc
from gradclip_cuda import api

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

TORCH_FUNCTIONS = {name: getattr(torch.nn.utils, name)
                   for name in ("clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_")}


@pytest.fixture
def calls(monkeypatch):
    """Counts, by name, the calls that reach our functions through patch_torch(): each function patch_torch()
    installs is wrapped in a counter that calls ours."""
    counts = {}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return fn(*args, **kwargs)
        return wrapper

    for names in api._TARGETS.values():
        for name, fn in list(names.items()):
            monkeypatch.setitem(names, name, counting(fn.__name__, fn))
    return counts


def assert_torch_restored():
    for name, fn in TORCH_FUNCTIONS.items():
        assert getattr(torch.nn.utils, name) is fn, name


# ---- Lightning ----

def lightning_fit(tmp_path, clip_val, algorithm, callbacks=(), fail_at=None):
    """Fits a small MLP for 4 steps of SGD from seed 0; returns its parameters."""
    L = pytest.importorskip("lightning")

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

        def training_step(self, batch, batch_idx):
            if batch_idx == fail_at:
                raise RuntimeError("failing on purpose")
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x).squeeze(-1), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    x = torch.randn(32, 8)
    y = 10 * x.sum(dim=1)  # large targets: gradient norms well above the clip thresholds below
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    model = Module()
    trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        gradient_clip_val=clip_val, gradient_clip_algorithm=algorithm, callbacks=list(callbacks))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("algorithm,clip_val,ours", [("norm", 0.5, "clip_grad_norm_"),
                                                     ("value", 0.05, "clip_grad_value_")])
def test_lightning_clips_with_ours(tmp_path, calls, algorithm, clip_val, ours):
    pytest.importorskip("lightning")
    from gradclip_cuda.integrations.lightning import GradClipCallback

    with_torch = lightning_fit(tmp_path, clip_val, algorithm)
    assert calls == {}
    with_ours = lightning_fit(tmp_path, clip_val, algorithm, callbacks=[GradClipCallback()])
    assert calls == {ours: 4}  # one clip per optimizer step, nothing else patched was called
    assert_torch_restored()  # undone at the end of fit
    for a, b in zip(with_ours, with_torch):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The clipping mattered: without it the parameters end elsewhere.
    unclipped = lightning_fit(tmp_path, 0.0, algorithm)
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-4) for a, b in zip(unclipped, with_torch))


def test_lightning_callback_undoes_patch_when_fit_fails(tmp_path, calls):
    pytest.importorskip("lightning")
    from gradclip_cuda.integrations.lightning import GradClipCallback

    with pytest.raises(RuntimeError, match="failing on purpose"):
        lightning_fit(tmp_path, 0.5, "norm", callbacks=[GradClipCallback()], fail_at=2)
    assert calls == {"clip_grad_norm_": 2}  # steps 0 and 1 clipped with ours before the failure
    assert_torch_restored()


def test_integrations_import_without_frameworks():
    import subprocess
    import sys
    code = ("import sys; import gradclip_cuda, gradclip_cuda.integrations; "
            "assert not {'lightning', 'pytorch_lightning', 'transformers', 'accelerate'} & set(sys.modules), "
            "sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True,
                   env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(gc.__file__))})


# ---- Hugging Face ----

@pytest.fixture(scope="module")
def hf_offline(tmp_path_factory):
    """transformers and accelerate, offline, with their caches in a temporary folder."""
    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as mp:
        for var, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                           ("HF_HOME", str(home)), ("WANDB_DISABLED", "true"), ("TOKENIZERS_PARALLELISM", "false")):
            mp.setenv(var, value)
        transformers = pytest.importorskip("transformers")
        accelerate = pytest.importorskip("accelerate")
        yield transformers, accelerate


def tiny_bert(transformers):
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def hf_train(transformers, tmp_path, patched):
    """Trains the tiny BERT for 3 steps with max_grad_norm 0.5; returns the logged grad norms and the parameters."""
    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 64, (12,), generator=gen), "attention_mask": torch.ones(12, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(12)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                          learning_rate=1.0, max_grad_norm=0.5, logging_steps=1, save_strategy="no",
                                          report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
                                          dataloader_num_workers=0)
    trainer = transformers.Trainer(model=tiny_bert(transformers), args=args, train_dataset=data)
    with gc.patch_torch() if patched else contextlib.nullcontext():
        trainer.train()
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    return norms, [p.detach().clone() for p in trainer.model.parameters()]


def test_hf_trainer_clips_with_ours(hf_offline, tmp_path, calls):
    transformers, _ = hf_offline
    torch_norms, torch_params = hf_train(transformers, tmp_path / "torch", patched=False)
    assert calls == {}
    our_norms, our_params = hf_train(transformers, tmp_path / "ours", patched=True)
    assert_torch_restored()
    assert calls.get("clip_grad_norm_") == 3  # one per optimizer step
    assert len(our_norms) == len(torch_norms) == 3
    assert max(torch_norms) > 0.5  # max_grad_norm clipped
    torch.testing.assert_close(torch.tensor(our_norms), torch.tensor(torch_norms), rtol=1e-5, atol=0)
    for a, b in zip(our_params, torch_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def accelerate_grads(accelerate, transformers):
    accelerator = accelerate.Accelerator(cpu=True)
    model = accelerator.prepare(tiny_bert(transformers))
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 64, (4, 12), generator=gen)
    loss = model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss
    accelerator.backward(loss * 100)  # a gradient norm well above 1
    return accelerator, model


@pytest.mark.parametrize("what", ["norm", "value"])
def test_accelerate_clips_with_ours(hf_offline, calls, what):
    transformers, accelerate = hf_offline
    results = []
    for patched in (False, True):
        accelerator, model = accelerate_grads(accelerate, transformers)
        with gc.patch_torch() if patched else contextlib.nullcontext():
            if what == "norm":
                total = accelerator.clip_grad_norm_(model.parameters(), 1.0)
            else:
                total = None
                accelerator.clip_grad_value_(model.parameters(), 0.01)
        results.append((total, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        assert calls == ({} if not patched else {f"clip_grad_{what}_": 1})
    (torch_total, torch_grads), (our_total, our_grads) = results
    if what == "norm":
        assert torch_total > 1.0
        torch.testing.assert_close(our_total, torch_total, rtol=1e-5, atol=0)
    for a, b in zip(our_grads, torch_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert_torch_restored()
