"""Readable logs: with stderr going to a file, training, merging, the study and extramerge eval write no
carriage-return floods (progress bars give plain lines, at most one per 30 s) and none of transformers'
warnings about inputs the package never gives (the attention_mask warning: its inputs are packed text)."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from transformers.utils.logging import warning_once
    from extramerge.cli import main
    from extramerge.lm.config import TrainConfig
    from extramerge.lm.train import train

    out = Path(sys.argv[1])
    run = out / "run"
    tiny = dict(size="tiny", n_layer=2, d_model=32, n_head=2, seq_len=32, batch_size=8, threads=1)
    train(TrainConfig(out=str(run), steps=40, ckpt_every=5, ckpt_from=15, schedule="wsd", lr=3e-3,
                      progress=True, **tiny))
    val, test = str(run / "data/val.jsonl"), str(run / "data/test.jsonl")
    steps = sorted(run.glob("step_*"))
    warning_once.cache_clear()  # transformers warns once per process: let each stage warn again
    assert main(["merge", *map(str, steps[-4:]), "--method", "sma", "-o", str(out / "sma")]) == 0
    warning_once.cache_clear()
    assert main(["study", str(run), "--calib", val, "--test", test, "-o", str(out / "study"), "--quick",
                 "--threads", "1", "--offsets", "2", "--alphas=0.5"]) == 0
    warning_once.cache_clear()
    assert main(["eval", str(out / "sma"), "--data", test, "--cloze", "0"]) == 0
    """
)


def test_logs_have_no_carriage_return_floods_and_no_attention_mask_warning(tmp_path):
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(tmp_path)], stderr=err, stdout=subprocess.PIPE
        )
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text
    assert "attention_mask" not in text
    assert len(text.splitlines()) < 30, text
