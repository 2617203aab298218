"""The quality study: small models trained here on synthetic tasks, to ask whether EvoToken helps.

    pretrain.py    masked-diffusion pretraining of a small LLaDA (`evofast train-base`)
    evaluate.py    one decoding configuration on a task's test split (`evofast eval` without --out,
                   `evofast bench quality`)

The tasks themselves are in `evofast.tasks`; the benchmark that runs the study is
`evofast bench quality`.
"""
