"""Language-model pretraining study, as runnable scripts: ``python -m experiments.lm.train`` and
``python -m experiments.lm.study``. The code is the library's ``extramerge.lm`` (tokenizer, data, models,
trainer; the ``lm`` extra) and ``extramerge.study``."""
