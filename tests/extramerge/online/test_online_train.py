"""Online merging in use: the trainer's --online-merge (its EMA and Extra-Merge losses against ones computed
independently from the run's checkpoints; a stopped and resumed run reports the same), the HF Trainer
callback and the plain-PyTorch example."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from extramerge.lm.cli import main as train_main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FLAGS = ["--size", "tiny", "--steps", "24", "--batch-size", "4", "--eval-batches", "2", "--seed", "3"]
FLAGS += ["--ckpt-every", "4", "--ckpt-from", "4", "--threads", "1", "--no-progress"]
ONLINE = ["--online-merge", "ema:0.7,sma:3,extra:0.5@2", "--online-every", "4"]


def _val_loss(model, run) -> float:
    """The trainer's held-out loss, recomputed: its fixed validation windows, one batch."""
    from extramerge.lm import data as lmdata
    from extramerge.lm.batches import eval_windows

    rec = json.loads((run / "run.json").read_text())
    seq, n = rec["config"]["batch_size"] * rec["config"]["eval_batches"], rec["resolved"]["seq_len"]
    val = lmdata.load_split(run / "data", "val")
    starts = eval_windows(len(val), n, seq)
    chunk = torch.from_numpy(val[starts[:, None] + np.arange(n + 1)].astype(np.int64))
    with torch.no_grad():
        logits = model(input_ids=chunk[:, :-1], use_cache=False).logits
    return float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), chunk[:, 1:].reshape(-1)))


def _log(run) -> dict[int, dict]:
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    return {e["step"]: e for e in lines if "val_loss" in e}


def test_trainer_online_losses_match_independent_merges(tmp_path):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    from transformers import AutoModelForCausalLM

    from extramerge.io import open_checkpoint
    from rivervalley import weights as rvw

    run = tmp_path / "run"
    assert train_main(["-o", run, *FLAGS, *ONLINE, "--online-save"]) == 0
    log = _log(run)
    assert set(log[24]) >= {"val_loss", "val_loss_ema", "val_loss_sma", "val_loss_extra"}
    assert "val_loss_sma" not in log[8] and "val_loss_extra" not in log[16] and "val_loss_extra" in log[20]
    # The online updates (every 4 steps) are exactly the checkpoints: replay them into AveragedModel.
    ckpts = [run / f"step_{s:06d}" for s in range(4, 25, 4)]
    models = [AutoModelForCausalLM.from_pretrained(c) for c in ckpts]
    ema = AveragedModel(models[0], multi_avg_fn=get_ema_multi_avg_fn(0.7))
    for m in models:
        ema.update_parameters(m)
    assert _val_loss(ema.module, run) == pytest.approx(log[24]["val_loss_ema"], rel=1e-5)
    assert _val_loss(models[-1], run) == pytest.approx(log[24]["val_loss"], rel=1e-5)
    # Extra-Merge of sma:3 at offset 2 over the six checkpoints, by rivervalley.weights.
    w = rvw.extra(6, 3, 2, 0.5)
    extra = AutoModelForCausalLM.from_pretrained(ckpts[-1])
    states = [dict(m.named_parameters()) for m in models]
    with torch.no_grad():
        for name, p in extra.named_parameters():
            p.copy_(sum(float(c) * s[name] for c, s in zip(w, states, strict=True)))
    assert _val_loss(extra, run) == pytest.approx(log[24]["val_loss_extra"], rel=1e-5)
    saved = open_checkpoint(run / "online" / "extra" / "step_000024")
    for name, p in extra.named_parameters():
        torch.testing.assert_close(saved.read(name), p.detach(), atol=1e-6, rtol=1e-6)
    rec = json.loads((run / "run.json").read_text())
    assert rec["checkpoints"][-1]["val_loss_ema"] == log[24]["val_loss_ema"]
    # stopped at 12 and resumed: the same online losses as the uninterrupted run
    run2 = tmp_path / "run2"
    assert train_main(["-o", run2, *FLAGS, *ONLINE, "--stop-at", "12"]) == 0
    assert train_main(["-o", run2, "--resume", "--no-progress", "--threads", "1"]) == 0
    assert {k: v for k, v in _log(run2)[24].items()} == log[24]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--online-merge", "ema:2"], "--online-merge: 'ema:2': the EMA decay must lie in"),
        (["--online-merge", "extra:1@2"], "--online-merge: 'extra:1@2' needs an sma:K"),
        (["--online-every", "2"], "--online-every/--online-device/--online-save need --online-merge"),
        (["--online-merge", "ema:0.9", "--online-every", "0"], "--online-every must be an integer >= 1"),
    ],
)
def test_trainer_online_flag_errors(tmp_path, capsys, flags, message):
    assert train_main(["-o", tmp_path / "r", *FLAGS, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {err[7:]}" and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_hf_trainer_example(tmp_path):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    from transformers import TrainerCallback

    from examples.online_merge_hf_trainer import main
    from extramerge.online.hf import OnlineMergeCallback, dataloader_loss

    class Reference(TrainerCallback):  # torch's own EMA on the same steps (every 2)
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % 2 == 0:
                if not hasattr(self, "ema"):
                    self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
                self.ema.update_parameters(model)

    ref = Reference()
    trainer = main(str(tmp_path / "out"), steps=40, extra_callbacks=[ref])
    cb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, OnlineMergeCallback))
    with cb.merger.swapped("ema"):
        for p, q in zip(trainer.model.parameters(), ref.ema.module.parameters(), strict=True):
            assert torch.equal(p, q)
    evals = [e for e in trainer.state.log_history if "eval_loss_ema" in e]
    assert [e["step"] for e in evals] == [20, 40]
    assert set(evals[0]) == {"step", "eval_loss_ema", "eval_loss_sma"}  # extra needs 8 + 4 updates: step 24
    assert all(np.isfinite(evals[1][f"eval_loss_{n}"]) for n in ("ema", "sma", "extra"))
    # the merges' losses are computed as eval_loss is: the same number for the raw weights ...
    raw = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e][-1]
    assert trainer.evaluate()["eval_loss"] == pytest.approx(raw, rel=1e-6)
    with cb.merger.swapped("extra"):  # ... and the Extra-Merge's, recomputed by Trainer.evaluate
        want = trainer.evaluate()["eval_loss"]
    assert evals[-1]["eval_loss_extra"] == pytest.approx(want, rel=1e-6)
    # without the Trainer: the model's own loss per batch, weighted by batch size; here recomputed from the
    # logits (next-token cross-entropy, the mean over each sequence, then over sequences: all equally long)
    per_seq = []
    with torch.no_grad():
        trainer.model.eval()
        for batch in trainer.get_eval_dataloader():
            logits = trainer.model(input_ids=batch["input_ids"]).logits[:, :-1]
            ce = F.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], reduction="none")
            per_seq += ce.mean(dim=1).tolist()
    got = dataloader_loss(trainer.model, trainer.get_eval_dataloader())
    assert got == pytest.approx(float(np.mean(per_seq)), rel=1e-5)
    saved = tmp_path / "out" / "online" / "extra" / "checkpoint-40"
    assert json.loads((saved / "merge.json").read_text())["method"] == "online-extra"
    assert (saved / "config.json").is_file()


def test_plain_example(tmp_path):
    from examples.online_merge_plain import main

    losses = main(steps=200, out=str(tmp_path))
    assert set(losses) == {"raw", "ema", "sma", "extra"}
    assert losses["ema"] < losses["raw"] and losses["sma"] < losses["raw"]  # constant-lr noise averaged out
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
