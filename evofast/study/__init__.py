"""The quality study: small models trained here on synthetic tasks, to ask whether EvoToken helps.

    pretrain.py    masked-diffusion pretraining of a small LLaDA (`evofast train-base`)
    evaluate.py    one decoding configuration on a task's test split (`evofast eval` without --out)
    finetune.py    the study's fine-tune arms: FT-baseline (masked diffusion) and CTS, LoRA or full
    scoring.py     one decoding setting on a fixed problem set, revisions logged (`RevisionLog`)
    stats.py       paired comparisons of two arms: McNemar, paired bootstrap, per-seed spread

The tasks themselves are in `evofast.tasks`; the benchmark that runs the study is
`evofast bench quality`.
"""
